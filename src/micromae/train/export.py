"""Export a pre-trained encoder: safetensors with timm's key names, plus a JSON of its shape and origin."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from micromae.io import atomic_path
from micromae.models import ViTEncoder
from micromae.train.checkpoint import load_pretrained_encoder


def export_encoder(checkpoint: str | Path, output: str | Path, branch: int = 1) -> Path:
    """Write ``output`` (.safetensors) and ``output`` with .json: ``timm_kwargs``, ``pos_embed_weight``, hash.

    ``timm.models.vision_transformer.VisionTransformer(**meta["timm_kwargs"])`` loads the weights strictly
    (the fixed position embedding is stored already multiplied by ``pos_embed_weight``).
    """
    encoder, config, sha = load_pretrained_encoder(checkpoint, branch=branch)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in encoder.to_timm_state_dict().items()}
    meta = {"timm_kwargs": encoder.timm_kwargs, "pos_embed_weight": config.get("model", {}).get("pos_embed_weight"),
            "checkpoint": str(checkpoint), "checkpoint_sha256": sha, "branch": branch,
            "objective": config.get("objective")}
    with atomic_path(output, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={"checkpoint_sha256": sha})
    with atomic_path(output.with_suffix(".json"), overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2, default=str))
    return output


def load_exported_encoder(path: str | Path) -> ViTEncoder:
    """Rebuild a :class:`ViTEncoder` from :func:`export_encoder`'s files."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    kw = dict(meta["timm_kwargs"])
    encoder = ViTEncoder(img_size=kw["img_size"], patch_size=kw["patch_size"], in_chans=kw["in_chans"],
                         embed_dim=kw["embed_dim"], depth=kw["depth"], num_heads=kw["num_heads"],
                         mlp_ratio=kw["mlp_ratio"], qkv_bias=kw.get("qkv_bias", True),
                         pos_embed_weight=meta.get("pos_embed_weight") or 1.0)
    encoder.load_state_dict(load_file(str(path)))
    return encoder.eval()
