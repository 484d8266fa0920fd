"""Export a pre-trained encoder: safetensors with timm's key names, plus a JSON of its shape and origin.

:func:`micromae.models.pretrained.load_encoder` reads the pair back.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from micromae.io import atomic_path
from micromae.models.pretrained import load_encoder, normalization_record


def export_encoder(checkpoint: str | Path, output: str | Path, branch: int = 1) -> Path:
    """Write ``output`` (.safetensors) and ``output`` with .json: ``timm_kwargs``, ``pos_embed_weight``, hash,
    ``normalization`` (the input scaling of the run: mode, percentiles, ``channel_stats`` ranges).

    ``timm.models.vision_transformer.VisionTransformer(**meta["timm_kwargs"])`` loads the weights strictly
    (the fixed position embedding is stored already multiplied by ``pos_embed_weight``).
    """
    encoder, meta = load_encoder(checkpoint, branch=branch)
    config, sha = meta.config, meta.sha256
    normalization = None if meta.normalize is None else normalization_record(
        meta.normalize, meta.percentiles or (), meta.channel_ranges)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in encoder.to_timm_state_dict().items()}
    meta = {"timm_kwargs": encoder.timm_kwargs, "pos_embed_weight": config.get("model", {}).get("pos_embed_weight"),
            "checkpoint": str(checkpoint), "checkpoint_sha256": sha, "branch": branch,
            "objective": config.get("objective"), "normalization": normalization}
    with atomic_path(output, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={"checkpoint_sha256": sha})
    with atomic_path(output.with_suffix(".json"), overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2, default=str))
    return output
