"""The fine-tuning config trees: segmentation baselines, cell-type classification and Mask R-CNN.

Each is a :class:`FinetuneConfig` (``name``, ``task``, ``init``, a ``model`` section that is a
:class:`~micromae.config.ModelConfig` and a ``train`` section that is a :class:`~micromae.config.TrainConfig`)
with the task's own defaults and sections. Valid choices are ``Literal[...]`` annotations, checked by the
coercer of :mod:`micromae.config` like every other type; range checks and checks that need the models or data
(heads, normalisation) are the trainers' (``check_*_config`` in :mod:`micromae.train`).

A section given in a YAML file starts from its class defaults, not from the parent's ``default_factory``; so a
task that wants other section defaults declares a subclass of the section (:class:`ClassifyModelConfig`,
:class:`ClassifyTrainConfig`) rather than a ``default_factory`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from micromae.config import Amp, DataConfig, ModelConfig, Normalize, TrainConfig

Head = Literal["segmenter", "vit_decoder"]  # micromae.models.heads.HEADS
Partial = Literal["none", "slices", "blocks"]
Axis = Literal["Z", "Y", "X"]
Inference = Literal["whole", "tiles"]
Branch = Literal[1, 2]  # DAMA's two branches


@dataclass
class FinetuneConfig:
    """What every fine-tuning run has: a ``name``, the ``task`` that ``micromae finetune`` dispatches on, the
    encoder's ``init`` (``random`` or a checkpoint path), the ``model`` and the ``train`` sections."""

    name: str = "finetune"
    task: str = "segmentation"
    init: str = "random"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------------------
# segmentation baselines (micromae.train.seg_finetune)


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
    partial: Partial = "none"
    fraction: float = 1.0
    slice_axis: Axis = "Z"
    block_size: int = 32
    seed: int = 0
    ignore_outside_cell: bool = False


@dataclass
class SegFinetuneConfig(FinetuneConfig):
    """One supervised run. ``model``: the encoder fields, and ``decoder_*`` for the head (the MAE-only fields
    ``mask_ratio`` and ``norm_pix_loss`` are unused). ``init``: ``random`` or a MAESTER checkpoint path."""

    name: str = "segmenter"
    task: Literal["segmentation"] = "segmentation"  # classification / instances are the other trees
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pos_embed_weight=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64))
    head: Head = "segmenter"
    num_classes: int = 6
    ignore_index: int = 255
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)


# ----------------------------------------------------------------------------------------------------------
# cell-type classification (micromae.train.classify)


@dataclass
class ClassifyModelConfig(ModelConfig):
    """The encoder's shape for ``init: random`` (a checkpoint brings its own; ``img_size`` is then the
    pre-training side and ``data.size`` the fine-tuning one). Only the encoder fields are used: stochastic
    depth is ``train.drop_path``, and the decoder / masking fields must keep their defaults (the check says so)."""

    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 7
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    pos_embed_weight: float = 1.0


EncoderConfig = ClassifyModelConfig  # its name before the model section became a ModelConfig


@dataclass
class ClassifyDataConfig:
    """The crops: ``root/<class>/*.tif``. ``size``: side the crops are resized to and the model runs at
    (None: the encoder's ``img_size``). ``axes``: file dimension order (CYX, YXC; None: from metadata).
    ``channels``: names or indices to keep (None: all). ``classes``: class folders in label order (None:
    sorted sub-folders). ``normalize``: ``dtype`` (divide by the type's maximum, DAMA), ``percentile`` (per
    crop file and channel, ``percentiles`` to [0, 1], clipped; this stretches a marker-negative crop's
    background and hurt on synthetic crops), ``minmax``, or ``channel_stats`` (one range per channel for the
    folder); the fine-tuned checkpoint carries it, and evaluation reads crops the same way."""

    root: str | None = None
    axes: str | None = None
    size: int | None = None
    channels: list[str | int] | None = None
    classes: list[str] | None = None
    train_files: list[str] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    augment: bool = True  # random 90° rotations and flips
    normalize: Normalize = "dtype"
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.8])


@dataclass
class ClassifyTrainConfig(TrainConfig):
    """Optimisation (paper recipe in ``classify_brain.yaml``): :class:`TrainConfig` with MAE's fine-tuning
    defaults, plus epochs, ``blr``, layer decay, stochastic depth and mixing. ``lr``: null = ``blr`` × batch /
    256. Biases and norms are always out of weight decay (layer-decay groups) and no figures are drawn, so
    ``no_decay_bias_norm`` and ``figure_every`` must keep their defaults."""

    batch_size: int = 64  # per process
    lr: float | None = None
    weight_decay: float = 0.05
    no_decay_bias_norm: bool = True
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr: float = 1e-6
    amp: Amp = "auto"
    figure_every: int = 0
    epochs: float | None = 150.0  # null: use ``steps`` and ``warmup_steps``
    warmup_epochs: float = 5.0
    blr: float = 5e-4
    layer_decay: float = 0.65
    drop_path: float = 0.1
    mixup: float = 0.8  # Beta(α, α) of mixup; 0 disables
    cutmix: float = 1.0  # Beta(α, α) of cutmix; 0 disables
    mixup_prob: float = 1.0  # chance a batch is mixed at all
    mixup_switch_prob: float = 0.5  # chance cutmix is used instead of mixup when both are on
    smoothing: float = 0.1


@dataclass
class ClassifyConfig(FinetuneConfig):
    """One classification fine-tuning run. ``init``: random | a checkpoint (.pt) | an exported encoder
    (.safetensors)."""

    name: str = "classify"
    task: Literal["classification"] = "classification"
    model: ClassifyModelConfig = field(default_factory=ClassifyModelConfig)
    train: ClassifyTrainConfig = field(default_factory=ClassifyTrainConfig)
    init_branch: Branch = 1  # DAMA branch of a DAMA checkpoint
    num_classes: int | None = None  # null: the number of class folders
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)


# ----------------------------------------------------------------------------------------------------------
# Mask R-CNN (micromae.train.maskrcnn)


@dataclass
class InstanceDataConfig:
    """Training data. ``source``: ``coco`` (``annotations`` JSON, images under ``image_root``, default the
    JSON's folder) or ``synthetic_mif`` (``n_images`` synthetic multiplex images of ``synthetic_shape``,
    written once into ``RUN_DIR/synthetic_mif``). ``crop_size``: training crops; ``scale_range``: LSJ
    (``[1.0, 1.0]``: none); ``flip``: random flips. ``normalize`` (``dtype``, ``percentile``, ``minmax``) and
    ``percentiles``: how each whole image is scaled to [0, 1] before cropping
    (:func:`~micromae.data.multichannel.normalize_channels`); ``micromae evaluate instances`` reads the
    checkpoint's choice."""

    source: Literal["coco", "synthetic_mif"] = "coco"
    annotations: str | None = None
    image_root: str | None = None
    axes: str | None = None
    crop_size: int = 128
    scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])
    flip: bool = True
    normalize: Normalize = "dtype"
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.8])
    num_workers: int = 0
    n_images: int = 8
    synthetic_shape: list[int] = field(default_factory=lambda: [256, 256])
    synthetic_seed: int = 0


@dataclass
class DetectorConfig:
    """Pyramid and heads (``micromae.models.heads.maskrcnn.build_maskrcnn``). Empty ``anchor_sizes``: 4 ×
    stride; empty ``image_mean``/``image_std``: 0 / 1 per channel (inputs as pre-trained, in [0, 1])."""

    strides: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    out_channels: int = 256
    anchor_sizes: list[int] = field(default_factory=list)
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    image_mean: list[float] = field(default_factory=list)
    image_std: list[float] = field(default_factory=list)
    representation_size: int = 1024
    mask_head_channels: int = 256
    detections_per_img: int = 100
    score_thresh: float = 0.05
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512


@dataclass
class MaskRCNNConfig(FinetuneConfig):
    """One Mask R-CNN fine-tuning run. ``num_classes`` 0: the data's category count; ``category_ids`` (filled
    from the data) maps label ``k`` to COCO category ``category_ids[k - 1]``. ``init``: ``random`` or a path;
    ``inference``: how ``micromae evaluate instances`` predicts whole images (``whole``: one pass with the
    pos-embed of the image's grid; ``tiles``: crop-size tiles, stitched)."""

    name: str = "maskrcnn"
    task: Literal["instances"] = "instances"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pos_embed_weight=1.0, drop_path_rate=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        batch_size=16, lr=1e-4, weight_decay=0.1, no_decay_bias_norm=True, schedule="cosine"))
    init_branch: Branch = 1
    num_classes: int = 0
    category_ids: list[int] = field(default_factory=list)
    layer_decay: float = 0.7
    inference: Inference = "tiles"
    tile_overlap: float = 0.25
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    data: InstanceDataConfig = field(default_factory=InstanceDataConfig)


TASK_CONFIGS: dict[str, type] = {"segmentation": SegFinetuneConfig, "classification": ClassifyConfig,
                                 "instances": MaskRCNNConfig}
