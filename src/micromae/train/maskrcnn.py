"""Fine-tune Mask R-CNN with the ViT backbone on COCO instance masks (DAMA.md §2, paper Tables 2-3).

``micromae finetune configs/maskrcnn_*.yaml`` (``task: instances``) runs :func:`run_maskrcnn_finetune`: the
encoder is random or comes from ``init`` (a pre-training checkpoint, DAMA branch ``init_branch``; an exported
``.safetensors`` encoder; or a Mask R-CNN checkpoint of ours), the detector is
:func:`micromae.models.heads.maskrcnn.build_maskrcnn`, samples are random crops with large-scale jitter
(:mod:`micromae.data.coco`), and the engine trains with AdamW and layer-wise lr decay (the ViT's layers as in
:mod:`micromae.train.layer_decay`; the pyramid, RPN and RoI heads are the top layer).

The objective builds the optimiser (:meth:`InstanceObjective.build_optimizer`: AdamW over
:func:`build_layer_decay_optimizer`'s groups). Checkpoints, ``--resume``, logging and the NaN guard are the
engine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from micromae.config import TrainConfig, from_dict, load_config
from micromae.config_tasks import MaskRCNNConfig
from micromae.data.coco import CocoInstanceDataset, instance_batches
from micromae.data.channel_norm import check_normalize
from micromae.data.run_folder import synthetic_mif_in_run
from micromae.errors import input_error
from micromae.models import ViTEncoder
from micromae.models.heads.maskrcnn import build_maskrcnn
from micromae.models.pretrained import load_encoder
from micromae.runtime import eval_mode, unwrap
from micromae.train.checkpoint import load_checkpoint
from micromae.train.distributed import main_process_first
from micromae.train.engine import Objective, TrainResult
from micromae.train.layer_decay import build_layer_decay_optimizer
from micromae.train.run import RunContext, RunPlan, run_training

SHAPE_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")


def check_maskrcnn_config(cfg: MaskRCNNConfig) -> None:
    """Raise MicromaeInputError for values the dataclass types cannot rule out (the coercer checks the
    choices: ``task``, ``data.source``, ``inference``, ``init_branch``, ``data.normalize``)."""
    if cfg.data.source == "coco" and not cfg.data.annotations:
        raise input_error("data.annotations", "a COCO JSON file", "nothing",
                          "Set data.annotations=/path/to/annotations.json")
    if not 0.0 <= cfg.tile_overlap < 1.0:
        raise input_error("tile_overlap", "a number in [0, 1)", str(cfg.tile_overlap), "e.g. tile_overlap=0.25")
    if len(cfg.data.scale_range) != 2 or cfg.num_classes < 0:
        raise input_error("data.scale_range / num_classes", "[low, high] / >= 0",
                          f"{cfg.data.scale_range} / {cfg.num_classes}",
                          "e.g. data.scale_range=[0.1,2.0] num_classes=0")
    check_normalize(cfg.data.normalize, cfg.data.percentiles)


def load_maskrcnn_config(path: str | Path, overrides: list[str] | None = None) -> MaskRCNNConfig:
    """Read a Mask R-CNN preset (``configs/maskrcnn_*.yaml``) with ``key=value`` overrides, checked."""
    cfg = load_config(path, MaskRCNNConfig, overrides)
    check_maskrcnn_config(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# model


def build_encoder(cfg: MaskRCNNConfig) -> ViTEncoder:
    """A randomly initialised encoder of ``cfg.model``'s shape."""
    return ViTEncoder.from_config(cfg.model)


def build_model(cfg: MaskRCNNConfig, encoder: ViTEncoder | None = None) -> nn.Module:
    """Mask R-CNN for ``cfg`` (``cfg.num_classes`` must be resolved) around ``encoder`` (default: random)."""
    d = cfg.detector
    encoder = build_encoder(cfg) if encoder is None else encoder
    return build_maskrcnn(
        encoder, cfg.num_classes, strides=d.strides, out_channels=d.out_channels,
        anchor_sizes=d.anchor_sizes or None, aspect_ratios=d.aspect_ratios, image_mean=d.image_mean or None,
        image_std=d.image_std or None, representation_size=d.representation_size,
        mask_head_channels=d.mask_head_channels, box_detections_per_img=d.detections_per_img,
        box_score_thresh=d.score_thresh, rpn_batch_size_per_image=d.rpn_batch_size_per_image,
        box_batch_size_per_image=d.box_batch_size_per_image)


def init_encoder(cfg: MaskRCNNConfig) -> tuple[ViTEncoder, str]:
    """This run's encoder and where its weights come from. A checkpoint's encoder must have ``cfg.model``'s
    shape (channels, patch size, width, depth, heads); its fixed ``pos_embed`` is kept when the grids agree."""
    encoder = build_encoder(cfg)
    if cfg.init == "random":
        return encoder, "random"
    loaded = load_encoder(cfg.init, branch=cfg.init_branch)[0]
    found = {"patch_size": loaded.patch_size, "in_chans": loaded.in_chans, "embed_dim": loaded.embed_dim,
             "depth": loaded.depth, "num_heads": loaded.blocks[0].attn.num_heads,
             "mlp_ratio": loaded.blocks[0].mlp.fc1.out_features / loaded.embed_dim}
    wrong = {k: v for k, v in found.items() if v != getattr(cfg.model, k)}
    if wrong:
        raise input_error(f"init checkpoint '{cfg.init}'", "an encoder of this run's shape ("
                          + ", ".join(f"{k} {getattr(cfg.model, k)}" for k in wrong) + ")",
                          ", ".join(f"{k} {v}" for k, v in wrong.items()),
                          "Set " + " ".join(f"model.{k}={v}" for k, v in wrong.items()) + " (a checkpoint "
                          "pre-trained on another channel panel cannot be used for these images)")
    weights = loaded.state_dict()
    if weights["pos_embed"].shape != encoder.pos_embed.shape:
        weights["pos_embed"] = encoder.pos_embed  # another img_size: the sin-cos table of this run's grid
    encoder.load_state_dict(weights)
    return encoder, f"{cfg.init} (branch {cfg.init_branch})" if Path(cfg.init).suffix == ".pt" else cfg.init


def load_maskrcnn_model(path: str | Path, device: str | torch.device = "cpu"
                        ) -> tuple[nn.Module, MaskRCNNConfig]:
    """A fine-tuned Mask R-CNN and its config from a checkpoint of :func:`run_maskrcnn_finetune`, in eval mode."""
    state = load_checkpoint(path, map_location=device)
    config = state.get("config") or {}
    if config.get("task") != "instances":
        raise input_error(f"checkpoint '{path}'", "a Mask R-CNN checkpoint (micromae finetune maskrcnn_*)",
                          f"a checkpoint of task {config.get('task', config.get('objective'))!r}",
                          "Pass RUN_DIR/checkpoints/last.pt of an instance-segmentation run")
    cfg = from_dict(MaskRCNNConfig, config)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------------------------------------
# data, objective, optimiser


def build_instance_dataset(cfg: MaskRCNNConfig, run_dir: Path) -> CocoInstanceDataset:
    """The training set of ``cfg.data`` (synthetic images are written once into ``run_dir``)."""
    d = cfg.data
    annotations = d.annotations
    if d.source == "synthetic_mif":
        root = synthetic_mif_in_run(run_dir, d.n_images, d.synthetic_shape, d.synthetic_seed)
        annotations = str(root / "annotations.json")
    return CocoInstanceDataset(annotations, image_root=d.image_root, axes=d.axes, crop_size=d.crop_size,
                               scale_range=d.scale_range, flip=d.flip, normalize=d.normalize,
                               percentiles=d.percentiles)


def resolve_classes(cfg: MaskRCNNConfig, dataset: CocoInstanceDataset, encoder: ViTEncoder, origin: str) -> None:
    """Fill ``num_classes``/``category_ids`` from the data; check the data's channels against the encoder."""
    if dataset.num_channels != encoder.in_chans:
        raise input_error(f"images of '{dataset.annotation_file}'", f"{encoder.in_chans} channels (the encoder, "
                          f"{origin})", f"{dataset.num_channels} channels",
                          f"Use an encoder pre-trained on {dataset.num_channels}-channel images, or set "
                          f"model.in_chans={dataset.num_channels} with init=random (check data.axes)")
    if cfg.category_ids and cfg.category_ids != dataset.category_ids:
        raise input_error("category_ids", f"the training data's categories {dataset.category_ids}",
                          str(cfg.category_ids), "Leave category_ids empty (filled from the data)")
    cfg.category_ids = list(dataset.category_ids)
    if cfg.num_classes not in (0, len(cfg.category_ids)):
        raise input_error("num_classes", f"0 or the data's category count {len(cfg.category_ids)}",
                          str(cfg.num_classes), "Leave num_classes=0")
    cfg.num_classes = len(cfg.category_ids)


class InstanceObjective(Objective):
    """Sum of Mask R-CNN's five losses on ``(images (B, C, S, S), targets)`` batches; each is logged."""

    name = "maskrcnn"
    figure_name = "instances"

    def __init__(self, model: nn.Module, encoder: ViTEncoder, layer_decay: float) -> None:
        super().__init__(model)
        self.encoder, self.layer_decay = encoder, layer_decay

    def build_optimizer(self, cfg: TrainConfig) -> torch.optim.AdamW:
        """AdamW with layer-wise lr decay over the ViT; pyramid, RPN and RoI heads are the top layer."""
        return build_layer_decay_optimizer(self.model, self.encoder, cfg.lr, cfg.weight_decay, self.layer_decay,
                                           betas=tuple(cfg.betas))

    def loss(self, module: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = batch
        losses = module(list(images), targets)
        total = sum(losses.values())
        return total, {k: float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def save_figure(self, batch: Any, path: Path) -> None:
        """First channel of up to 4 crops with the true boxes (green) and detections scoring > 0.5 (red)."""
        from matplotlib.patches import Rectangle

        from micromae.figures import plt, save_figure  # local: this method shares the helper's name

        model = unwrap(self.model)
        images, targets = batch[0][:4], batch[1][:4]
        with eval_mode(model):
            outputs = model(list(images.float()))
        fig, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 2.8), squeeze=False)
        for ax, img, tgt, out in zip(axes[0], images, targets, outputs):
            ax.imshow(img[0].float().cpu().numpy(), cmap="gray")
            for boxes, color in ((tgt["boxes"], "lime"), (out["boxes"][out["scores"] > 0.5], "red")):
                for x1, y1, x2, y2 in boxes.cpu().tolist():
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, lw=0.8))
            ax.set_axis_off()
        axes[0, 0].set_title("green: truth, red: detections > 0.5", fontsize=7, loc="left")
        save_figure(fig, path)


def build_maskrcnn_run(cfg: MaskRCNNConfig, ctx: RunContext) -> RunPlan:
    """The instance data set, the encoder (from ``cfg.init`` unless resuming), the detector and its objective;
    the classes are resolved into ``cfg`` from the data."""
    info, device, run_dir = ctx.info, ctx.device, ctx.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # the main process writes synthetic images once, the others wait and read them
    dataset = main_process_first(info, lambda: build_instance_dataset(cfg, run_dir))
    # a resumed run gets its weights from its own checkpoint
    encoder, origin = init_encoder(cfg) if ctx.resume_from is None else (build_encoder(cfg), "resume")
    resolve_classes(cfg, dataset, encoder, origin)
    model = build_model(cfg, encoder)
    n_params = sum(p.numel() for p in model.parameters())
    message = (f"device {device}, world size {info.world_size}; Mask R-CNN {n_params / 1e6:.2f} M parameters, "
               f"{cfg.num_classes} class(es); encoder init {origin}; {len(dataset)} images, "
               f"{cfg.data.crop_size}-px crops; run dir {run_dir}")

    def open_stream(start: int):
        return instance_batches(dataset, cfg.train.batch_size, start, cfg.train.seed, info.rank,
                                cfg.data.num_workers, device.type == "cuda")

    return RunPlan(InstanceObjective(model, encoder, cfg.layer_decay), open_stream, cfg, messages=[message])


def run_maskrcnn_finetune(cfg: MaskRCNNConfig, run_dir: str | Path, resume: str | None = None,
                          stop_after: int | None = None) -> TrainResult:
    """Train Mask R-CNN; writes config.yaml (classes resolved), log.jsonl, tb/, checkpoints/, figures/."""
    return run_training(cfg, run_dir, resume, stop_after, check_maskrcnn_config,
                        lambda ctx: build_maskrcnn_run(cfg, ctx), seed_numpy=True)
