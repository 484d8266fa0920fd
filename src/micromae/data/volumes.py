"""Turn a :class:`~micromae.config.DataConfig` into the 3-D volumes the crop sampler reads from.

:func:`read_source` is the one dispatch on ``data.source`` for volumes: pre-training keeps the images, the
supervised baselines also the labels and cell masks the source brings (synthetic, betaSeg).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from micromae.config import DataConfig
from micromae.data.betaseg import load_betaseg_cell
from micromae.data.samples import load_sample
from micromae.data.synthetic_em import make_em_volume
from micromae.errors import input_error
from micromae.io import open_volume



def as_zyx(array: Any, name: str, axes: str) -> Any:
    """A 3-D (Z, Y, X) array-like; a 2-D (Y, X) image becomes one slice (1, Y, X)."""
    if axes == "ZYX":
        return array
    if axes == "YX":
        return np.asarray(array[...] if not isinstance(array, np.ndarray) else array)[None]
    raise input_error(
        f"training volume {name}", "a single-channel 3-D (ZYX) volume or 2-D (YX) image",
        f"axes {axes} with shape {tuple(array.shape)}",
        "MAESTER pre-training reads one channel: pass data.axes for the file, or pick a channel first",
    )


@dataclass
class SourceVolumes:
    """The volumes of one ``data.source``, each (Z, Y, X). ``labels`` (integer classes) and ``masks`` (bool
    cell masks) are None for sources without them (files, samples)."""

    images: list[Any]
    labels: list[Any] | None = None
    masks: list[Any] | None = None


def read_source(cfg: DataConfig) -> SourceVolumes:
    """The volumes of ``cfg.source`` (read lazily where the format allows), with labels where it has them."""
    source = cfg.source
    if source == "synthetic":
        vol = make_em_volume(shape=tuple(cfg.synthetic_shape), seed=cfg.synthetic_seed)
        return SourceVolumes([vol.image], [vol.labels], [vol.cell_mask])
    if source == "files":
        if not cfg.paths:
            raise input_error("data.paths", "at least one volume file", "an empty list",
                              "Set data.paths=[cell1.tif,cell2.tif] (or data.source=synthetic)")
        vols = []
        for path in cfg.paths:
            vol = open_volume(path, axes=cfg.axes, key=cfg.key)
            vols.append(as_zyx(vol, repr(path), vol.axes))
        return SourceVolumes(vols)
    if source == "betaseg":
        if cfg.root is None:
            raise input_error("data.root", "the betaSeg folder", "nothing", "Set data.root=/path/to/betaseg")
        cells = [load_betaseg_cell(cfg.root, cell) for cell in cfg.betaseg_cells]
        return SourceVolumes([c.image for c in cells], [c.labels for c in cells], [c.cell_mask for c in cells])
    if source.startswith("sample:"):
        sample = load_sample(source.split(":", 1)[1])
        return SourceVolumes([as_zyx(sample.image, source, sample.axes)])
    raise input_error("data.source", "synthetic, files, betaseg or sample:NAME", repr(source),
                      "Fix data.source (micromae info lists the sample names)")


def load_training_volumes(cfg: DataConfig) -> list[Any]:
    """Volumes (array-likes in Z, Y, X order, read lazily where the format allows) for ``cfg.source``."""
    return read_source(cfg).images
