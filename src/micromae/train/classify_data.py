"""Labelled single-cell crops for classification: read once into memory, pick the train / test files, and
stream augmented batches for the engine.

A classification set is a folder of class sub-folders of multi-channel TIFF crops
(``root/<cell type>/*.tif``, what ``micromae data synth-mif`` writes under ``cells/``). The crops are read
with :class:`~micromae.data.multichannel.MultiChannelImageFolder` (scaled to [0, 1] by ``normalize``:
``"dtype"``, the type's maximum as DAMA; ``"percentile"`` / ``"minmax"`` per crop file and channel, the
whole file before resizing, which stretches marker-negative crops; ``"channel_stats"``, one range per channel
for the folder; no mean/std normalisation), resized to ``size × size`` and kept in memory as one float32
tensor, so repeated folds of the evaluation protocol read the folder once (4000 crops of 7 × 128 × 128 take
1.8 GB).

Training batches (:func:`crop_stream`) are a pure function of ``(seed, step)``: epoch ``e`` visits the crops
in the order ``np.random.default_rng([seed, e]).permutation``, and batch ``b`` of it is augmented with
``np.random.default_rng([seed, e, b])`` (a random multiple of 90° rotation and a random horizontal flip per
crop, which together give the 8 symmetries of the square: a cell type does not depend on orientation).
Resuming at step ``s`` therefore replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from micromae.data.multichannel import MultiChannelImageFolder
from micromae.errors import input_error
from micromae.runtime import eval_mode

__all__ = ["LabelledCrops", "load_labelled_crops", "select_files", "crop_stream", "flip_rotate",
           "predict", "accuracy_report"]


@dataclass
class LabelledCrops:
    """Crops in memory. images: ``(N, C, S, S)`` float32 in [0, 1]; labels: ``(N,)`` int64 class indices;
    files: ``N`` paths relative to ``root`` (``<class>/<name>.tif``), the names folds refer to."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    files: list[str]
    channel_names: list[str] = field(default_factory=list)
    root: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        return int(self.images.shape[1])

    def subset(self, index: Sequence[int] | np.ndarray) -> LabelledCrops:
        """The crops at ``index`` (same classes)."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return LabelledCrops(self.images[idx], self.labels[idx], self.classes,
                             [self.files[i] for i in idx.tolist()], self.channel_names, self.root)


def load_labelled_crops(root: str | Path, size: int, axes: str | None = None,
                        channels: Sequence[str | int] | None = None,
                        classes: Sequence[str] | None = None, normalize: str = "dtype",
                        percentiles: Sequence[float] = (0.5, 99.8), ranges: Any = None) -> LabelledCrops:
    """Read every crop of ``root/<class>/**/*.tif`` resized to ``size × size`` (see the module docstring),
    each file scaled to [0, 1] by ``normalize`` / ``percentiles``
    (:func:`~micromae.data.multichannel.normalize_channels`); ``ranges``: ``channel_stats``' per-channel
    ranges to use instead of the folder's (e.g. the pre-training's).

    Raises MicromaeInputError for a folder without class sub-folders or with fewer than two classes that have
    crops.
    """
    root = Path(root)
    dataset = MultiChannelImageFolder(root, axes=axes, size=size, channels=channels, classes=classes,
                                      normalize=normalize, percentiles=percentiles, ranges=ranges)
    if not dataset.classes:
        raise input_error(f"classification folder '{root}'", "one sub-folder of crops per cell type",
                          "images directly in the folder (no labels)",
                          "Put the crops of each type into root/<type>/, e.g. cells/ of micromae data synth-mif")
    counts = np.bincount(np.asarray(dataset.labels), minlength=len(dataset.classes))
    if int((counts > 0).sum()) < 2:
        raise input_error(f"classification folder '{root}'", "at least 2 classes with crops",
                          ", ".join(f"{c}: {n}" for c, n in zip(dataset.classes, counts)),
                          "Add a sub-folder of crops for every cell type to tell apart")
    images = [dataset.get(i)[0] for i in tqdm(range(len(dataset)), desc="reading crops", unit="crop",
                                                leave=False, disable=len(dataset) < 200)]
    files = [p.relative_to(root).as_posix() for p in dataset.files]
    return LabelledCrops(torch.stack(images).float(), torch.as_tensor(dataset.labels, dtype=torch.int64),
                         list(dataset.classes), files, dataset.channel_names, str(root))


def select_files(crops: LabelledCrops, names: Sequence[str], what: str) -> np.ndarray:
    """Indices of the crops named ``names`` (paths relative to the folder); unknown names are an error."""
    where = {f: i for i, f in enumerate(crops.files)}
    unknown = [n for n in names if n not in where]
    if unknown:
        raise input_error(what, f"files of '{crops.root}' (relative paths such as '{crops.files[0]}')",
                          f"{len(unknown)} unknown, e.g. '{unknown[0]}'", "List paths relative to data.root")
    return np.array([where[n] for n in names], dtype=np.int64)


def flip_rotate(imgs: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each square crop of ``(B, C, S, S)`` rotated by a random multiple of 90° and flipped with p = 0.5."""
    turns, flips = rng.integers(0, 4, len(imgs)), rng.random(len(imgs)) < 0.5
    out = [torch.rot90(x, int(k), dims=(-2, -1)) for x, k in zip(imgs, turns)]
    out = [x.flip(-1) if f else x for x, f in zip(out, flips)]
    return torch.stack(out).contiguous()


def crop_stream(images: torch.Tensor, labels: torch.Tensor, batch_size: int, start_step: int = 0, seed: int = 0,
                augment: bool = True, rank: int = 0, world_size: int = 1
                ) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Yield ``(step, (imgs (B, C, S, S), labels (B,)))`` for ``start_step, start_step + 1, ...`` forever.

    Epochs drop the last incomplete batch; under DDP every rank takes every ``world_size``-th crop of the
    same permutation.
    """
    per_epoch = len(labels) // (batch_size * world_size)
    if per_epoch == 0:
        raise input_error("training crops", f"at least {batch_size * world_size} (one batch per process)",
                          f"{len(labels)} crops", "Lower train.batch_size or add crops to the train part")
    epoch, batch = divmod(start_step, per_epoch)
    step = start_step
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(labels))[rank::world_size]
        for b in range(batch, per_epoch):
            idx = torch.as_tensor(order[b * batch_size:(b + 1) * batch_size])
            imgs = images[idx]
            if augment:
                imgs = flip_rotate(imgs, np.random.default_rng([seed, epoch, b]))
            yield step, (imgs, labels[idx])
            step += 1
        epoch, batch = epoch + 1, 0


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities ``(N, K)`` (float32, CPU) of ``images (N, C, S, S)``, in eval mode, on the model's
    device (bf16 autocast on CUDA)."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(images[i:i + batch_size].to(device))
            out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "num_classes", 0))


def accuracy_report(probs: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict:
    """``{"accuracy", "error", "n", "per_class_accuracy", "confusion"}`` (confusion rows: true class)."""
    from sklearn.metrics import confusion_matrix

    pred = probs.argmax(-1).numpy()
    true = labels.numpy()
    cm = confusion_matrix(true, pred, labels=list(range(len(classes))))
    acc = float((pred == true).mean()) if len(true) else float("nan")
    per_class = {c: (float(cm[k, k] / cm[k].sum()) if cm[k].sum() else None) for k, c in enumerate(classes)}
    return {"accuracy": acc, "error": 1.0 - acc, "n": int(len(true)), "per_class_accuracy": per_class,
            "confusion": cm.tolist(), "classes": list(classes)}
