"""Turn a :class:`~micromae.config.DataConfig` into the list of 3-D volumes the crop sampler reads from."""

from __future__ import annotations

from typing import Any

import numpy as np

from micromae.config import DataConfig
from micromae.errors import input_error


def _as_zyx(array: Any, name: str, axes: str) -> Any:
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


def load_training_volumes(cfg: DataConfig) -> list[Any]:
    """Volumes (array-likes in Z, Y, X order, read lazily where the format allows) for ``cfg.source``."""
    source = cfg.source
    if source == "synthetic":
        from micromae.data.synthetic_em import make_em_volume

        return [make_em_volume(shape=tuple(cfg.synthetic_shape), seed=cfg.synthetic_seed).image]
    if source == "files":
        from micromae.io import open_volume

        if not cfg.paths:
            raise input_error("data.paths", "at least one volume file", "an empty list",
                              "Set data.paths=[cell1.tif,cell2.tif] (or data.source=synthetic)")
        vols = []
        for path in cfg.paths:
            vol = open_volume(path, axes=cfg.axes, key=cfg.key)
            vols.append(_as_zyx(vol, repr(path), vol.axes))
        return vols
    if source == "betaseg":
        from micromae.data.betaseg import load_betaseg_cell

        if cfg.root is None:
            raise input_error("data.root", "the betaSeg folder", "nothing", "Set data.root=/path/to/betaseg")
        return [load_betaseg_cell(cfg.root, cell).image for cell in cfg.betaseg_cells]
    if source.startswith("sample:"):
        from micromae.data.samples import load_sample

        sample = load_sample(source.split(":", 1)[1])
        return [_as_zyx(sample.image, source, sample.axes)]
    raise input_error("data.source", "synthetic, files, betaseg or sample:NAME", repr(source),
                      "Fix data.source (micromae info lists the sample names)")
