"""Data a run writes into its own folder: the synthetic multiplex images of ``data.source=synthetic_mif``.

Pre-training (DAMA on the images) and Mask R-CNN fine-tuning (on their instance masks) both train on
``RUN_DIR/synthetic_mif``, written by the main process on the first start of the run and read again on
``--resume`` and by the other processes (:func:`~micromae.train.distributed.main_process_first`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from micromae.data.synthetic_mif import write_mif_dataset

SYNTHETIC_MIF_FOLDER = "synthetic_mif"


def synthetic_mif_in_run(run_dir: str | Path, n_images: int, shape: Sequence[int], seed: int) -> Path:
    """``RUN_DIR/synthetic_mif`` (``images/``, ``annotations.json``, ...), written unless already complete.

    ``shape``: the image side ``(H, W)``; a longer list uses its last two values. The folder is the run's
    own, so an incomplete one (no ``images/`` or no ``annotations.json``) is replaced.
    """
    root = Path(run_dir) / SYNTHETIC_MIF_FOLDER
    if not (root / "images").is_dir() or not (root / "annotations.json").is_file():
        write_mif_dataset(root, n_images=n_images, shape=tuple(shape[-2:]), seed=seed, overwrite=True)
    return root
