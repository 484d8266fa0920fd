"""One loader for every file micromae writes that holds a ViT encoder, and the raw checkpoint reader.

:func:`load_encoder` reads

- a pre-training checkpoint (``micromae pretrain``: MAE / MAESTER and data2vec store the encoder under
  ``encoder.``, DAMA under ``branch1.encoder.`` and ``branch2.encoder.``);
- a fine-tuning checkpoint (segmentation and classification: ``encoder.``; Mask R-CNN:
  ``backbone.encoder.``);
- an exported ``.safetensors`` encoder with its ``.json`` description beside it (``micromae export-encoder``),

and returns the encoder and an :class:`EncoderMeta` (the run config, the normalisation the run read its
images with, the file's SHA-256, the kind of file).

The position embedding is the fixed sin-cos table times ``pos_embed_weight``; ``pos_embed=`` says what to do
with the stored table:

- ``keep``: load it as stored (the input side must be the stored one, else a clear error);
- ``interpolate``: resample it to the new token grid (bicubic, CLS row kept), the classifier's policy;
- ``recompute``: ignore it and use the sin-cos table of the new grid times ``pos_embed_weight`` (the
  checkpoint's weight unless given), the segmentation baselines' policy. Mask R-CNN's "keep when the grids
  agree, else a new table" is ``keep`` or ``recompute`` picked by the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from micromae.errors import input_error
from micromae.io import file_sha256
from micromae.runtime import say
from micromae.models.dama import encoder_state_dict
from micromae.models.pos_embed import interpolate_pos_embed
from micromae.models.vit import ENCODER_FIELDS, ViTEncoder

__all__ = ["ENCODER_FIELDS", "POS_EMBED_POLICIES", "EncoderMeta", "InputNormalization", "encoder_fields",
           "input_normalization", "load_checkpoint", "load_encoder", "normalization_record", "read_encoder_weights",
           "read_normalization"]

POS_EMBED_POLICIES = ("keep", "interpolate", "recompute")


@dataclass
class EncoderMeta:
    """What an encoder file says about the run that trained it.

    ``config``: the run's resolved config dict (``{}`` for an export without one); ``fields``: the stored
    encoder's :data:`ENCODER_FIELDS`; ``normalize`` / ``percentiles``: the run's ``data.normalize`` and
    ``data.percentiles`` (None when the file does not record them); ``sha256``: of the file; ``source``:
    ``pretrain``, ``finetune`` or ``safetensors``; ``provenance``: a small dict saved with runs that start
    from this file (``init``, ``format``, ``objective``, ``branch``, ...); ``channel_ranges``: for
    ``channel_stats``, the per-channel ``[[lo...], [hi...]]`` the run scaled its images with (None otherwise
    or when the file does not record them).
    """

    config: dict[str, Any]
    fields: dict[str, Any]
    sha256: str
    source: str
    normalize: str | None = None
    percentiles: tuple[float, ...] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    channel_ranges: list[list[float]] | None = None


def normalization_record(normalize: str, percentiles: Any, channel_ranges: Any = None) -> dict[str, Any]:
    """What checkpoints (under ``config["normalization"]``) and exported encoders (``normalization`` in the
    JSON) store about the input scaling: ``{"normalize", "percentiles", "channel_ranges"}`` (``(2, C)`` as
    nested lists, or None)."""
    ranges = None if channel_ranges is None else [[float(v) for v in row] for row in channel_ranges]
    return {"normalize": str(normalize), "percentiles": [float(p) for p in percentiles], "channel_ranges": ranges}

def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``train.checkpoint.save_checkpoint``, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise input_error("checkpoint", "an existing .pt file", f"'{path}' does not exist",
                          "Pass a checkpoint from RUN_DIR/checkpoints/, e.g. last.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise input_error(f"checkpoint '{path}'", "a micromae checkpoint", f"an unreadable file ({exc})",
                          "The file is corrupt or truncated: use another checkpoint") from exc
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise input_error(f"checkpoint '{path}'", "a dict with 'model' and 'step'",
                          f"{type(state).__name__} with keys {sorted(state)[:8] if isinstance(state, dict) else '-'}",
                          "Pass a checkpoint written by micromae pretrain")
    return state


def encoder_fields(encoder: ViTEncoder) -> dict[str, Any]:
    """The :data:`ENCODER_FIELDS` that rebuild ``encoder``'s shape (``img_size`` as its side)."""
    kw = encoder.timm_kwargs
    return {"img_size": int(encoder.img_size[0]), "patch_size": encoder.patch_size, "in_chans": encoder.in_chans,
            "embed_dim": encoder.embed_dim, "depth": encoder.depth, "num_heads": kw["num_heads"],
            "mlp_ratio": float(kw["mlp_ratio"]), "qkv_bias": bool(kw["qkv_bias"]),
            "pos_embed_weight": encoder.pos_embed_weight}


def _normalisation(config: dict[str, Any], record: dict[str, Any] | None = None
                   ) -> tuple[str | None, tuple[float, ...] | None, list[list[float]] | None]:
    """``(normalize, percentiles, channel_ranges)`` of a file: its normalisation record, else the config's
    ``data.normalize`` / ``data.percentiles`` (files written before the record: no ranges)."""
    record = record or config.get("normalization") or {}
    data = config.get("data") or {}
    pct = record.get("percentiles", data.get("percentiles"))
    return (record.get("normalize", data.get("normalize")), None if pct is None else tuple(float(p) for p in pct),
            record.get("channel_ranges"))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], EncoderMeta]:
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise input_error(f"encoder '{path}'", f"its description '{meta_path.name}' beside it",
                          "no JSON file", "Export encoders with `micromae export-encoder`, which writes both")
    meta = json.loads(meta_path.read_text())
    kw = meta["timm_kwargs"]
    fields = {k: kw[k] for k in ENCODER_FIELDS if k in kw}
    fields.setdefault("qkv_bias", True)
    fields["pos_embed_weight"] = meta.get("pos_embed_weight") or 1.0
    config = meta.get("config") or {}
    provenance = {"init": str(path), "format": "safetensors", "objective": meta.get("objective"),
                  "branch": meta.get("branch"), "checkpoint_sha256": meta.get("checkpoint_sha256")}
    normalize, pct, ranges = _normalisation(config, meta.get("normalization"))
    return load_file(str(path)), EncoderMeta(config, fields, file_sha256(path), "safetensors", normalize, pct,
                                             provenance, ranges)


def _read_pt(path: Path, branch: int, map_location: str | torch.device) -> tuple[dict[str, torch.Tensor],
                                                                                  EncoderMeta]:
    state = load_checkpoint(path, map_location=map_location)
    config = state.get("config") or {}
    model = {"qkv_bias": True, **(config.get("model") or {})}  # qkv_bias: ViTEncoder's default when unrecorded
    missing = [k for k in ENCODER_FIELDS if k not in model]
    if missing:
        raise input_error(f"checkpoint '{path}'", "a config with the encoder's shape (model.*)",
                          f"no model.{missing[0]}", "Pass a checkpoint written by micromae pretrain or finetune")
    if config.get("task") == "instances":  # Mask R-CNN: the encoder is the backbone's
        prefix = "backbone.encoder."
        weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    else:
        weights = encoder_state_dict(state["model"], branch)
    provenance = {"init": str(path), "format": "checkpoint", "objective": config.get("objective"),
                  "branch": branch, "step": state.get("step")}
    normalize, pct, ranges = _normalisation(config)
    source = "finetune" if config.get("task") else "pretrain"
    return weights, EncoderMeta(config, {k: model[k] for k in ENCODER_FIELDS}, file_sha256(path), source,
                                normalize, pct, provenance, ranges)


def read_encoder_weights(path: str | Path, branch: int | None = None, map_location: str | torch.device = "cpu"
                         ) -> tuple[dict[str, torch.Tensor], EncoderMeta]:
    """The encoder state dict stored in ``path`` (timm key names) and its :class:`EncoderMeta`.

    ``branch``: DAMA's branch (1 or 2; None: 1); files with one encoder ignore it.
    """
    path = Path(path)
    if not path.is_file():
        raise input_error("init", "random, a checkpoint (.pt) or an exported encoder (.safetensors)",
                          f"'{path}' (no such file)", "Check the path, e.g. runs/dama/checkpoints/last.pt")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pt(path, 1 if branch is None else branch, map_location)


def load_encoder(path: str | Path, branch: int | None = None, img_size: int | None = None,
                 pos_embed: str = "keep", pos_embed_weight: float | None = None, drop_path_rate: float = 0.0,
                 map_location: str | torch.device = "cpu") -> tuple[ViTEncoder, EncoderMeta]:
    """The ViT encoder stored in ``path`` and the metadata it was trained with.

    Args:
        path: a micromae checkpoint (``.pt``: pre-training or fine-tuning) or an exported ``.safetensors``.
        branch: DAMA's branch (1 or 2; None: 1); files with one encoder ignore it.
        img_size: input side of the new encoder (None: the stored side); a multiple of the patch size.
        pos_embed: ``keep``, ``interpolate`` or ``recompute`` (module docstring).
        pos_embed_weight: factor on the sin-cos table of the new encoder (None: the stored one). With
            ``keep`` / ``interpolate`` the stored table is loaded, so only ``recompute`` uses it.
        drop_path_rate: stochastic depth of the new encoder (a training setting, not stored in files).
    Returns:
        ``(encoder, meta)``: the encoder in train mode (call ``.eval()`` for inference); ``meta.provenance``
        also holds ``pretrain_img_size``.
    """
    if pos_embed not in POS_EMBED_POLICIES:
        raise input_error("pos_embed", "one of " + ", ".join(POS_EMBED_POLICIES), repr(pos_embed),
                          "Use keep, interpolate or recompute")
    weights, meta = read_encoder_weights(path, branch, map_location)
    fields = meta.fields
    old_side, patch = int(fields["img_size"]), int(fields["patch_size"])
    side = old_side if img_size is None else int(img_size)
    if side % patch:
        raise input_error("fine-tuning image size", f"a multiple of the checkpoint's patch size {patch}",
                          str(side), f"Set data.size to e.g. {max(1, side // patch) * patch}")
    if pos_embed == "keep" and side != old_side:
        raise input_error(f"encoder '{path}'", f"input side {old_side} (pos_embed=keep loads the stored table)",
                          str(side), "Use pos_embed=interpolate or recompute for another input side")
    weight = fields["pos_embed_weight"] if pos_embed_weight is None or pos_embed != "recompute" else pos_embed_weight
    encoder = ViTEncoder(**{**fields, "img_size": side, "pos_embed_weight": weight}, drop_path_rate=drop_path_rate)
    if pos_embed == "recompute":
        weights = {k: v for k, v in weights.items() if k != "pos_embed"}
        weights["pos_embed"] = encoder.pos_embed
    elif side != old_side and "pos_embed" in weights:
        weights = {**weights, "pos_embed": interpolate_pos_embed(weights["pos_embed"], encoder.grid_size,
                                                                 old_grid=old_side // patch)}
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as exc:
        raise input_error(f"encoder weights in '{path}'", f"an encoder of shape {fields}",
                          f"a mismatch ({str(exc).splitlines()[-1].strip()})",
                          "Pass a checkpoint written by micromae pretrain, finetune or export-encoder") from exc
    meta.provenance["pretrain_img_size"] = old_side
    return encoder, meta


def read_normalization(path: str | Path) -> tuple[str | None, tuple[float, ...] | None, list[list[float]] | None]:
    """``(normalize, percentiles, channel_ranges)`` stored with an encoder file (a checkpoint or an exported
    ``.safetensors`` with its JSON), without building the encoder; Nones for what the file does not record."""
    path = Path(path)
    if path.suffix == ".safetensors":
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return _normalisation(meta.get("config") or {}, meta.get("normalization"))
    return _normalisation(load_checkpoint(path).get("config") or {})


@dataclass(frozen=True)
class InputNormalization:
    """How images are scaled for an encoder: ``normalize``, ``percentiles`` and, for ``channel_stats`` with the
    pre-training's settings, its per-channel ``ranges`` (``(2, C)`` nested lists; None: computed from the data
    read)."""

    normalize: str
    percentiles: tuple[float, ...]
    ranges: list[list[float]] | None = None


def input_normalization(path: str | Path | None, normalize: str | None = None,
                        percentiles: Any = None, default: str = "dtype",
                        default_percentiles: Any = (0.5, 99.8), who: str = "encoder") -> InputNormalization:
    """The input scaling for the encoder in ``path``: the one stored with it, unless ``normalize`` /
    ``percentiles`` override it; an override that differs from the stored setting is said as a warning.

    ``path`` None or ``"random"`` (no stored setting), and files that record nothing, use the override, else
    ``default`` / ``default_percentiles``. The stored ``channel_ranges`` are used when the result is the
    stored ``channel_stats`` with the stored percentiles.
    """
    stored = (None, None, None) if path is None or str(path) == "random" else read_normalization(path)
    mode = normalize if normalize is not None else stored[0] or default
    pct = tuple(float(p) for p in (percentiles if percentiles is not None else stored[1] or default_percentiles))
    if stored[0] is not None and (mode != stored[0] or (stored[1] is not None and pct != stored[1]
                                                        and mode != "dtype")):
        say(f"warning: {who} '{path}' was pre-trained on images scaled with normalize={stored[0]} "
            f"percentiles={list(stored[1] or ())}, these are read with normalize={mode} percentiles={list(pct)} "
            "(the override); drop it to use the stored setting")
    ranges = stored[2] if mode == "channel_stats" and stored[0] == "channel_stats" and pct == stored[1] else None
    return InputNormalization(mode, pct, ranges)
