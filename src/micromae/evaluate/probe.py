"""Frozen-feature probes of a pre-trained encoder: linear probe and k-NN on cell crops, in seconds.

Features: the frozen encoder runs on all patches of each crop; the patch tokens after its final LayerNorm are
averaged (``pool="avg"``, default) or the CLS token is taken (``pool="cls"``), giving one ``D``-vector per crop.

- **Linear probe** (MAE's recipe): ``BatchNorm1d`` without affine parameters (a per-feature standardisation
  learned from the training features) followed by a linear layer (init std 0.01), trained with cross-entropy
  by timm's LARS (momentum 0.9, no weight decay), lr = ``blr`` × batch / 256, linear warm-up over the first
  10% of the epochs, then cosine to 0. Seeded, on the features' device.
- **k-NN** (DINO's recipe): cosine similarity to every training feature; the ``k`` nearest (default 20) vote.
  ``vote="weighted"`` (default): each neighbour adds ``exp(similarity / temperature)`` (T = 0.07) to its
  class; ``vote="majority"``: one vote each, ties going to the tied class with the larger summed similarity.

:func:`run_probe` reads a folder of class sub-folders, extracts features once per encoder, and scores both
probes on repeated stratified splits (:func:`micromae.evaluate.classification.stratified_splits`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from micromae.config_tasks import ClassifyModelConfig
from micromae.data.channel_norm import DEFAULT_PERCENTILES, check_normalize
from micromae.errors import at_least, input_error
from micromae.io import atomic_path, check_output, write_files_atomically
from micromae.models import ViTEncoder
from micromae.models.pretrained import (ENCODER_FIELDS, InputNormalization, encoder_fields, input_normalization,
                                        load_encoder, read_normalization)
from micromae.evaluate.report import markdown_table
from micromae.runtime import eval_mode, resolve_device
from micromae.train.classify_data import load_labelled_crops

__all__ = ["extract_features", "linear_probe", "knn_predict", "knn_probe", "probe_encoders", "run_probe"]

VOTES = ("weighted", "majority")
POOLS = ("avg", "cls")


@torch.no_grad()
def extract_features(encoder: ViTEncoder, images: torch.Tensor, batch_size: int = 256, pool: str = "avg",
                     device: str | torch.device | None = None) -> torch.Tensor:
    """Frozen features ``(N, D)`` float32 (CPU) of ``images (N, C, H, W)`` (module docstring)."""
    if pool not in POOLS:
        raise input_error("pool", "avg (mean of the patch tokens) or cls", repr(pool), "Use pool=avg")
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    out = []
    with eval_mode(encoder.to(device)):
        for i in range(0, len(images), batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                tokens = encoder(images[i:i + batch_size].to(device))  # (B, 1 + L, D)
            out.append((tokens[:, 1:].mean(dim=1) if pool == "avg" else tokens[:, 0]).float().cpu())
    return torch.cat(out)


def _check_xy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1] or len(train_x) != len(train_y):
        raise input_error("probe features", "train (N, D), labels (N,) and test (M, D)",
                          f"{tuple(train_x.shape)}, {tuple(train_y.shape)}, {tuple(test_x.shape)}",
                          "Pass features from extract_features")
    if len(train_x) == 0:
        raise input_error("probe training features", "at least one crop", "none", "Use a larger train part")


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Run tiny CPU tensor work on one thread: the probe's (batch, D) matmuls are too small to share, and
    on a busy 2-core machine two OpenMP threads made the linear probe ~300x slower (16 s vs 0.05 s)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int | None = None,
                 epochs: int = 100, batch_size: int = 256, blr: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Train BatchNorm1d(affine=False) + Linear on ``train_x (N, D)`` / ``train_y (N,)``; return the predicted
    classes ``(M,)`` of ``test_x (M, D)`` (module docstring for the recipe)."""
    from timm.optim import Lars

    _check_xy(train_x, train_y, test_x)
    num_classes = num_classes or int(train_y.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
                         nn.Linear(train_x.shape[1], num_classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    device = train_x.device
    head.to(device)
    batch = min(batch_size, len(train_x))
    lr = blr * batch / 256
    opt = Lars(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    per_epoch = math.ceil(len(train_x) / batch)
    total, warmup = epochs * per_epoch, max(1, epochs * per_epoch // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    head.train()
    with one_cpu_thread(device):
        _fit(head, opt, sched, train_x, train_y, epochs, batch, gen)
    head.eval()
    with torch.no_grad():
        return head(test_x).argmax(-1)


def _fit(head: nn.Module, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor, y: torch.Tensor, epochs: int,
         batch: int, gen: torch.Generator) -> None:
    """Minibatch cross-entropy training of ``head`` on ``x (N, D)``, ``y (N,)``."""
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 20,
                temperature: float = 0.07, vote: str = "weighted", num_classes: int | None = None) -> torch.Tensor:
    """Classes ``(M,)`` of ``test_x (M, D)`` by the ``k`` cosine-nearest of ``train_x (N, D)`` (module docstring)."""
    _check_xy(train_x, train_y, test_x)
    if vote not in VOTES or k < 1 or temperature <= 0:
        raise input_error("k-NN settings", f"vote in {VOTES}, k >= 1, temperature > 0",
                          f"vote={vote!r}, k={k}, temperature={temperature}", "Use vote=weighted k=20 temperature=0.07")
    num_classes = num_classes or int(train_y.max()) + 1
    a = nn.functional.normalize(train_x.float(), dim=1)
    b = nn.functional.normalize(test_x.float(), dim=1)
    sim, idx = (b @ a.T).topk(min(k, len(a)), dim=1)  # (M, k)
    neighbours = train_y[idx]  # (M, k)
    weights = (sim / temperature).exp() if vote == "weighted" else torch.ones_like(sim)
    scores = torch.zeros(len(b), num_classes, dtype=sim.dtype, device=sim.device).scatter_add_(1, neighbours, weights)
    if vote == "majority":  # ties: the larger summed similarity (< 1 per neighbour, so it never outvotes)
        tie = torch.zeros_like(scores).scatter_add_(1, neighbours, (sim + 1) / (2 * len(a) + 2))
        scores = scores + tie
    return scores.argmax(dim=1)


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              **kwargs: Any) -> float:
    """Accuracy of :func:`knn_predict` on ``test_y``."""
    return float((knn_predict(train_x, train_y, test_x, **kwargs) == test_y).float().mean())


def probe_encoders(checkpoints: Mapping[str, str], branch: int = 1, size: int | None = None, in_chans: int = 7,
                   seed: int = 0) -> dict[str, ViTEncoder]:
    """``{name: frozen encoder}`` for ``{name: checkpoint | .safetensors | "random"}``. A random encoder
    (seeded) takes the shape of the first real one, else the ``classify_tiny`` shape with ``in_chans``."""
    encoders = {n: load_encoder(p, branch=branch, img_size=size, pos_embed="interpolate")[0]
                for n, p in checkpoints.items() if p != "random"}
    first = next(iter(encoders.values()), None)
    tiny = ClassifyModelConfig(in_chans=in_chans)
    fields = encoder_fields(first) if first is not None else {k: getattr(tiny, k) for k in ENCODER_FIELDS}
    for name, path in checkpoints.items():
        if path == "random":
            torch.manual_seed(seed)
            encoders[name] = ViTEncoder(**{**fields, "img_size": size or fields["img_size"]})
    return {n: encoders[n].eval() for n in checkpoints}


def checkpoint_normalize(path: str | Path) -> tuple[str, tuple[float, ...]]:
    """``(data.normalize, data.percentiles)`` a checkpoint's run read its images with; ``("dtype", ...)`` for
    files that do not record it (runs from before the option, exported encoders without a description)."""
    mode, pct, _ = read_normalization(path)
    return str(mode or "dtype"), tuple(pct or DEFAULT_PERCENTILES)


def _input_settings(checkpoints: Mapping[str, str], normalize: str | None,
                    percentiles: Sequence[float] | None) -> dict[str, InputNormalization]:
    """``{name: InputNormalization}``: each encoder's stored setting (mode, percentiles, ``channel_stats``
    ranges) unless ``normalize`` / ``percentiles`` override it (a warning when they differ); a random encoder
    takes the first checkpoint's, so it sees the same inputs."""
    if normalize is not None:
        check_normalize(normalize, percentiles or DEFAULT_PERCENTILES)
    own = {n: input_normalization(p, normalize, percentiles, default_percentiles=DEFAULT_PERCENTILES)
           for n, p in checkpoints.items() if p != "random"}
    first = next(iter(own.values()), None) or input_normalization(None, normalize, percentiles,
                                                                   default_percentiles=DEFAULT_PERCENTILES)
    return {n: own.get(n, first) for n in checkpoints}


def run_probe(checkpoints: Mapping[str, str] | Sequence[str], root: str | Path, out: str | Path | None = None,
              axes: str | None = None, channels: Sequence[str | int] | None = None, size: int | None = None,
              branch: int = 1, folds: int = 5, test_size: float = 0.4, seed: int = 0, k: int = 20,
              temperature: float = 0.07, vote: str = "weighted", pool: str = "avg", epochs: int = 100,
              device: str = "auto", normalize: str | None = None,
              percentiles: Sequence[float] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Linear-probe and k-NN accuracy of frozen encoders on the crops of ``root/<class>/*.tif``.

    ``out`` (optional) must not exist yet unless ``overwrite`` (then it is replaced whole).

    ``normalize`` / ``percentiles``: how crops are scaled to [0, 1] (``dtype``, ``percentile``, ``minmax``);
    None: as each encoder was pre-trained (the setting stored with it, ``channel_stats`` ranges included; see
    :func:`~micromae.models.pretrained.input_normalization`); an override that differs is warned about.

    ``checkpoints``: ``{name: path}`` or a list of paths (named by file); ``"random"`` = a random-init encoder.
    Every encoder is scored on the same ``folds`` stratified splits (``test_size`` held out). Writes
    ``probe.json`` and ``probe.md`` to ``out`` when given. Returns ``{"rows": [...], "settings": {...}}``,
    one row per encoder with the mean, std and per-fold accuracies of both probes.
    """
    # local: evaluate.classification imports this module at its top (a cycle otherwise)
    from micromae.evaluate.classification import stratified_splits

    at_least("--folds", folds, 1)
    at_least("--k", k, 1)
    if not 0 < test_size < 1:
        raise input_error("--test-size", "a share between 0 and 1", repr(test_size), "e.g. --test-size 0.4")
    if out is not None:
        out = check_output(out, overwrite=overwrite, what="--out", folder=True)

    if not isinstance(checkpoints, Mapping):
        checkpoints = {("random init" if p == "random" else Path(p).stem): str(p) for p in checkpoints}
    dev = resolve_device(device, option="--device")
    inputs = _input_settings(checkpoints, normalize, percentiles)
    probe = ProbeData(root, axes, channels)
    only_random = all(p == "random" for p in checkpoints.values())
    encoders = probe_encoders(checkpoints, branch, size, in_chans=probe.channels_hint() if only_random else 7,
                              seed=seed)
    rows = []
    for name, encoder in tqdm(encoders.items(), desc="probing encoders", unit="encoder"):
        crops = probe.at(encoder.img_size[0], inputs[name])
        if encoder.in_chans != crops.num_channels:
            raise input_error(f"encoder '{name}'", f"{crops.num_channels} input channels (the crops')",
                              f"{encoder.in_chans}", "Select the encoder's channels with --channels")
        feats = extract_features(encoder, crops.images, pool=pool, device=dev).to(dev)
        labels = crops.labels.to(dev)
        lin, knn = [], []
        for tr, te in stratified_splits(crops.labels.numpy(), folds, test_size, seed):
            tr, te = torch.as_tensor(tr, device=dev), torch.as_tensor(te, device=dev)
            pred = linear_probe(feats[tr], labels[tr], feats[te], len(crops.classes), epochs=epochs, seed=seed)
            lin.append(float((pred == labels[te]).float().mean()))
            knn.append(knn_probe(feats[tr], labels[tr], feats[te], labels[te], k=k, temperature=temperature,
                                 vote=vote, num_classes=len(crops.classes)))
        rows.append({"encoder": name, "checkpoint": checkpoints[name], "feature_dim": int(feats.shape[1]),
                     "normalize": inputs[name].normalize, "percentiles": list(inputs[name].percentiles),
                     "channel_ranges": "stored" if inputs[name].ranges is not None else "data",
                     "linear_mean": float(np.mean(lin)), "linear_std": float(np.std(lin)), "linear_folds": lin,
                     "knn_mean": float(np.mean(knn)), "knn_std": float(np.std(knn)), "knn_folds": knn})
    counts = np.bincount(crops.labels.numpy(), minlength=len(crops.classes))
    settings = {"root": str(root), "n_crops": len(crops), "classes": dict(zip(crops.classes, counts.tolist())),
                "chance": float(counts.max() / counts.sum()), "folds": folds, "test_size": test_size, "seed": seed,
                "k": k, "temperature": temperature, "vote": vote, "pool": pool, "linear_epochs": epochs,
                "branch": branch}
    result = {"rows": rows, "settings": settings}
    if out is not None:
        table = markdown_table([{"encoder": r["encoder"], "inputs": r["normalize"],
                                 "linear probe": f"{r['linear_mean']:.3f} ± {r['linear_std']:.3f}",
                                 f"k-NN (k={k}, {vote})": f"{r['knn_mean']:.3f} ± {r['knn_std']:.3f}"} for r in rows])
        texts = {"probe.json": json.dumps(result, indent=2),
                 "probe.md": f"# Frozen-feature probes\n\n{len(crops)} crops, {folds} stratified splits "
                             f"({1 - test_size:.0%} train / {test_size:.0%} test), chance "
                             f"{settings['chance']:.3f}\n\n{table}\n"}
        with atomic_path(out, overwrite=overwrite) as tmp:  # appears complete; --overwrite replaces it whole
            write_files_atomically(tmp, {}, texts)
    return result


class ProbeData:
    """The crops of one folder, read once per input side and normalisation."""

    def __init__(self, root: str | Path, axes: str | None, channels: Sequence[str | int] | None) -> None:
        self.root, self.axes, self.channels = root, axes, channels
        self.cache: dict[int, Any] = {}

    def at(self, size: int, inputs: InputNormalization | None = None):
        inputs = inputs or InputNormalization("dtype", (0.5, 99.8))
        ranges = None if inputs.ranges is None else tuple(map(tuple, inputs.ranges))
        key = (size, inputs.normalize, inputs.percentiles, ranges)
        if key not in self.cache:
            self.cache[key] = load_labelled_crops(self.root, size, self.axes, self.channels,
                                                  normalize=inputs.normalize, percentiles=inputs.percentiles,
                                                  ranges=inputs.ranges)
        return self.cache[key]

    def channels_hint(self) -> int:
        """Channel count of the crops (read at a small side), for a random encoder with nothing to copy."""
        return next(iter(self.cache.values())).num_channels if self.cache else self.at(32).num_channels
