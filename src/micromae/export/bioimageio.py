"""``micromae export-bioimageio``: bioimage.io model packages (format 0.5) that bioimage.io tools run.

Two kinds of model (``pip install "micromae[bioimageio]"``):

- **MAESTER segmenter** (:func:`export_segmenter`): a pre-training checkpoint plus k-means centres
  (``micromae cluster``). Input ``raw`` ``(batch, channel=1, y, x)``, the raw intensities (float32; the
  pre-training's intensity range, computed from the sample image as ``micromae segment`` does, is in the
  model); outputs ``labels`` ``(batch, channel=1, y, x)`` (cluster ids) and ``embeddings`` ``(batch, D, y, x)``
  (the exact cover-and-stride pixel embeddings). Any image size (``y``, ``x`` parameterized from one block
  ``c * p``, step 1). Weights: ``pytorch_state_dict`` whose architecture source is
  :mod:`micromae.export.bioimageio_arch` (it imports micromae; ``environment.yaml`` lists it). No
  ``torchscript`` entry: the cover-and-stride lattice is computed from the image size in NumPy, so a trace
  would hold for one image size only.
- **Cell classifier** (:func:`export_classifier`): a classification fine-tuning checkpoint. Input ``crops``
  ``(batch, channel=C, y, x)`` at the training crop size; output ``probabilities`` ``(batch, channel=K)``
  named by class. With ``data.normalize=dtype`` a ``scale_linear`` pre-processing step divides raw integer
  crops by their type's maximum; otherwise crops must come scaled to [0, 1] as in training. Weights:
  ``pytorch_state_dict`` and ``torchscript`` (traced: the classifier's shapes are fixed).

The Mask R-CNN detector is not exported: it returns, per image, a variable number of boxes, scores and masks
(a list of dicts); format 0.5 can only describe such outputs with data-dependent index axes, which the
bioimage.io consumer tools do not run.

Each package holds ``rdf.yaml``, the weights, the test input and output (``.npy``: bioimageio.core's test
runs the model on the input and compares with the output), a cover image, a README (documentation),
authors, citations and a license, and is written atomically (a temporary zip renamed when complete).
"""

from __future__ import annotations

import getpass
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import micromae
from micromae.errors import input_error
from micromae.export import bioimageio_arch
from micromae.export.bioimageio_arch import CellClassifier, MaesterSegmenter
from micromae.data.channel_norm import normalize_channels
from micromae.figures import save_figure
from micromae.io import open_volume
from micromae.models.pretrained import encoder_fields, load_encoder
from micromae.runtime import say
from micromae.segment.cluster import ClusterModel
from micromae.segment.cover_stride import block_size
from micromae.segment.pipeline import open_input_volume, volume_range
from micromae.train.classify import load_classifier

MAE_CITE = ("He K., Chen X., Xie S., Li Y., Dollár P., Girshick R. Masked Autoencoders Are Scalable Vision "
            "Learners. CVPR 2022.", "https://arxiv.org/abs/2111.06377")
MAESTER_CITE = ("Xie R., Pang K., Bader G. D., Wang B. MAESTER: Masked Autoencoder Guided Segmentation at Pixel "
                "Resolution for Accurate, Self-Supervised Subcellular Structure Recognition. CVPR 2023.",
                "https://openaccess.thecvf.com/CVPR2023")
ENVIRONMENT = """name: micromae
channels: [conda-forge, nodefaults]
dependencies:
  - python>=3.10
  - pip
  - pip:
      - micromae=={version}
      - torch=={torch}
"""


@dataclass
class PackageInfo:
    """What every package says about itself: ``name``, ``authors`` (names), ``license`` (SPDX id),
    ``description``, ``tags``."""

    name: str
    description: str
    authors: Sequence[str] = ()
    license: str = "MIT"
    tags: Sequence[str] = field(default_factory=list)


def _spec():
    """bioimageio.spec's model 0.5 module, or a clear error naming the extra."""
    try:
        from bioimageio.spec.model import v0_5
    except ImportError as exc:
        raise input_error("bioimageio.spec", "the bioimageio extra installed", "no bioimageio.spec",
                          'pip install "micromae[bioimageio]"') from exc
    return v0_5


def _torch_version() -> str:
    return torch.__version__.split("+")[0]


def _common(v, info: PackageInfo, work: Path, doc: str, cover: Path, cites: Sequence[tuple[str, str]]) -> dict:
    (work / "README.md").write_text(doc)
    authors = list(info.authors) or [getpass.getuser()]
    return dict(
        name=info.name, description=info.description,
        authors=[v.Author(name=a) for a in authors],
        cite=[v.CiteEntry(text=text, url=url) for text, url in cites],
        license=info.license, documentation=v.FileDescr(source=work / "README.md"), covers=[v.FileDescr(source=cover)],
        tags=["micromae", *info.tags], version="0.1.0",
        config={"micromae": {"version": micromae.__version__}},
    )


def _write(descr: Any, output: Path) -> Path:
    """Package ``descr`` into ``output`` (a .zip), atomically; raise if it does not validate."""
    from bioimageio.spec import save_bioimageio_package

    if descr.validation_summary.status == "failed":
        raise input_error("bioimage.io description", "a valid model 0.5 description",
                          descr.validation_summary.format(), "Report this as a bug in micromae")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial.zip")
    if tmp.exists():
        tmp.unlink()
    save_bioimageio_package(descr, output_path=tmp)
    if output.exists():
        output.unlink()
    os.replace(tmp, output)
    return output


def _check_output(output: str | Path, overwrite: bool) -> Path:
    output = Path(output)
    if output.suffix != ".zip":
        raise input_error("--output", "a .zip file (the bioimage.io package)", f"'{output}'", "e.g. model.zip")
    if output.exists() and not overwrite:
        raise input_error("--output", "a path that does not exist yet", f"'{output}' exists",
                          "Choose another --output or pass --overwrite")
    return output


def _architecture(v, work: Path, callable_name: str, kwargs: dict[str, Any]):
    source = work / "micromae_bioimageio_arch.py"
    shutil.copyfile(bioimageio_arch.__file__, source)
    return v.ArchitectureFromFileDescr(source=source, callable=callable_name, kwargs=kwargs)


def _environment(v, work: Path):
    path = work / "environment.yaml"
    path.write_text(ENVIRONMENT.format(version=micromae.__version__, torch=_torch_version()))
    return v.FileDescr(source=path)


# ------------------------------------------------------------------------------------------------------------
# MAESTER segmenter


def _segmenter_cover(image: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    axes[0].imshow(image, cmap="gray")
    axes[1].imshow(labels, cmap="tab10", interpolation="nearest")
    for ax, title in zip(axes, ("input", "clusters")):
        ax.set_title(title)
        ax.axis("off")
    return save_figure(fig, path)


def export_segmenter(checkpoint: str | Path, centres: str | Path | None, sample: Any, output: str | Path,
                     info: PackageInfo | None = None, axes: str | None = None, key: str | None = None,
                     test_size: int = 64, central_tokens: int | None = None, mode: str = "exact",
                     overwrite: bool = False) -> Path:
    """Write a bioimage.io package of a MAESTER segmenter (see the module docstring).

    sample: the image or volume the test input is cut from (a ``test_size`` square of its middle slice,
    smaller if the image is), as for ``micromae segment --input``; centres: ``micromae cluster``'s .npz.
    """
    v = _spec()
    output = _check_output(output, overwrite)
    if centres is None:
        raise input_error("--centres", "the k-means centres of this checkpoint (.npz)", "none",
                          "Fit them first: micromae cluster --checkpoint CKPT --input IMAGE --output centres.npz --k 6")
    model_centres = ClusterModel.load(centres)
    encoder, meta = load_encoder(checkpoint)
    fields = encoder_fields(encoder)
    if fields["in_chans"] != 1:
        raise input_error(f"checkpoint '{checkpoint}'", "a one-channel MAESTER encoder",
                          f"{fields['in_chans']} input channels", "Export a classifier for multi-channel models")
    if model_centres.dim != fields["embed_dim"]:
        raise input_error(f"centres '{centres}'", f"{fields['embed_dim']}-dimensional centres (the encoder's width)",
                          f"{model_centres.dim} dimensions", "Fit centres with this checkpoint (micromae cluster)")
    if model_centres.meta.get("checkpoint_sha256") not in (None, meta.sha256):
        raise input_error(f"centres '{centres}'", "centres fitted with this checkpoint",
                          "centres of another checkpoint", "Fit centres with this checkpoint (micromae cluster)")
    central_tokens = central_tokens or model_centres.meta.get("central_tokens")
    mode = model_centres.meta.get("mode", mode)
    volume = open_input_volume(sample, axes, key)
    rng = volume_range(volume, meta.config)
    z = volume.shape[0] // 2
    side_y, side_x = min(test_size, volume.shape[1]), min(test_size, volume.shape[2])
    y0, x0 = (volume.shape[1] - side_y) // 2, (volume.shape[2] - side_x) // 2
    test_in = np.asarray(volume[z, y0:y0 + side_y, x0:x0 + side_x], dtype=np.float32)[None, None]
    kwargs = {"encoder": fields, "k": model_centres.k, "intensity_range": list(rng),
              "central_tokens": central_tokens, "mode": mode, "pad_mode": "reflect", "batch_size": 256}
    model = MaesterSegmenter(**kwargs)
    model.encoder.load_state_dict(encoder.state_dict())
    model.centres.copy_(torch.from_numpy(model_centres.centers))
    model.eval()
    with torch.no_grad():
        labels, feats = model(torch.from_numpy(test_in))
    info = info or PackageInfo(name=f"micromae MAESTER segmenter k{model_centres.k}",
                               description="Self-supervised segmentation of volume EM (MAESTER): exact pixel "
                                           "embeddings of a masked-autoencoder ViT, nearest k-means centre.")
    block = block_size(encoder, central_tokens, mode)
    with tempfile.TemporaryDirectory(prefix="micromae-bioimageio-") as tmp:
        work = Path(tmp)
        np.save(work / "test_raw.npy", test_in)
        np.save(work / "test_labels.npy", labels.numpy())
        np.save(work / "test_embeddings.npy", feats.numpy())
        torch.save(model.state_dict(), work / "weights.pt")
        cover = _segmenter_cover(test_in[0, 0], labels.numpy()[0, 0], work / "cover.png")
        doc = SEGMENTER_DOC.format(name=info.name, k=model_centres.k, checkpoint=Path(checkpoint).name,
                                   sha=meta.sha256[:12], lo=rng[0], hi=rng[1], mode=mode, dim=fields["embed_dim"],
                                   central=central_tokens or "default", block=block, k_minus=model_centres.k - 1)
        size = v.ParameterizedSize(min=block, step=1)
        raw = v.InputTensorDescr(
            id=v.TensorId("raw"),
            axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier("raw")]),
                  v.SpaceInputAxis(id=v.AxisId("y"), size=size), v.SpaceInputAxis(id=v.AxisId("x"), size=size)],
            test_tensor=v.FileDescr(source=work / "test_raw.npy"),
            data=v.IntervalOrRatioDataDescr(type="float32"),
            description=f"raw intensities; the model maps [{rng[0]:g}, {rng[1]:g}] to [0, 1] as in pre-training")
        same = {a: v.SizeReference(tensor_id=v.TensorId("raw"), axis_id=v.AxisId(a)) for a in ("y", "x")}
        out_labels = v.OutputTensorDescr(
            id=v.TensorId("labels"),
            axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier("cluster")]),
                  v.SpaceOutputAxis(id=v.AxisId("y"), size=same["y"]),
                  v.SpaceOutputAxis(id=v.AxisId("x"), size=same["x"])],
            test_tensor=v.FileDescr(source=work / "test_labels.npy"),
            data=v.NominalOrOrdinalDataDescr(values=list(range(model_centres.k)), type="int64"),
            description="the nearest k-means centre of each pixel's embedding")
        out_feats = v.OutputTensorDescr(
            id=v.TensorId("embeddings"),
            axes=[v.BatchAxis(),
                  v.ChannelAxis(channel_names=[v.Identifier(f"d{i}") for i in range(fields["embed_dim"])]),
                  v.SpaceOutputAxis(id=v.AxisId("y"), size=same["y"]),
                  v.SpaceOutputAxis(id=v.AxisId("x"), size=same["x"])],
            test_tensor=v.FileDescr(source=work / "test_embeddings.npy"),
            data=v.IntervalOrRatioDataDescr(type="float32"),
            description="exact pixel embeddings (the final-layer token centred on each pixel)")
        weights = v.WeightsDescr(pytorch_state_dict=v.PytorchStateDictWeightsDescr(
            source=work / "weights.pt", architecture=_architecture(v, work, "MaesterSegmenter", kwargs),
            pytorch_version=v.Version(_torch_version()), dependencies=_environment(v, work)))
        descr = v.ModelDescr(inputs=[raw], outputs=[out_labels, out_feats], weights=weights,
                             **_common(v, info, work, doc, cover, (MAESTER_CITE, MAE_CITE)))
        out = _write(descr, output)
    say(f"wrote the bioimage.io package {out} (MAESTER segmenter, k = {model_centres.k})")
    return out


SEGMENTER_DOC = """# {name}

A MAESTER segmenter exported by micromae: a masked-autoencoder ViT (width {dim}) pre-trained without labels,
which gives every pixel the final-layer token centred exactly on it (cover-and-stride, mode `{mode}`,
central tokens {central}), and the {k} k-means centres fitted on such embeddings; each pixel gets the id of
the nearest centre.

- checkpoint: `{checkpoint}` (SHA-256 {sha}...)
- input `raw`: one-channel image (batch, channel, y, x), raw intensities as float32; the model scales
  [{lo:g}, {hi:g}] to [0, 1] (the pre-training's normalisation); any size of at least {block} px a side
- outputs: `labels` (cluster ids 0..{k_minus}) and `embeddings` (the pixel embeddings)

Clusters are unnamed: map them to classes with a few reference labels (micromae evaluate segmentation) or
by eye (the micromae napari plugin's Name clusters widget).

Run it: `bioimageio predict model.zip --inputs image.npy` or, in Python, `bioimageio.core.predict`. The
architecture imports micromae (`pip install micromae`; see environment.yaml).

## Validation

`bioimageio test model.zip` runs the model on `test_raw.npy` and compares with `test_labels.npy` and
`test_embeddings.npy` (written by micromae from the same model; micromae's test suite runs this check).
"""


# ------------------------------------------------------------------------------------------------------------
# cell classifier


def _classifier_cover(crop: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    from micromae.figures import channels_to_rgb

    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    axes[0].imshow(channels_to_rgb(crop))
    axes[0].set_title("crop")
    axes[0].axis("off")
    axes[1].barh(list(classes), probs)
    axes[1].set_title("class probabilities")
    return save_figure(fig, path)


def export_classifier(checkpoint: str | Path, sample: str | Path, output: str | Path,
                      info: PackageInfo | None = None, axes: str | None = None, overwrite: bool = False) -> Path:
    """Write a bioimage.io package of a fine-tuned cell classifier (see the module docstring).

    sample: one single-cell crop (a multi-channel TIFF such as those of ``micromae data synth-mif``'s
    ``cells/``) for the test input; it is resized to the training crop size as in training.
    """
    v = _spec()
    output = _check_output(output, overwrite)
    classifier, cfg = load_classifier(checkpoint)
    size = int(classifier.img_size[0])
    crop_raw, crop = _read_crop(sample, cfg, axes or cfg.data.axes, size, classifier.in_chans)
    classes = list(cfg.data.classes or [f"class_{i}" for i in range(cfg.num_classes)])
    fields = encoder_fields(classifier.encoder)
    kwargs = {"encoder": fields, "num_classes": int(cfg.num_classes)}
    model = CellClassifier(**kwargs)
    model.classifier.load_state_dict(classifier.state_dict())
    model.eval()
    dtype_scaled = cfg.data.normalize == "dtype" and np.issubdtype(crop_raw.dtype, np.integer)
    test_in = (crop_raw if dtype_scaled else crop).astype(np.float32)[None]
    with torch.no_grad():
        probs = model(torch.from_numpy(crop.astype(np.float32))[None]).numpy()
    info = info or PackageInfo(name=f"micromae cell classifier ({len(classes)} classes)",
                               description="Cell-type classification of multiplexed fluorescence crops with a "
                                           "fine-tuned masked-autoencoder ViT (micromae, DAMA protocol).")
    with tempfile.TemporaryDirectory(prefix="micromae-bioimageio-") as tmp:
        work = Path(tmp)
        np.save(work / "test_crops.npy", test_in)
        np.save(work / "test_probabilities.npy", probs)
        torch.save(model.state_dict(), work / "weights.pt")
        traced = torch.jit.trace(model, torch.from_numpy(crop.astype(np.float32))[None])
        traced.save(str(work / "weights_torchscript.pt"))
        cover = _classifier_cover(crop, probs[0], classes, work / "cover.png")
        pre = []
        if dtype_scaled:
            pre = [v.ScaleLinearDescr(kwargs=v.ScaleLinearKwargs(gain=1.0 / float(np.iinfo(crop_raw.dtype).max)))]
        channel_names = [v.Identifier(f"c{i}") for i in range(crop.shape[0])]
        crops_in = v.InputTensorDescr(
            id=v.TensorId("crops"),
            axes=[v.BatchAxis(), v.ChannelAxis(channel_names=channel_names),
                  v.SpaceInputAxis(id=v.AxisId("y"), size=size), v.SpaceInputAxis(id=v.AxisId("x"), size=size)],
            test_tensor=v.FileDescr(source=work / "test_crops.npy"),
            data=v.IntervalOrRatioDataDescr(type="float32"), preprocessing=pre,
            description=(f"single-cell crops, {size} x {size} px, channels in training order; raw "
                         f"{crop_raw.dtype} values (scaled by the pre-processing)" if dtype_scaled else
                         f"single-cell crops, {size} x {size} px, each channel scaled to [0, 1] as in training "
                         f"(data.normalize={cfg.data.normalize})"))
        probs_out = v.OutputTensorDescr(
            id=v.TensorId("probabilities"),
            axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier(_identifier(c)) for c in classes])],
            test_tensor=v.FileDescr(source=work / "test_probabilities.npy"),
            data=v.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
            description="softmax probability of each cell type: " + ", ".join(classes))
        weights = v.WeightsDescr(
            pytorch_state_dict=v.PytorchStateDictWeightsDescr(
                source=work / "weights.pt", architecture=_architecture(v, work, "CellClassifier", kwargs),
                pytorch_version=v.Version(_torch_version()), dependencies=_environment(v, work)),
            torchscript=v.TorchscriptWeightsDescr(source=work / "weights_torchscript.pt",
                                                  pytorch_version=v.Version(_torch_version()),
                                                  parent="pytorch_state_dict"))
        doc = CLASSIFIER_DOC.format(name=info.name, checkpoint=Path(checkpoint).name, size=size,
                                    chans=crop.shape[0], classes=", ".join(classes),
                                    normalize=cfg.data.normalize)
        descr = v.ModelDescr(inputs=[crops_in], outputs=[probs_out], weights=weights,
                             **_common(v, info, work, doc, cover, (MAE_CITE,)))
        out = _write(descr, output)
    say(f"wrote the bioimage.io package {out} (cell classifier, {len(classes)} classes)")
    return out


def _read_crop(sample: str | Path, cfg: Any, axes: str | None, size: int, in_chans: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """A sample crop ``(C, size, size)`` as stored and scaled to [0, 1] as the classifier's training scaled it."""
    with open_volume(sample, axes=axes, check=False) as volume:
        raw = volume.read()
    raw = raw[None] if raw.ndim == 2 else raw
    if raw.ndim != 3 or raw.shape[0] != in_chans or raw.shape[1:] != (size, size):
        raise input_error(f"sample crop '{sample}'", f"a crop of {in_chans} channels x {size} x {size} px (the "
                          "classifier's channels and training crop size)", f"shape {raw.shape}",
                          "Pass one crop of the data the classifier was trained on, at its crop size")
    if cfg.data.channels:
        raise input_error("classifier", "a classifier trained on every channel of its crops",
                          f"data.channels={cfg.data.channels}", "Export is not supported for channel subsets yet")
    if cfg.data.normalize == "channel_stats":
        raise input_error("classifier", "data.normalize dtype, percentile or minmax", "channel_stats",
                          "Export is not supported for folder-wide channel ranges yet")
    return raw, normalize_channels(raw, cfg.data.normalize, cfg.data.percentiles)


def _identifier(name: str) -> str:
    """A class name as a bioimage.io identifier (letters, digits, underscores)."""
    out = "".join(ch if ch.isalnum() else "_" for ch in name)
    return out if out and not out[0].isdigit() else f"c_{out}"


CLASSIFIER_DOC = """# {name}

A cell-type classifier fine-tuned with micromae (ViT encoder, patch-token average, LayerNorm, linear head;
softmax here) from checkpoint `{checkpoint}`.

- input `crops`: single-cell crops (batch, channel, y, x), {chans} channels, {size} x {size} px
  (training normalisation: `{normalize}`)
- output `probabilities`: one per class: {classes}

Run it: `bioimageio predict model.zip --inputs crops.npy`, or `bioimageio.core.predict` in Python; the
torchscript weights need only PyTorch, the state-dict weights import micromae (environment.yaml).
"""

