"""What pre-training bought: a checkpoint's pixel embeddings against random-init encoders and hand-made features.

A MAESTER result mixes two things: what the encoder learned, and what the cover-and-stride pipeline (every
pixel gets the embedding of a token centred on it, then k-means) gives with any encoder. This module measures
the first by running the same pipeline with **random-init encoders of the same shape** (the MAE init of
pre-training step 0, one per seed) and with **hand-made features** (scikit-image's
``multiscale_basic_features``: Gaussian intensity, Sobel edges and Hessian-eigenvalue texture at several
scales, the ilastik-style stack), on the same planes, the same pixels and the same reference:

- **k-means**: fitted on ``n_fit`` random labelled pixels of the evaluation planes (the same pixels for every
  feature set), applied to every labelled pixel, clusters mapped to classes by Hungarian matching with the
  leftovers merged (as ``micromae evaluate segmentation``); the mean Dice over the classes present.
- **pixel probe**: a multinomial logistic regression (scikit-learn, on standardised features) fitted on
  ``n_probe`` labelled pixels of the training planes and scored (mean Dice, balanced accuracy) on every
  labelled pixel of the held-out planes. Planes alternate between training and held-out; a single 2-D image is
  split into a left (training) and a right (held-out) half. Held-out pixels never enter the training set.

The **gain** is the checkpoint's score minus the mean over the random encoders; the spread (standard deviation,
min and max over the seeds) says how large a gain has to be to mean something.

Encoder embeddings are used as they are (what ``micromae segment`` clusters); the hand-made features, whose
scales differ by orders of magnitude, are standardised before k-means.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import micromae
from micromae.errors import input_error
from micromae.evaluate.metrics import contingency, evaluate_table, segmentation_scores
from micromae.figures import save_figure
from micromae.io import atomic_path, check_output
from micromae.models.pretrained import encoder_fields
from micromae.models.vit import ViTEncoder
from micromae.runtime import eval_mode, say
from micromae.segment.cluster import fit_kmeans
from micromae.segment.cover_stride import embed_pixels

__all__ = ["PretrainingEval", "controls_key", "evaluate_pretraining", "evaluation_pixels", "handmade_features",
           "n_handmade_channels", "pretraining_figure", "pretraining_markdown", "random_encoder_like",
           "run_evaluate_pretraining", "select_planes", "split_train_test", "write_random_init_checkpoint"]

FeatureFn = Callable[[np.ndarray], np.ndarray]  # plane (H, W) in [0, 1] -> features (H, W, D) float32


@dataclass
class PretrainingEval:
    """Settings of :func:`evaluate_pretraining` (the defaults are what ``micromae evaluate pretraining`` uses).

    ks: the k's of the k-means scores. n_random: random-init encoders (seeds ``random_seed0 + i``).
    planes: evaluation planes (Z slices of a volume, spread evenly over the labelled ones; a 2-D image has
    one). n_fit: pixels the k-means are fitted on. n_probe: labelled training pixels of the probe.
    min_probe_pixels: fewer labelled training pixels than this is an error. ignore: reference value that is
    not a label (partial labels; e.g. 0 = outside the cells). central_tokens: the cover-and-stride setting.
    sigma_min / sigma_max: scales of the hand-made features.
    """

    ks: tuple[int, ...] = (6, 8, 10)
    n_random: int = 3
    random_seed0: int = 1000
    planes: int = 4
    n_fit: int = 50_000
    n_probe: int = 20_000
    min_probe_pixels: int = 200
    ignore: int | None = None
    central_tokens: int | None = None
    sigma_min: float = 0.5
    sigma_max: float = 8.0
    handmade: bool = True
    seed: int = 0
    batch_size: int = 256
    class_names: list[str] | None = field(default=None)


# ---------------------------------------------------------------------------------------------- features
def random_encoder_like(encoder: nn.Module, seed: int) -> ViTEncoder:
    """A ViT encoder of ``encoder``'s shape, freshly initialised (MAE init) from ``torch.manual_seed(seed)``,
    on ``encoder``'s device, in eval mode. The global RNG state is restored afterwards."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        fresh = ViTEncoder(**encoder_fields(encoder))
    finally:
        torch.random.set_rng_state(state)
    device = next(encoder.parameters()).device
    return fresh.to(device).eval()


def write_random_init_checkpoint(checkpoint: str | Path, seed: int, output: str | Path) -> Path:
    """A checkpoint like ``checkpoint`` (same config, so the same scaling and shape) whose encoder is freshly
    initialised (:func:`random_encoder_like`), at step 0: the control any command that takes a checkpoint
    (``micromae segment``, ``cluster``, ``embed``, fine-tuning) can run as "the same pipeline, random init"."""
    from micromae.models.pretrained import load_checkpoint, load_encoder

    encoder, meta = load_encoder(checkpoint)
    fresh = random_encoder_like(encoder, seed)
    state = {"model": {f"encoder.{k}": v for k, v in fresh.state_dict().items()}, "step": 0,
             "config": load_checkpoint(checkpoint).get("config") or meta.config,
             "extra": {"random_init_seed": int(seed), "shape_of": str(checkpoint), "shape_of_sha256": meta.sha256},
             "micromae_version": micromae.__version__}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output, overwrite=True) as tmp:
        torch.save(state, tmp)
    return output


def handmade_features(plane: np.ndarray, sigma_min: float = 0.5, sigma_max: float = 8.0) -> np.ndarray:
    """scikit-image's multiscale intensity / edge / texture stack of a plane in [0, 1]: (H, W, 4 * n_sigmas).

    Per scale (``sigma_min`` doubling up to ``sigma_max``): Gaussian-smoothed intensity, Sobel edge magnitude
    and the two Hessian eigenvalues.
    """
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(np.asarray(plane, np.float32), intensity=True, edges=True, texture=True,
                                     sigma_min=sigma_min, sigma_max=sigma_max).astype(np.float32)


def n_handmade_channels(sigma_min: float = 0.5, sigma_max: float = 8.0) -> int:
    """Channels of :func:`handmade_features`: 4 per scale (scikit-image's count of scales)."""
    n_sigmas = int(np.floor(np.log2(sigma_max) - np.log2(sigma_min) + 1))
    return 4 * n_sigmas


def encoder_features(encoder: nn.Module, central_tokens: int | None = None, batch_size: int = 256) -> FeatureFn:
    """The exact cover-and-stride embedding of every pixel, as (H, W, D)."""

    def features(plane: np.ndarray) -> np.ndarray:
        with eval_mode(encoder):
            emb = embed_pixels(encoder, plane, central_tokens=central_tokens, mode="exact", batch_size=batch_size)
        return emb.permute(1, 2, 0).float().cpu().contiguous().numpy()

    return features


# ---------------------------------------------------------------------------------------- planes, pixels
def select_planes(reference: np.ndarray, n: int, ignore: int | None) -> list[int]:
    """Indices of up to ``n`` Z planes holding labelled pixels, spread evenly (a 2-D reference: [0])."""
    if reference.ndim == 2:
        return [0]
    labelled = [z for z in range(reference.shape[0])
                if ignore is None or bool((np.asarray(reference[z]) != ignore).any())]
    if not labelled:
        raise input_error("reference", "some labelled pixels", f"only the ignore value {ignore}",
                          "Pass a reference with labels, or another --ignore value")
    if n >= len(labelled):
        return labelled
    pick = np.linspace(0, len(labelled) - 1, n).round().astype(int)
    return [labelled[i] for i in sorted(set(pick.tolist()))]


def split_train_test(n_planes: int, width: int) -> tuple[list[tuple[int, slice]], list[tuple[int, slice]]]:
    """(train, test) as (plane position, column slice): planes alternate; one plane is split in halves."""
    every = slice(0, width)
    if n_planes >= 2:
        return ([(i, every) for i in range(0, n_planes, 2)], [(i, every) for i in range(1, n_planes, 2)])
    half = width // 2
    return [(0, slice(0, half))], [(0, slice(half, width))]


@dataclass
class _Pixels:
    """Pixel positions (plane position, y, x) and their reference classes."""

    plane: np.ndarray
    y: np.ndarray
    x: np.ndarray
    cls: np.ndarray

    def take(self, idx: np.ndarray) -> _Pixels:
        return _Pixels(self.plane[idx], self.y[idx], self.x[idx], self.cls[idx])

    def __len__(self) -> int:
        return len(self.cls)


def _labelled(ref_planes: list[np.ndarray], regions: Sequence[tuple[int, slice]], ignore: int | None,
              mask_planes: list[np.ndarray] | None) -> _Pixels:
    parts = []
    for pos, cols in regions:
        ref = ref_planes[pos]
        keep = np.zeros(ref.shape, bool)
        keep[:, cols] = True
        if ignore is not None:
            keep &= ref != ignore
        if mask_planes is not None:
            keep &= mask_planes[pos] != 0
        y, x = np.nonzero(keep)
        parts.append((np.full(len(y), pos), y, x, ref[y, x]))
    cat = [np.concatenate([p[i] for p in parts]) for i in range(4)]
    return _Pixels(cat[0].astype(np.int64), cat[1].astype(np.int64), cat[2].astype(np.int64),
                   cat[3].astype(np.int64))


def _gather(feats: list[np.ndarray], px: _Pixels) -> np.ndarray:
    out = np.empty((len(px), feats[0].shape[-1]), np.float32)
    for pos in np.unique(px.plane):
        sel = px.plane == pos
        out[sel] = feats[pos][px.y[sel], px.x[sel]]
    return out


def evaluation_pixels(ref_planes: list[np.ndarray], mask_planes: list[np.ndarray] | None, s: PretrainingEval,
                      names: list[str]) -> dict[str, _Pixels]:
    """The pixels of an evaluation: ``all`` labelled ones (k-means scoring), ``fit`` (k-means fitting, drawn
    from ``all``), ``train`` (probe fitting, drawn from the training planes or half) and ``test`` (every
    labelled held-out pixel; disjoint from ``train`` by construction). Raises for too few labelled pixels or a
    held-out class absent from the training pixels."""
    rng = np.random.default_rng(s.seed)
    all_regions = [(i, slice(0, ref_planes[0].shape[1])) for i in range(len(ref_planes))]
    all_px = _labelled(ref_planes, all_regions, s.ignore, mask_planes)
    if len(all_px) < max(s.ks, default=2):
        raise input_error("reference", f"at least {max(s.ks)} labelled pixels in the evaluation planes",
                          f"{len(all_px)}", "Label more pixels, or check --ignore and --mask")
    fit_px = all_px.take(np.sort(rng.choice(len(all_px), min(s.n_fit, len(all_px)), replace=False)))
    train_regions, test_regions = split_train_test(len(ref_planes), ref_planes[0].shape[1])
    train_all = _labelled(ref_planes, train_regions, s.ignore, mask_planes)
    test_px = _labelled(ref_planes, test_regions, s.ignore, mask_planes)
    if len(train_all) < s.min_probe_pixels or len(test_px) < s.min_probe_pixels:
        raise input_error("labelled pixels for the probe",
                          f"at least {s.min_probe_pixels} in the training and in the held-out planes",
                          f"{len(train_all)} training, {len(test_px)} held-out",
                          "Label more pixels (or more planes), or lower min_probe_pixels")
    train_px = train_all.take(np.sort(rng.choice(len(train_all), min(s.n_probe, len(train_all)), replace=False)))
    test_classes, train_classes = set(np.unique(test_px.cls).tolist()), set(np.unique(train_px.cls).tolist())
    if missing := sorted(test_classes - train_classes):
        raise input_error("probe training pixels", "every class of the held-out pixels",
                          f"classes {[names[c] for c in missing]} missing from the training pixels",
                          "Label these classes in the training planes too, or raise n_probe / planes")
    return {"all": all_px, "fit": fit_px, "train": train_px, "test": test_px}


# --------------------------------------------------------------------------------------------- scoring
def _kmeans_scores(feats: list[np.ndarray], fit_px: _Pixels, all_px: _Pixels, ks: Sequence[int],
                   names: list[str], standardise: bool, seed: int) -> dict[str, Any]:
    fit_x, all_x = _gather(feats, fit_px), _gather(feats, all_px)
    if standardise:
        mu, sd = fit_x.mean(0), fit_x.std(0) + 1e-6
        fit_x, all_x = (fit_x - mu) / sd, (all_x - mu) / sd
    out = {}
    for k in ks:
        model = fit_kmeans(fit_x, k, seed=seed)
        table = contingency(model.predict(all_x), all_px.cls, n_pred=k, n_ref=len(names))
        res = evaluate_table(table, names)
        scores = res["hungarian"]["scores"]
        out[str(k)] = {"mean_dice": scores["mean_dice"],
                       "dice": {c: v["dice"] for c, v in scores["per_class"].items() if v["n_ref"] > 0},
                       "ari": res["clusters"]["ari"]}
    return out


def _probe_scores(feats: list[np.ndarray], train_px: _Pixels, test_px: _Pixels, names: list[str],
                  seed: int) -> dict[str, Any]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, tol=1e-3, random_state=seed))
    with warnings.catch_warnings():  # a probe stopped at max_iter is still a fair (and equal) comparison
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(_gather(feats, train_px), train_px.cls)
    pred = probe.predict(_gather(feats, test_px))
    scores = segmentation_scores(pred=pred, ref=test_px.cls) if len(names) == 0 else segmentation_scores(
        contingency(pred, test_px.cls, n_pred=len(names), n_ref=len(names)), names)
    return {"mean_dice": scores["mean_dice"],
            "dice": {c: v["dice"] for c, v in scores["per_class"].items() if v["n_ref"] > 0},
            "balanced_accuracy": float(balanced_accuracy_score(test_px.cls, pred)),
            "accuracy": float((pred == test_px.cls).mean())}


def _summary(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "values": [float(v) for v in arr]}


def _headline(scores: dict[str, Any], ks: Sequence[int]) -> dict[str, float]:
    """{"kmeans_k6": ..., ..., "probe": ...}: the mean Dice figures of one feature set."""
    row = {f"kmeans_k{k}": scores["kmeans"][str(k)]["mean_dice"] for k in ks}
    row["probe"] = scores["probe"]["mean_dice"]
    return row


# ------------------------------------------------------------------------------------------------ main
def evaluate_pretraining(encoder: nn.Module, image: np.ndarray, reference: np.ndarray,
                         settings: PretrainingEval | None = None, mask: np.ndarray | None = None,
                         progress: bool = True, controls: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score ``encoder`` against random-init encoders of its shape and hand-made features.

    image: (Z, Y, X) or (Y, X), already scaled to [0, 1] (float). reference: integer classes of the same
    shape (``settings.ignore`` = unlabelled). mask: optional, same shape, nonzero = score here. controls: an
    earlier result on the same data with the same settings and an encoder of the same shape (its
    ``controls_key`` must match): its random-init and hand-made rows are reused instead of recomputed, which
    is how a training run scores checkpoint after checkpoint cheaply. Returns a JSON-serialisable dict (see the
    module docstring); ``result["gain"]`` holds checkpoint minus random mean.
    """
    s = settings or PretrainingEval()
    image, reference = np.asarray(image), np.asarray(reference)
    if image.ndim not in (2, 3):
        raise input_error("image", "a 2-D (Y, X) image or a 3-D (Z, Y, X) volume", f"shape {image.shape}",
                          "Pick one channel / one volume")
    if reference.shape != image.shape:
        raise input_error("reference", f"the image's shape {image.shape}", f"shape {reference.shape}",
                          "Pass reference labels of the same size as the image (one class per pixel)")
    if mask is not None and np.asarray(mask).shape != image.shape:
        raise input_error("mask", f"the image's shape {image.shape}", f"shape {np.asarray(mask).shape}",
                          "Pass a mask of the same size as the image")
    if reference.dtype.kind not in "biu":
        raise input_error("reference", "integer class labels", f"dtype {reference.dtype}",
                          "Pass a label image (one integer class per pixel), not an intensity image")
    if s.n_random < 1 or min(s.ks, default=0) < 2 or s.planes < 1:
        raise input_error("settings", "n_random >= 1, every k >= 2, planes >= 1",
                          f"n_random={s.n_random}, ks={list(s.ks)}, planes={s.planes}", "Fix the arguments")
    vol = image[None] if image.ndim == 2 else image
    ref = reference[None] if reference.ndim == 2 else reference
    msk = None if mask is None else (np.asarray(mask)[None] if image.ndim == 2 else np.asarray(mask))
    planes = select_planes(ref, s.planes, s.ignore)
    ref_planes = [np.asarray(ref[z]).astype(np.int64) for z in planes]
    mask_planes = None if msk is None else [np.asarray(msk[z]) for z in planes]
    # classes 0..largest label; the ignore value (e.g. 255 = unlabelled) is not a class
    n_cls = 1 + max(int((r if s.ignore is None else r[r != s.ignore]).max(initial=0)) for r in ref_planes)
    names = list(s.class_names) if s.class_names else [f"class {i}" for i in range(n_cls)]
    if len(names) < n_cls:
        raise input_error("class names", f"at least {n_cls} names (the reference's classes)", str(len(names)),
                          "Give one name per class value")

    px = evaluation_pixels(ref_planes, mask_planes, s, names)
    all_px, fit_px, train_px, test_px = px["all"], px["fit"], px["train"], px["test"]
    planes_01 = [np.asarray(vol[z], np.float32) for z in planes]

    def score(fn: FeatureFn, standardise: bool, label: str) -> dict[str, Any]:
        t0 = time.time()
        feats = [fn(p) for p in planes_01]
        t1 = time.time()
        out = {"kmeans": _kmeans_scores(feats, fit_px, all_px, s.ks, names, standardise, s.seed),
               "probe": _probe_scores(feats, train_px, test_px, names, s.seed),
               "feature_dim": int(feats[0].shape[-1]), "feature_seconds": round(t1 - t0, 2),
               "score_seconds": round(time.time() - t1, 2)}
        if progress:
            head = _headline(out, s.ks)
            say(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in head.items()))
        return out

    key = controls_key(encoder, planes_01, ref_planes, s)
    if controls is not None and controls.get("controls_key") != key:
        raise input_error("controls", "a result on the same data, settings and encoder shape",
                          "one computed on something else", "Recompute the controls (pass controls=None)")
    result: dict[str, Any] = {
        "controls_key": key,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "planes": planes, "class_names": names, "n_labelled": len(all_px), "n_fit": len(fit_px),
        "n_probe_train": len(train_px), "n_probe_test": len(test_px),
        "split": "alternate planes" if len(planes) >= 2 else "left half / right half",
    }
    result["pretrained"] = score(encoder_features(encoder, s.central_tokens, s.batch_size), False, "checkpoint")
    if controls is not None:
        randoms = controls["random"]
    else:
        randoms = []
        for i in range(s.n_random):
            rand = random_encoder_like(encoder, s.random_seed0 + i)
            randoms.append(score(encoder_features(rand, s.central_tokens, s.batch_size), False,
                                 f"random-init encoder (seed {s.random_seed0 + i})"))
    result["random"] = randoms
    if s.handmade and controls is not None:
        result["handmade"] = controls["handmade"]
    elif s.handmade:
        result["handmade"] = score(lambda p: handmade_features(p, s.sigma_min, s.sigma_max), True,
                                   "hand-made features")
    pre = _headline(result["pretrained"], s.ks)
    rand_rows = [_headline(r, s.ks) for r in randoms]
    result["random_summary"] = {key: _summary([row[key] for row in rand_rows]) for key in pre}
    result["gain"] = {key: pre[key] - result["random_summary"][key]["mean"] for key in pre}
    if s.handmade:
        hand = _headline(result["handmade"], s.ks)
        result["gain_over_handmade"] = {key: pre[key] - hand[key] for key in pre}
    result["headline"] = {"pretrained": pre, "random_mean": {k: v["mean"] for k, v in result["random_summary"].items()},
                          **({"handmade": _headline(result["handmade"], s.ks)} if s.handmade else {})}
    return result


def controls_key(encoder: nn.Module, planes: list[np.ndarray], ref_planes: list[np.ndarray],
                 s: PretrainingEval) -> str:
    """A digest of what the control rows depend on: the encoder's shape, the settings, the pixels and labels."""
    h = hashlib.sha256(json.dumps({"fields": encoder_fields(encoder), "settings": asdict(s)}, sort_keys=True,
                                  default=str).encode())
    for arr in (*planes, *ref_planes):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- reports
def _label(key: str) -> str:
    return f"k-means k = {key[len('kmeans_k'):]}" if key.startswith("kmeans_k") else "pixel probe (held out)"


def pretraining_markdown(result: dict[str, Any], title: str = "What pre-training bought") -> str:
    """The report: one row per feature set, the gain, and how the figures were made."""
    pre = result["headline"]["pretrained"]
    keys = list(pre)
    rs = result["random_summary"]
    lines = [f"# {title}", ""]
    if "source" in result:
        lines += [f"Checkpoint `{result['source']['checkpoint']}` (SHA-256 {result['source']['sha256'][:12]}...), "
                  f"image `{result['source']['image']}`, reference `{result['source']['reference']}`.", ""]
    lines += ["Mean Dice over the classes present (k-means: Hungarian matching, leftovers merged; probe: logistic "
              "regression scored on held-out pixels). Random-init rows: the same pipeline with encoders of the "
              f"same shape, {len(result['random'])} seeds, mean ± standard deviation [min, max].", "",
              "| features | " + " | ".join(_label(k) for k in keys) + " |",
              "|---|" + "---|" * len(keys),
              "| **pre-trained checkpoint** | " + " | ".join(f"**{pre[k]:.3f}**" for k in keys) + " |",
              "| random-init encoder | " + " | ".join(
                  f"{rs[k]['mean']:.3f} ± {rs[k]['std']:.3f} [{rs[k]['min']:.3f}, {rs[k]['max']:.3f}]"
                  for k in keys) + " |"]
    if "handmade" in result["headline"]:
        hand = result["headline"]["handmade"]
        lines.append("| hand-made features (multiscale intensity/edges/texture) | "
                     + " | ".join(f"{hand[k]:.3f}" for k in keys) + " |")
    lines.append("| **gain over random init** | " + " | ".join(f"**{result['gain'][k]:+.3f}**" for k in keys) + " |")
    if "gain_over_handmade" in result:
        lines.append("| gain over hand-made | " + " | ".join(f"{result['gain_over_handmade'][k]:+.3f}"
                                                            for k in keys) + " |")
    spread = max(rs[k]["max"] - rs[k]["min"] for k in keys)
    verdict = [k for k in keys if result["gain"][k] > rs[k]["max"] - rs[k]["mean"] and result["gain"][k] > 0]
    lines += ["", f"Planes {result['planes']} ({result['split']}); {result['n_labelled']} labelled pixels, k-means "
              f"fitted on {result['n_fit']}, probe trained on {result['n_probe_train']} and scored on "
              f"{result['n_probe_test']} held-out pixels.", "",
              f"Largest spread between random seeds: {spread:.3f}. "
              + (f"The checkpoint beats every random encoder on: {', '.join(_label(k) for k in verdict)}."
                 if verdict else "The checkpoint does not beat the best random encoder on any score: "
                 "what the pipeline reaches here does not come from pre-training."), ""]
    return "\n".join(lines)


def pretraining_figure(result: dict[str, Any]):
    """Grouped bars: checkpoint, random-init mean (error bar: min..max), hand-made, per score."""
    import matplotlib.pyplot as plt

    keys = list(result["headline"]["pretrained"])
    x = np.arange(len(keys))
    has_hand = "handmade" in result["headline"]
    width = 0.8 / (3 if has_hand else 2)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(keys), 3.6))
    pre = [result["headline"]["pretrained"][k] for k in keys]
    rs = result["random_summary"]
    mean = np.array([rs[k]["mean"] for k in keys])
    err = np.array([[rs[k]["mean"] - rs[k]["min"] for k in keys], [rs[k]["max"] - rs[k]["mean"] for k in keys]])
    ax.bar(x - width, pre, width, label="pre-trained", color="#1f77b4")
    ax.bar(x, mean, width, yerr=err, capsize=3, label=f"random init ({len(result['random'])} seeds)",
           color="#bbbbbb")
    if has_hand:
        ax.bar(x + width, [result["headline"]["handmade"][k] for k in keys], width, label="hand-made",
               color="#ff7f0e")
    for xi, k in zip(x, keys):
        ax.text(xi - width, pre[list(keys).index(k)] + 0.01, f"{result['gain'][k]:+.2f}", ha="center", fontsize=7)
    ax.set_xticks(x, [_label(k).replace("k-means ", "k-means\n") for k in keys], fontsize=8)
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("pre-trained vs random-init encoders (numbers: gain)", fontsize=9)
    fig.tight_layout()
    return fig


def run_evaluate_pretraining(checkpoint: str | Path, image: Any, reference: Any, out_dir: str | Path,
                             settings: PretrainingEval | None = None, mask: Any = None, axes: str | None = None,
                             normalize: str | None = None, device: str = "auto",
                             overwrite: bool = False) -> dict[str, Any]:
    """``micromae evaluate pretraining``: load, scale as in pre-training, score, write the report.

    Writes ``pretraining.json``, ``pretraining.md`` and ``pretraining.png`` into ``out_dir`` (all or none);
    ``out_dir`` must not exist yet unless ``overwrite`` (then it is replaced whole).
    """
    from micromae.data.normalize import scale_intensity
    from micromae.segment.pipeline import encoder_on_device, open_input_volume, volume_range

    out_dir = check_output(out_dir, overwrite=overwrite, what="--out", folder=True)
    s = settings or PretrainingEval()
    img = np.asarray(open_input_volume(image, axes)[...])  # (Z, Y, X); a 2-D image is one plane
    ref = np.asarray(open_input_volume(reference)[...])
    if ref.shape != img.shape:
        raise input_error(f"--reference '{reference}'", f"the image's shape {img.shape}", f"shape {ref.shape}",
                          "Pass reference labels of the same size as the image")
    msk = None if mask is None else np.asarray(open_input_volume(mask)[...]).reshape(img.shape)
    encoder, config, sha = encoder_on_device(checkpoint, device)
    lo, hi = volume_range(img, config, normalize)
    scaled = np.asarray(scale_intensity(img, lo, hi), np.float32)
    if s.class_names is None:
        names_file = Path(str(reference)).parent / "classes.json"
        if names_file.is_file():
            s.class_names = list(json.loads(names_file.read_text()).get("class_names", [])) or None
    result = evaluate_pretraining(encoder, scaled, ref, s, msk)
    result["source"] = {"checkpoint": str(checkpoint), "sha256": sha, "image": str(image),
                        "reference": str(reference), "intensity_range": [float(lo), float(hi)],
                        "normalize": normalize or config.get("data", {}).get("normalize", "dtype")}
    with atomic_path(out_dir, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "pretraining.json").write_text(json.dumps(result, indent=1, default=_json_default))
        (tmp / "pretraining.md").write_text(pretraining_markdown(result))
        save_figure(pretraining_figure(result), tmp / "pretraining.png")
    say(f"wrote {out_dir / 'pretraining.md'} (gain over random init: "
        + ", ".join(f"{_label(k)} {v:+.3f}" for k, v in result["gain"].items()) + ")")
    return result


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")
