"""Mask R-CNN on the ViT encoder (ViTDet recipe, as DAMA fine-tunes it): a simple feature pyramid plugged into
torchvision.

The encoder's single stride-``p`` token map (``p`` = patch size, 16 for ViT-B/16) becomes a pyramid
(:class:`SimpleFeaturePyramid`): a level of stride ``s < p`` is reached by ``log2(p / s)`` 2×2 transposed
convolutions with a LayerNorm + GELU between them (stride 4 from 16: two, as ViTDet), ``s == p`` is the map
itself and ``s > p`` a ``s / p`` max-pool (stride 32: one 2×2 pool). Every level then goes through a 1×1 and a
3×3 convolution to ``out_channels`` (256), each followed by a LayerNorm. :class:`ViTDetBackbone` returns the
levels as an ``OrderedDict`` named ``"0", "1", ...`` (finest first); the RPN's anchor generator and both
``MultiScaleRoIAlign`` poolers are built for exactly these names (no extra ``"pool"`` level).

Everything else (RPN, RoI heads, losses, post-processing) is torchvision's
:class:`~torchvision.models.detection.MaskRCNN`. Its input transform normally resizes images to
``min_size``/``max_size``; here it only normalises with ``image_mean``/``image_std`` (one value per channel)
and pads to a multiple of the coarsest stride (:class:`PadOnlyTransform`), so crops are seen at their true
scale and whole images can be predicted at any size. When the token grid differs from the encoder's
``img_size`` the fixed sin-cos position embedding is recomputed for that grid (times the encoder's
``pos_embed_weight``): each token keeps the embedding of its own row and column, as in training.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from micromae.errors import input_error
from micromae.models.pos_embed import get_2d_sincos_pos_embed
from micromae.models.vit import ViTEncoder

__all__ = ["PadOnlyTransform", "SimpleFeaturePyramid", "ViTDetBackbone", "build_maskrcnn", "level_names"]


def level_names(n: int) -> list[str]:
    """Names of the pyramid levels, finest first: ``["0", "1", ...]`` (torchvision's FPN convention)."""
    return [str(i) for i in range(n)]


def _check_strides(strides: Sequence[int], patch_size: int) -> list[int]:
    """Strides must be ``patch_size`` times a power of two (up- and down-sampling by factors of 2)."""
    strides = [int(s) for s in strides]
    ok = len(strides) > 0 and all(s > 0 for s in strides) and strides == sorted(set(strides))
    ok = ok and all(math.log2(max(s, patch_size) / min(s, patch_size)).is_integer() and
                    max(s, patch_size) % min(s, patch_size) == 0 for s in strides)
    if not ok:
        raise input_error("pyramid strides", f"increasing values patch_size ({patch_size}) times a power of 2",
                          repr(strides), "Use e.g. strides=[4, 8, 16, 32] for patch_size=16")
    return strides


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: ``(N, D, H/p, W/p)`` -> ``{name: (N, out_channels, H/s, W/s)}``.

    Args:
        embed_dim: width ``D`` of the encoder's tokens.
        patch_size: stride ``p`` of the token map.
        strides: output strides, finest first (ViTDet: 4, 8, 16, 32 from ``p = 16``).
        out_channels: channels of every level (256).
    """

    def __init__(self, embed_dim: int, patch_size: int, strides: Sequence[int] = (4, 8, 16, 32),
                 out_channels: int = 256) -> None:
        super().__init__()
        self.strides = _check_strides(strides, patch_size)
        self.out_channels = out_channels
        self.names = level_names(len(self.strides))
        self.stages = nn.ModuleList()
        for s in self.strides:
            layers: list[nn.Module] = []
            dim = embed_dim
            if s < patch_size:  # up-sample by transposed convs, halving the width each time
                for i in range(int(math.log2(patch_size // s))):
                    if i > 0:
                        layers += [LayerNorm2d(dim), nn.GELU()]
                    layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
                    dim //= 2
            elif s > patch_size:
                layers.append(nn.MaxPool2d(kernel_size=s // patch_size, stride=s // patch_size))
            layers += [nn.Conv2d(dim, out_channels, kernel_size=1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                       LayerNorm2d(out_channels)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """x: ``(N, D, h, w)`` token map -> OrderedDict of ``(N, out_channels, h * p / s, w * p / s)``."""
        return OrderedDict((name, stage(x)) for name, stage in zip(self.names, self.stages))


class ViTDetBackbone(nn.Module):
    """Our ViT encoder + :class:`SimpleFeaturePyramid`, as torchvision detectors expect a backbone.

    ``forward(images (N, C, H, W))`` with ``H, W`` multiples of ``patch_size`` returns the pyramid
    (OrderedDict); ``out_channels`` is read by :class:`~torchvision.models.detection.MaskRCNN`.
    """

    def __init__(self, encoder: ViTEncoder, strides: Sequence[int] = (4, 8, 16, 32), out_channels: int = 256):
        super().__init__()
        self.encoder = encoder
        self.pyramid = SimpleFeaturePyramid(encoder.embed_dim, encoder.patch_size, strides, out_channels)
        self.out_channels = out_channels
        self.strides = self.pyramid.strides

    def pos_embed_for(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """``(1, gh*gw, D)`` patch position embedding for a token grid: the encoder's own one at its
        ``img_size``, otherwise the sin-cos table of this grid times ``pos_embed_weight``."""
        enc = self.encoder
        if tuple(grid) == tuple(enc.grid_size):
            return enc.pos_embed[:, 1:]
        table = get_2d_sincos_pos_embed(enc.embed_dim, grid, cls_token=False) * enc.pos_embed_weight
        return table[None].to(device=like.device, dtype=like.dtype)

    def forward_map(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, D, H/p, W/p)``: every patch token after the encoder's final norm."""
        enc, p = self.encoder, self.encoder.patch_size
        n, c, h, w = images.shape
        if c != enc.in_chans or h % p or w % p:
            raise input_error("images for the detector", f"(N, {enc.in_chans}, H, W) with H, W multiples of {p}",
                              str(tuple(images.shape)), "Pass images with the encoder's channel count")
        x = enc.patch_embed.proj(images)  # (N, D, h/p, w/p); timm's PatchEmbed would insist on img_size
        grid = (x.shape[2], x.shape[3])
        tokens = x.flatten(2).transpose(1, 2)  # (N, L, D)
        tokens = enc.forward_tokens(tokens + self.pos_embed_for(grid, tokens))[:, 1:]  # CLS dropped
        return tokens.transpose(1, 2).reshape(n, enc.embed_dim, *grid)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.pyramid(self.forward_map(images))


class PadOnlyTransform(GeneralizedRCNNTransform):
    """torchvision's detector input transform without the resize: normalise per channel, pad to
    ``size_divisible``. Images (and boxes / masks) keep their size, so post-processing is the identity."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


def build_maskrcnn(encoder: ViTEncoder, num_classes: int, strides: Sequence[int] = (4, 8, 16, 32),
                   out_channels: int = 256, anchor_sizes: Sequence[int] | None = None,
                   aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), image_mean: Sequence[float] | None = None,
                   image_std: Sequence[float] | None = None, representation_size: int = 1024,
                   mask_head_channels: int = 256, **maskrcnn_kwargs) -> MaskRCNN:
    """torchvision Mask R-CNN whose backbone is ``encoder`` + the simple feature pyramid.

    Args:
        encoder: the ViT (any ``in_chans``); its weights are used as they are.
        num_classes: foreground classes (1 for "cell"); labels are ``1..num_classes``, 0 is background.
        strides: pyramid strides, finest first.
        out_channels: width of the pyramid and of the RoI features.
        anchor_sizes: one anchor size (pixels) per level; default 4 × stride.
        aspect_ratios: anchor aspect ratios, the same on every level.
        image_mean, image_std: per-channel normalisation of the inputs; default 0 and 1 (inputs stay as the
            encoder was pre-trained on them: intensities scaled to [0, 1]).
        representation_size: width of the box head's two MLP layers (1024).
        mask_head_channels: width of the mask head's four 3×3 convs (256).
        **maskrcnn_kwargs: other :class:`~torchvision.models.detection.MaskRCNN` arguments (e.g.
            ``box_detections_per_img``, ``box_score_thresh``, ``rpn_batch_size_per_image``).
    Returns:
        The model; in train mode ``model(images, targets)`` gives the five losses, in eval mode
        ``model(images)`` a list of ``{"boxes", "labels", "scores", "masks"}`` per image.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise input_error("num_classes", "a positive number of foreground classes", repr(num_classes),
                          "Use num_classes=1 for one class (cell)")
    backbone = ViTDetBackbone(encoder, strides, out_channels)
    names = level_names(len(backbone.strides))
    sizes = list(anchor_sizes) if anchor_sizes is not None else [4 * s for s in backbone.strides]
    if len(sizes) != len(names):
        raise input_error("anchor_sizes", f"one size per pyramid level ({len(names)})", repr(sizes),
                          "Give as many anchor sizes as strides")
    anchors = AnchorGenerator(tuple((int(s),) for s in sizes), (tuple(float(a) for a in aspect_ratios),) * len(names))
    c = encoder.in_chans
    mean = [0.0] * c if image_mean is None else [float(v) for v in image_mean]
    std = [1.0] * c if image_std is None else [float(v) for v in image_std]
    if len(mean) != c or len(std) != c:
        raise input_error("image_mean / image_std", f"{c} values each (one per channel)",
                          f"{len(mean)} / {len(std)} values", "Leave them empty (0 and 1) or give one per channel")
    box_pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=2)
    model = MaskRCNN(
        backbone, num_classes=None, min_size=encoder.img_size[0], max_size=max(encoder.img_size),
        image_mean=mean, image_std=std, rpn_anchor_generator=anchors, box_roi_pool=box_pool,
        box_head=TwoMLPHead(out_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        mask_roi_pool=mask_pool, mask_head=MaskRCNNHeads(out_channels, (mask_head_channels,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
        **maskrcnn_kwargs)
    model.transform = PadOnlyTransform(encoder.img_size[0], max(encoder.img_size), mean, std,
                                       size_divisible=max(max(backbone.strides), encoder.patch_size))
    model.num_classes = num_classes
    return model
