"""Synthetic EM-like volumes with exact ground truth, for testing MAESTER end to end (docs/METHODS.md, Data).

A volume is built in three steps:

1. **Layout.** Cells are the regions of a Voronoi partition whose coordinates are warped by smooth noise;
   smooth noise blobs thresholded at a quantile carve the "outside" (resin / extracellular space). Each
   cell keeps its largest connected piece; thin membranes line every cell border. One nucleus per cell
   sits off-centre (a noise-warped ellipsoid filling ``nucleus_fraction`` of the cell); mitochondria are
   capsules along short persistent random walks; granules are small spheres. Organelles never touch.
2. **Texture.** Each class has its own texture, chosen so that the classes differ by texture, shape and
   context rather than by mean grey value: cytoplasm has a fine speckle; nuclei have mottled chromatin
   clumps and a dark envelope; mitochondria have a dark rim and cristae striped across their long axis;
   granules have a dense core (as dark as membrane) inside a pale halo (as bright as the outside). The
   mean grey values of mitochondria, nuclei and granules therefore overlap those of other classes, and
   intensity thresholding cannot separate them.
3. **Image formation.** Anisotropic Gaussian blur (stronger along Z, as from a FIB mill step), a slow
   illumination gradient, optional slice-to-slice misalignment, then Poisson (shot) plus Gaussian (read)
   noise, and conversion to uint8.

Class frequencies at the default options and shape, as fractions of *all* voxels: outside ~15 %,
nucleus ~24 %, mitochondria ~7 %, membrane ~4 %, granules ~2 %, cytoplasm the rest (~48 %). Organelle
targets are set as fractions of the cell volume (``EMOptions``) and met by construction; the membrane
share follows from ``cell_diameter``. Granule labels cover the whole vesicle (dense core and halo);
mitochondria labels include the rim, nuclei the envelope. An intensity-only k-means (k = 6) finds
mitochondria and granules with a Dice of ~0.2–0.3. The default 64×256×256 volume takes ~2.5 s on 2 cores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

from micromae.data.betaseg import write_betaseg_cell
from micromae.data.synthetic_em_render import (
    GRANULES,
    MITOCHONDRIA,
    NUCLEUS,
    OUTSIDE,
    carve_outside,
    form_image,
    line_membranes,
    misalign_slices,
    paint_base_textures,
    place_granules,
    place_mitochondria,
    place_nuclei,
    warped_voronoi,
)
from micromae.config import options_from_kwargs
from micromae.errors import input_error
from micromae.io import write_files_atomically

__all__ = [
    "CLASS_NAMES",
    "EMOptions",
    "SyntheticEM",
    "make_em_volume",
    "read_em_volume",
    "write_em_volume",
]

CLASS_NAMES = ("outside", "cytoplasm", "membrane", "nucleus", "mitochondria", "granules")  # label values 0-5
MIN_SHAPE = (8, 32, 32)
_FIX = "See the EMOptions docstring for the meaning and range of each option"


@dataclass(frozen=True)
class EMOptions:
    """Options of :func:`make_em_volume`. Lengths in voxels; organelle fractions are of the cell volume.

    ``n_cells=None`` derives the number of cells from ``cell_diameter`` and the volume. ``outside_fraction``
    is the share of all voxels carved as outside before cell fragments join it. ``membrane_thickness`` is
    counted on each side of a border (two cells share 2× that). ``blur_sigma`` is (z, y, x).
    ``illumination`` is the relative gain change across the volume; ``photons`` the mean photon count at
    grey value 1; ``read_noise`` a Gaussian std in grey units; ``noise`` scales both (0: noise-free).
    ``misalignment`` is the std in voxels of random per-slice (y, x) shifts (0: off).
    """

    n_cells: int | None = None
    cell_diameter: float = 100.0
    warp: float = 0.12
    outside_fraction: float = 0.15
    membrane_thickness: int = 1
    nucleus_fraction: float = 0.28
    mitochondria_fraction: float = 0.08
    mitochondria_radius: tuple[float, float] = (2.5, 4.0)
    mitochondria_segments: tuple[int, int] = (2, 4)
    segment_length: tuple[float, float] = (5.0, 10.0)
    cristae_period: float = 4.0
    granules_fraction: float = 0.025
    granule_radius: tuple[float, float] = (1.5, 2.5)
    halo_width: float = 1.5
    blur_sigma: tuple[float, float, float] = (1.2, 0.6, 0.6)
    illumination: float = 0.15
    photons: float = 300.0
    read_noise: float = 0.02
    noise: float = 1.0
    misalignment: float = 0.0
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def validate(self) -> None:
        """Raise MicromaeInputError on out-of-range options."""
        fractions = ("outside_fraction", "nucleus_fraction", "mitochondria_fraction", "granules_fraction")
        for name in fractions:
            if not 0.0 <= getattr(self, name) < 0.9:
                raise input_error(f"option {name}", "a fraction in [0, 0.9)", repr(getattr(self, name)), _FIX)
        positive = ("cell_diameter", "cristae_period", "halo_width", "photons")
        for name in positive:
            if not getattr(self, name) > 0:
                raise input_error(f"option {name}", "a positive number", repr(getattr(self, name)), _FIX)
        for name in ("noise", "read_noise", "illumination", "misalignment", "warp"):
            if not getattr(self, name) >= 0:
                raise input_error(f"option {name}", "a number >= 0", repr(getattr(self, name)), _FIX)
        if int(self.membrane_thickness) != self.membrane_thickness or self.membrane_thickness < 1:
            raise input_error("option membrane_thickness", "an integer >= 1", repr(self.membrane_thickness), _FIX)
        if self.n_cells is not None and self.n_cells < 1:
            raise input_error("option n_cells", "None or an integer >= 1", repr(self.n_cells), _FIX)
        if len(self.blur_sigma) != 3 or len(self.spacing) != 3:
            raise input_error("options blur_sigma/spacing", "3 numbers (z, y, x)",
                              f"{self.blur_sigma!r}, {self.spacing!r}", _FIX)


@dataclass
class SyntheticEM:
    """A synthetic EM-like volume and its ground truth.

    Attributes:
        image: (Z, Y, X) uint8 grey values.
        labels: (Z, Y, X) uint8 semantic classes, values index ``class_names``.
        cell_mask: (Z, Y, X) bool, True inside cells (``labels != 0``).
        instances: (Z, Y, X) uint32 cell ids 1..n, 0 outside.
        class_names: names of the label values.
        spacing: (z, y, x) voxel size (unit-free unless given in the options).
    """

    image: np.ndarray
    labels: np.ndarray
    cell_mask: np.ndarray
    instances: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def class_fractions(self) -> dict[str, float]:
        """Fraction of all voxels in each class."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names))
        return {name: float(c) / self.labels.size for name, c in zip(self.class_names, counts)}


def _check_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) != s for s in shape):
        raise input_error("synthetic EM shape", "3 integers (Z, Y, X)", repr(shape), "Pass e.g. shape=(64, 256, 256)")
    if any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise input_error("synthetic EM shape", f"at least {MIN_SHAPE}", repr(tuple(shape)), "Use a larger volume")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _options(options: dict) -> EMOptions:
    return options_from_kwargs(EMOptions, options, "make_em_volume")


def make_em_volume(shape: tuple[int, int, int] = (64, 256, 256), seed: int = 0, **options) -> SyntheticEM:
    """Generate a seeded synthetic EM-like volume (see the module docstring for what it contains).

    Args:
        shape: (Z, Y, X), each at least (8, 32, 32).
        seed: seed of ``np.random.default_rng``; the same seed and options give the same volume.
        **options: fields of :class:`EMOptions` (e.g. ``n_cells``, ``noise``, ``blur_sigma``,
            ``misalignment``).

    With ``misalignment > 0`` the labels, instances and cell mask are shifted with their image slices, so
    the ground truth stays aligned with the pixels.
    """
    shape = _check_shape(tuple(shape))
    opts = _options(options)
    rng = np.random.default_rng(seed)

    regions = warped_voronoi(rng, shape, opts)
    instances = carve_outside(rng, regions, opts)
    labels = line_membranes(instances, opts)

    ideal = paint_base_textures(rng, labels)
    place_nuclei(rng, instances, labels, ideal, opts)
    place_mitochondria(rng, labels, ideal, opts)
    place_granules(rng, labels, ideal, opts)

    blurred = ndi.gaussian_filter(ideal, sigma=opts.blur_sigma)
    if opts.misalignment > 0:
        blurred, labels, instances = misalign_slices(rng, [blurred, labels, instances], opts.misalignment)
    image = form_image(rng, blurred, opts)
    return SyntheticEM(
        image=image,
        labels=labels,
        cell_mask=labels != OUTSIDE,
        instances=instances.astype(np.uint32),
        class_names=CLASS_NAMES,
        spacing=tuple(float(s) for s in opts.spacing),
    )


def write_em_volume(
    out_dir: str | Path, vol: SyntheticEM, betaseg_layout: bool = False, cell_name: str = "synthetic_c1"
) -> dict[str, Path]:
    """Write a synthetic volume as TIFF files into ``out_dir``; return {role: path}.

    Default layout: ``image.tif`` (uint8), ``labels.tif`` (uint8), ``cell_mask.tif`` (uint8 0/1),
    ``instances.tif`` (uint32), ``classes.json`` (class names, spacing, axes). With
    ``betaseg_layout=True`` the betaSeg files of one cell go flat into ``out_dir`` (pass
    ``root / cell_name`` for the one-folder-per-cell layout): ``<cell>_source.tif`` and the nucleus,
    mitochondria and granule masks plus ``<cell>_membrane_full_mask.tif`` = ``cell_mask``. Membrane voxels
    get no mask (betaSeg has no membrane class; they load back as cytoplasm), and golgi, centrioles and
    microtubules are not written, because the synthetic cells have none (see :mod:`micromae.data.betaseg`).

    Every file is written to a temporary sibling and renamed into place only when all of them are
    written (:func:`micromae.io.write_files_atomically`), so no file is ever left half written. Label and
    mask files are zlib-compressed; the image is not.
    """
    if betaseg_layout:
        masks = {
            "nucleus": vol.labels == NUCLEUS,
            "mitochondria": vol.labels == MITOCHONDRIA,
            "granules": vol.labels == GRANULES,
        }
        return write_betaseg_cell(out_dir, cell_name, vol.image, masks, vol.cell_mask)
    meta = {"class_names": list(vol.class_names), "spacing": list(vol.spacing), "axes": "ZYX"}
    arrays = {
        "image.tif": vol.image.astype(np.uint8),
        "labels.tif": vol.labels.astype(np.uint8),
        "cell_mask.tif": vol.cell_mask.astype(np.uint8),
        "instances.tif": vol.instances.astype(np.uint32),
    }
    written = write_files_atomically(out_dir, arrays, texts={"classes.json": json.dumps(meta, indent=2)},
                                     compress=("labels.tif", "cell_mask.tif", "instances.tif"))
    return {name.split(".")[0]: path for name, path in written.items()}


def read_em_volume(in_dir: str | Path) -> SyntheticEM:
    """Read a volume written by :func:`write_em_volume` (default layout) back into a :class:`SyntheticEM`."""
    in_dir = Path(in_dir)
    needed = ["image.tif", "labels.tif", "cell_mask.tif", "instances.tif", "classes.json"]
    missing = [n for n in needed if not (in_dir / n).is_file()]
    if missing:
        raise input_error(f"synthetic EM folder '{in_dir}'", f"files {needed}", f"{missing} missing",
                          "Write it with micromae.data.synthetic_em.write_em_volume")
    meta = json.loads((in_dir / "classes.json").read_text())
    arrays = {n: tifffile.imread(in_dir / n) for n in needed[:4]}
    shapes = {n: a.shape for n, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise input_error(f"synthetic EM folder '{in_dir}'", "files of one shape", repr(shapes),
                          "Rewrite the folder with write_em_volume")
    return SyntheticEM(
        image=arrays["image.tif"],
        labels=arrays["labels.tif"],
        cell_mask=arrays["cell_mask.tif"] > 0,
        instances=arrays["instances.tif"].astype(np.uint32),
        class_names=tuple(meta["class_names"]),
        spacing=tuple(float(s) for s in meta["spacing"]),
    )
