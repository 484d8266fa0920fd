"""MAESTER's supervised baselines (supplement A.2, Tables S2-S4): Segmenter and a vanilla ViT decoder trained
with cross-entropy on partially labelled volumes, and sliding-window inference. Used by ``micromae finetune``.

Training samples image crops and their label crops with the same geometry (:class:`PlaneCropSampler` with
``label_volumes``). betaSeg cells are only partly annotated, so the loss ignores unlabelled pixels
(``ignore_index``); :class:`LabelConfig` can also hide labels on purpose (keep a random share of slices or
blocks) to study how a baseline copes with sparse labels.

Encoder initialisation from a MAESTER checkpoint (``init: path``): every ``encoder.*`` weight is loaded
except ``pos_embed``. That buffer is not learned: it holds the fixed sin-cos table times the pre-training
weight (0.08), whereas the baselines use weight 1.0 (Tables S3/S4). It is recomputed for this run's
``model.pos_embed_weight`` and grid, so a checkpoint also loads at another FOV; set
``model.pos_embed_weight=0.08`` to keep the encoder's input exactly as pre-trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from micromae.config import DataConfig, ModelConfig, TrainConfig, from_dict, load_config, save_config, to_dict
from micromae.data.normalize import intensity_range, sample_voxels, scale_intensity
from micromae.data.sampler import PlaneCropSampler, make_loader
from micromae.data.volumes import _as_zyx, load_training_volumes
from micromae.errors import input_error
from micromae.models import ViTEncoder
from micromae.models.heads import HEADS, SupervisedSegmenter, build_head
from micromae.models.pretrained import ENCODER_FIELDS, encoder_fields, load_encoder
from micromae.train.checkpoint import load_checkpoint
from micromae.train.distributed import cleanup_distributed, init_distributed
from micromae.train.engine import Objective, TrainResult, train
from micromae.train.log import say
from micromae.train.pretrain import start_run

PARTIAL_MODES = ("none", "slices", "blocks")
WINDOW_WEIGHTS = ("gaussian", "linear", "uniform")


@dataclass
class LabelConfig:
    """Where the labels come from (``data.source`` picks them) and which of them the loss sees.

    ``synthetic``: the generator's labels; ``betaseg``: the loader's; ``files``: ``paths``, one integer
    label volume per ``data.paths`` entry (``axes``/``key`` as for images). ``partial``: ``none`` keeps every
    label; ``slices`` keeps a random ``fraction`` of the slices normal to ``slice_axis``; ``blocks`` a random
    ``fraction`` of cubes of side ``block_size``; the rest become ``ignore_index``. ``ignore_outside_cell``
    ignores pixels outside the cell mask (synthetic / betaSeg).
    """

    paths: list[str] = field(default_factory=list)
    axes: str | None = None
    key: str | None = None
    partial: str = "none"
    fraction: float = 1.0
    slice_axis: str = "Z"
    block_size: int = 32
    seed: int = 0
    ignore_outside_cell: bool = False


@dataclass
class SegFinetuneConfig:
    """One supervised run. ``model``: the encoder fields, and ``decoder_*`` for the head (the MAE-only fields
    ``mask_ratio`` and ``norm_pix_loss`` are unused). ``init``: ``random`` or a MAESTER checkpoint path."""

    name: str = "segmenter"
    task: str = "segmentation"  # what `micromae finetune` dispatches on (classification / instances elsewhere)
    head: str = "segmenter"  # segmenter | vit_decoder
    num_classes: int = 6
    ignore_index: int = 255
    init: str = "random"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pos_embed_weight=1.0))
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64))


def check_seg_config(cfg: SegFinetuneConfig) -> None:
    """Raise MicromaeInputError for values the dataclass types cannot rule out."""
    if cfg.head not in HEADS:
        raise input_error("head", "one of " + ", ".join(HEADS), repr(cfg.head), "Set head=segmenter or vit_decoder")
    if not 1 <= cfg.num_classes <= 256 or not 0 <= cfg.ignore_index or cfg.ignore_index < cfg.num_classes:
        raise input_error("num_classes / ignore_index", "1 <= num_classes <= 256 and ignore_index >= num_classes",
                          f"{cfg.num_classes} / {cfg.ignore_index}", "Use e.g. num_classes=6, ignore_index=255")
    lab = cfg.labels
    if lab.partial not in PARTIAL_MODES or not 0.0 < lab.fraction <= 1.0:
        raise input_error("labels.partial / labels.fraction", f"one of {PARTIAL_MODES} / a number in (0, 1]",
                          f"{lab.partial!r} / {lab.fraction}", "e.g. labels.partial=slices labels.fraction=0.25")
    if lab.slice_axis not in ("Z", "Y", "X") or lab.block_size < 1:
        raise input_error("labels.slice_axis / labels.block_size", "Z, Y or X / a positive int",
                          f"{lab.slice_axis!r} / {lab.block_size}", "Fix the labels section")
    if cfg.model.in_chans != 1:
        raise input_error("model.in_chans", "1 (single-channel volumes)", str(cfg.model.in_chans),
                          "Set model.in_chans=1")


def load_seg_finetune_config(path: str | Path, overrides: list[str] | None = None) -> SegFinetuneConfig:
    """Read a fine-tuning preset (``configs/segmenter_*.yaml``) with ``key=value`` overrides, checked."""
    cfg = load_config(path, SegFinetuneConfig, overrides)
    check_seg_config(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# model


def build_seg_model(cfg: SegFinetuneConfig) -> SupervisedSegmenter:
    """Encoder (``cfg.model``'s encoder fields) + ``cfg.head`` (``decoder_*`` fields), randomly initialised."""
    m = cfg.model
    encoder = ViTEncoder.from_config(m)
    head = build_head(cfg.head, encoder, cfg.num_classes, decoder_embed_dim=m.decoder_embed_dim,
                      depth=m.decoder_depth, num_heads=m.decoder_num_heads, mlp_ratio=m.decoder_mlp_ratio,
                      pos_embed_weight=m.decoder_pos_embed_weight)
    return SupervisedSegmenter(encoder, head)


def load_encoder_weights(model: SupervisedSegmenter, path: str | Path) -> dict[str, Any]:
    """Copy the encoder weights of a checkpoint (MAESTER or fine-tuned) into ``model.encoder``.

    ``pos_embed`` is not taken from the file: it is recomputed at this model's weight and grid (module
    docstring). Returns what was loaded: ``{"path", "tensors", "checkpoint_pos_embed_weight"}``.
    """
    enc = model.encoder
    loaded, meta = load_encoder(path, img_size=enc.img_size[0], pos_embed="recompute",
                                pos_embed_weight=enc.pos_embed_weight)
    ours, theirs = encoder_fields(enc), encoder_fields(loaded)
    wrong = [k for k in ENCODER_FIELDS if k not in ("img_size", "pos_embed_weight") and ours[k] != theirs[k]]
    if wrong:
        raise input_error(f"init checkpoint '{path}'", "an encoder of this run's shape",
                          f"an encoder {meta.fields} ({', '.join(f'{k} {theirs[k]}, not {ours[k]}' for k in wrong)})",
                          "Set the model.* encoder fields to the checkpoint's (e.g. model.depth)")
    weights = loaded.state_dict()
    enc.load_state_dict(weights)
    return {"path": str(path), "tensors": len(weights) - 1,
            "checkpoint_pos_embed_weight": meta.fields.get("pos_embed_weight")}


def load_seg_model(path: str | Path, device: str | torch.device = "cpu") -> SupervisedSegmenter:
    """A trained baseline from its fine-tuning checkpoint (config and weights), in eval mode."""
    state = load_checkpoint(path, map_location=device)
    cfg = from_dict(SegFinetuneConfig, state.get("config"))
    model = build_seg_model(cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# labels and data


class PartialLabels:
    """Lazy (Z, Y, X) label view in which only the kept blocks show their labels; others read ``ignore_index``.

    labels: (Z, Y, X) integer array-like; block: ``(bz, by, bx)`` block sides; keep: bool array of the
    block grid, shape ``ceil(shape / block)``. Indexing takes ints, slices and one Ellipsis (what the
    sampler and ``sample_voxels`` read).
    """

    def __init__(self, labels: Any, block: tuple[int, int, int], keep: np.ndarray, ignore_index: int) -> None:
        self.labels, self.block, self.keep, self.ignore_index = labels, block, keep, ignore_index
        self.shape = tuple(int(s) for s in labels.shape)
        self.dtype = np.result_type(labels.dtype, np.min_scalar_type(ignore_index))

    def __getitem__(self, index: Any) -> np.ndarray:
        index = (index,) if not isinstance(index, tuple) else index
        if any(i is Ellipsis for i in index):
            at = [i is Ellipsis for i in index].index(True)
            index = index[:at] + (slice(None),) * (4 - len(index)) + index[at + 1:]
        index = index + (slice(None),) * (3 - len(index))
        if len(index) != 3 or not all(isinstance(i, (int, np.integer, slice)) for i in index):
            raise TypeError("PartialLabels takes up to three ints or slices (and one Ellipsis)")
        region = np.asarray(self.labels[index]).astype(self.dtype)
        coords = [np.array([i]) if not isinstance(i, slice) else np.arange(*i.indices(n))
                  for i, n in zip(index, self.shape)]
        kept = self.keep[np.ix_(*(c // b for c, b in zip(coords, self.block)))]
        kept = kept.reshape(region.shape)  # int indices drop their length-1 axis
        return np.where(kept, region, self.dtype.type(self.ignore_index))


def make_partial_labels(labels: Any, cfg: LabelConfig, ignore_index: int, salt: int = 0) -> Any:
    """``labels`` unchanged (``partial=none``) or a :class:`PartialLabels` keeping ``cfg.fraction`` of it."""
    if cfg.partial == "none":
        return labels
    shape = tuple(int(s) for s in labels.shape)
    if cfg.partial == "slices":
        axis = "ZYX".index(cfg.slice_axis)
        block = tuple(1 if a == axis else n for a, n in enumerate(shape))
    else:
        block = (cfg.block_size,) * 3
    grid = tuple(-(-n // b) for n, b in zip(shape, block))
    rng = np.random.default_rng([cfg.seed, salt])
    count = max(1, round(cfg.fraction * int(np.prod(grid))))
    keep = np.zeros(int(np.prod(grid)), dtype=bool)
    keep[rng.permutation(keep.size)[:count]] = True
    return PartialLabels(labels, block, keep.reshape(grid), ignore_index)


def _check_label_values(labels: Any, num_classes: int, ignore_index: int, name: str) -> None:
    values, _ = sample_voxels(labels, max_samples=4_000_000)
    bad = np.unique(values[(values != ignore_index) & ((values < 0) | (values >= num_classes))])
    if bad.size:
        raise input_error(name, f"class labels 0..{num_classes - 1} or ignore_index={ignore_index}",
                          f"values {bad[:8].tolist()}", "Set num_classes to the number of classes, or remap")


def load_labelled_volumes(cfg: SegFinetuneConfig) -> tuple[list[Any], list[Any]]:
    """Images and their labels (Z, Y, X) for ``cfg.data.source``, after ``ignore_outside_cell``/``partial``."""
    d, lab = cfg.data, cfg.labels
    masks: list[Any] | None = None
    if d.source == "synthetic":
        from micromae.data.synthetic_em import make_em_volume

        vol = make_em_volume(shape=tuple(d.synthetic_shape), seed=d.synthetic_seed)
        images, labels, masks = [vol.image], [vol.labels], [vol.cell_mask]
    elif d.source == "betaseg":
        from micromae.data.betaseg import load_betaseg_cell

        if d.root is None:
            raise input_error("data.root", "the betaSeg folder", "nothing", "Set data.root=/path/to/betaseg")
        cells = [load_betaseg_cell(d.root, c) for c in d.betaseg_cells]
        images, labels, masks = [c.image for c in cells], [c.labels for c in cells], [c.cell_mask for c in cells]
    elif d.source == "files":
        from micromae.io import open_volume

        if len(lab.paths) != len(d.paths):
            raise input_error("labels.paths", f"one label volume per data.paths entry ({len(d.paths)})",
                              f"{len(lab.paths)} paths", "List the label files in the order of data.paths")
        images = load_training_volumes(d)
        opened = [open_volume(p, axes=lab.axes, key=lab.key, check=False) for p in lab.paths]
        labels = [_as_zyx(v, repr(p), v.axes) for p, v in zip(lab.paths, opened)]
    else:
        raise input_error("data.source", "synthetic, betaseg or files (sources with labels)", repr(d.source),
                          "Sample data has no labels: use data.source=files with labels.paths")
    if lab.ignore_outside_cell:
        if masks is None:
            raise input_error("labels.ignore_outside_cell", "a source with cell masks (synthetic, betaseg)",
                              d.source, "Set labels.ignore_outside_cell=false, or mark outside as ignore_index")
        labels = [np.where(m, y, np.asarray(cfg.ignore_index, np.result_type(y.dtype, np.min_scalar_type(
            cfg.ignore_index)))) for y, m in zip(labels, masks)]
    for i, y in enumerate(labels):
        _check_label_values(y, cfg.num_classes, cfg.ignore_index, f"label volume {i}")
    return images, [make_partial_labels(y, lab, cfg.ignore_index, salt=i) for i, y in enumerate(labels)]


def build_label_sampler(cfg: SegFinetuneConfig, rank: int = 0) -> PlaneCropSampler:
    """Crop sampler returning ``(imgs (B, 1, F, F), labels (B, F, F))`` batches."""
    d = cfg.data
    images, labels = load_labelled_volumes(cfg)
    return PlaneCropSampler(
        images, fov=cfg.model.img_size, planes=tuple(d.planes), pad=d.pad, pad_mode=d.pad_mode,
        min_crop_frac=d.min_crop_frac, flip_p=d.flip_p, normalize=d.normalize, percentiles=tuple(d.percentiles),
        seed=cfg.train.seed, rank=rank, label_volumes=labels, ignore_index=cfg.ignore_index)


# ----------------------------------------------------------------------------------------------------------
# objective


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labelled pixels; 0 (not NaN) when none is labelled.

    logits: (N, n_cls, H, W); labels: (N, H, W) int64. Returns ``(loss, number of labelled pixels)``.
    """
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum()
    return total / count.clamp(min=1), count


class SegmentationObjective(Objective):
    """Cross-entropy on the labelled pixels of ``(imgs, labels)`` batches; logs pixel accuracy there."""

    name = "finetune"
    figure_name = "segmentation"

    def __init__(self, model: nn.Module, ignore_index: int = 255) -> None:
        super().__init__(model)
        self.ignore_index = ignore_index

    def loss(self, module: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        imgs, labels = batch
        logits = module(imgs)
        loss, count = masked_cross_entropy(logits, labels, self.ignore_index)
        with torch.no_grad():
            correct = ((logits.argmax(1) == labels) & (labels != self.ignore_index)).sum()
            n = float(count)
        return loss, {"pixel_acc": float(correct) / max(n, 1.0), "labelled_frac": n / labels.numel()}

    @torch.no_grad()
    def save_figure(self, batch: Any, path: Path) -> None:
        from micromae.figures import plt, save_figure

        model = self.model.module if hasattr(self.model, "module") else self.model
        was_training = model.training
        model.eval()
        imgs, labels = batch[0][:4].float(), batch[1][:4]
        pred = model(imgs).argmax(1).cpu().numpy()
        labels = np.ma.masked_equal(labels.cpu().numpy(), self.ignore_index)
        k = max(model.num_classes - 1, 1)
        fig, axes = plt.subplots(len(imgs), 3, figsize=(6, 2.1 * len(imgs)), squeeze=False)
        for i in range(len(imgs)):
            for j, (im, kw) in enumerate(((imgs[i, 0].cpu().numpy(), dict(cmap="gray", vmin=0, vmax=1)),
                                          (labels[i], dict(cmap="tab10", vmin=0, vmax=k)),
                                          (pred[i], dict(cmap="tab10", vmin=0, vmax=k)))):
                axes[i, j].imshow(im, interpolation="nearest", **kw)
                axes[i, j].set_axis_off()
                if i == 0:
                    axes[i, j].set_title(("input", "labels (blank: ignored)", "prediction")[j], fontsize=8)
        save_figure(fig, path)
        model.train(was_training)


def run_seg_finetune(cfg: SegFinetuneConfig, run_dir: str | Path, resume: str | None = None,
                     stop_after: int | None = None) -> TrainResult:
    """Train a supervised baseline; writes config.yaml, log.jsonl, tb/, checkpoints/, figures/ in run_dir."""
    check_seg_config(cfg)
    run_dir = Path(run_dir)
    info, device = init_distributed(cfg.train.device)
    try:
        resume_path = start_run(run_dir, resume)
        torch.manual_seed(cfg.train.seed + info.rank)
        sampler = build_label_sampler(cfg, rank=info.rank)
        model = build_seg_model(cfg)
        loaded = None
        if cfg.init != "random" and resume_path is None:  # a resumed run gets its weights from the checkpoint
            loaded = load_encoder_weights(model, cfg.init)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            n_params = sum(p.numel() for p in model.parameters())
            say(f"device {device}, world size {info.world_size}; {cfg.head} baseline {n_params / 1e6:.2f} M "
                f"parameters; encoder init {cfg.init}; run dir {run_dir}")
            if loaded:
                say(f"loaded {loaded['tensors']} encoder tensors; pos_embed recomputed at weight "
                    f"{cfg.model.pos_embed_weight} (checkpoint: {loaded['checkpoint_pos_embed_weight']})")

        def open_stream(start: int):
            return make_loader(sampler, cfg.train.batch_size, start_step=start,
                               num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")

        return train(cfg.train, SegmentationObjective(model, cfg.ignore_index), open_stream, run_dir,
                     to_dict(cfg), info, device, resume_from=resume_path, stop_after=stop_after)
    finally:
        cleanup_distributed(info)


# ----------------------------------------------------------------------------------------------------------
# sliding-window inference


def window_weight(size: tuple[int, int], kind: str = "gaussian") -> torch.Tensor:
    """Blending weight of one window ``(Fh, Fw)``, positive everywhere, peak 1 in the centre.

    ``gaussian``: sigma = side/8 (nnU-Net's choice), floored at 1e-3; ``linear``: a tent falling to
    ``1/(side/2)`` at the edges; ``uniform``: ones.
    """
    if kind not in WINDOW_WEIGHTS:
        raise input_error("window weight", "one of " + ", ".join(WINDOW_WEIGHTS), repr(kind), "Use gaussian")
    profiles = []
    for n in size:
        centre = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        if kind == "gaussian":
            p = torch.exp(-0.5 * (centre / (n / 8)) ** 2)
        elif kind == "linear":
            p = 1 - centre.abs() / (n / 2)
        else:
            p = torch.ones(n)
        profiles.append(p)
    return (profiles[0][:, None] * profiles[1][None, :]).clamp(min=1e-3)


def _window_starts(n: int, f: int, stride: int) -> tuple[np.ndarray, int, int]:
    """Window starts along one padded axis, and the padding ``(before, after)`` of an axis of ``n`` pixels."""
    before = (f - stride) // 2
    count = max(1, -(-(before + n - f) // stride) + 1)
    after = (count - 1) * stride + f - before - n
    return np.arange(count) * stride, before, max(after, 0)


@torch.no_grad()
def predict_logits_slice(model: SupervisedSegmenter, image: Any, overlap: float = 0.5, batch_size: int = 64,
                         weight: str = "gaussian", pad_mode: str = "reflect", amp: bool = False) -> torch.Tensor:
    """Blended sliding-window logits of one 2-D slice.

    image: (H, W) intensities already scaled like the training crops (``[0, 1]``), numpy or tensor.
    Windows of the model's ``img_size`` step by ``round(F * (1 - overlap))``; the slice is padded
    (``reflect`` or ``constant`` 0) so every pixel lies inside a window with margin. Window logits are
    averaged with :func:`window_weight`. Returns float32 ``(n_cls, H, W)`` on the model's device.
    """
    if not 0.0 <= overlap < 1.0 or pad_mode not in ("reflect", "constant"):
        raise input_error("overlap / pad_mode", "a number in [0, 1) / reflect or constant",
                          f"{overlap} / {pad_mode!r}", "Use overlap=0.5, pad_mode=reflect")
    image = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if image.ndim != 2:
        raise input_error("slice", "a 2-D (H, W) image", f"shape {image.shape}", "Pass one slice of the volume")
    device = next(model.parameters()).device
    (fh, fw), (h, w) = model.img_size, image.shape
    strides = [max(1, round(f * (1 - overlap))) for f in (fh, fw)]
    (rows, top, bottom), (cols, left, right) = (_window_starts(n, f, s) for n, f, s in
                                                 zip((h, w), (fh, fw), strides))
    padded = np.pad(image.astype(np.float32), ((top, bottom), (left, right)), mode=pad_mode)
    ph, pw = padded.shape
    flat = torch.from_numpy(padded).to(device).reshape(-1)
    offsets = (torch.arange(fh, device=device)[:, None] * pw + torch.arange(fw, device=device)).reshape(-1)
    starts = torch.from_numpy((rows[:, None] * pw + cols[None, :]).reshape(-1)).to(device)  # (n_windows,)
    wmap = window_weight((fh, fw), weight).to(device).reshape(-1)  # (Fh*Fw,)
    acc = torch.zeros(model.num_classes, ph * pw, device=device)
    norm = torch.zeros(ph * pw, device=device)
    for chunk in torch.split(starts, batch_size):
        idx = (chunk[:, None] + offsets[None, :]).reshape(-1)  # (b*Fh*Fw,) flat pixel of each window pixel
        windows = flat[idx].reshape(len(chunk), 1, fh, fw)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = model(windows).float()  # (b, n_cls, Fh, Fw)
        acc.index_add_(1, idx, (logits.reshape(len(chunk), model.num_classes, -1) * wmap)
                       .transpose(0, 1).reshape(model.num_classes, -1))
        norm.index_add_(0, idx, wmap.repeat(len(chunk)))
    out = (acc / norm.clamp(min=1e-12)).reshape(model.num_classes, ph, pw)
    return out[:, top:top + h, left:left + w]


def predict_proba_slice(model: SupervisedSegmenter, image: Any, **kwargs: Any) -> torch.Tensor:
    """Class probabilities ``(n_cls, H, W)``: softmax of :func:`predict_logits_slice` (same arguments)."""
    return predict_logits_slice(model, image, **kwargs).softmax(0)


def predict_volume(model: SupervisedSegmenter, volume: Any, axis: int = 0, fov: int | None = None,
                   overlap: float = 0.5, batch_size: int = 64, device: str | torch.device | None = None,
                   normalize: str = "dtype", percentiles: tuple[float, float] = (0.5, 99.5),
                   weight: str = "gaussian", pad_mode: str = "reflect", out: Any = None,
                   amp: bool = False) -> Any:
    """Semantic labels of a (Z, Y, X) volume, slice by slice along ``axis``, as uint8 (Z, Y, X).

    Intensities are scaled as in training (``normalize``, ``percentiles``: one range for the volume).
    fov: must equal the model's ``img_size`` when given. out: optional (Z, Y, X) array-like to write into
    (e.g. a Zarr array; returned); by default a new numpy array. device: default the model's.
    """
    if len(getattr(volume, "shape", ())) != 3 or axis not in (0, 1, 2):
        raise input_error("volume / axis", "a 3-D (Z, Y, X) volume / 0, 1 or 2",
                          f"shape {tuple(getattr(volume, 'shape', ()))} / {axis}", "Pass a 3-D stack")
    if fov is not None and (fov, fov) != tuple(model.img_size):
        raise input_error("fov", f"the model's img_size {model.img_size}", str(fov), "Leave fov=None")
    if model.num_classes > 256:
        raise input_error("model", "at most 256 classes for uint8 labels", str(model.num_classes), "Use fewer")
    if device is not None:
        model = model.to(device)
    was_training = model.training
    model.eval()
    lo, hi = intensity_range(volume, normalize, percentiles, name="volume to segment")
    out = np.empty(volume.shape, dtype=np.uint8) if out is None else out
    for i in range(volume.shape[axis]):
        index = tuple(i if a == axis else slice(None) for a in range(3))
        image = scale_intensity(np.asarray(volume[index], dtype=np.float32), lo, hi)
        logits = predict_logits_slice(model, image, overlap=overlap, batch_size=batch_size, weight=weight,
                                      pad_mode=pad_mode, amp=amp)
        out[index] = logits.argmax(0).to(torch.uint8).cpu().numpy()
    model.train(was_training)
    return out


def pixel_accuracy(pred: np.ndarray, labels: np.ndarray, ignore_index: int = 255) -> float:
    """Share of labelled pixels (``labels != ignore_index``) where ``pred == labels``."""
    valid = labels != ignore_index
    return float((pred[valid] == labels[valid]).mean()) if valid.any() else float("nan")
