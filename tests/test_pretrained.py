"""The one encoder loader: every kind of file micromae writes, the three position-embedding policies, metadata."""

from __future__ import annotations

import pytest
import torch

from micromae.errors import MicromaeInputError
from micromae.models import MaskedAutoencoder, ViTEncoder, get_2d_sincos_pos_embed
from micromae.models.heads import SupervisedSegmenter, build_head
from micromae.models.pretrained import ENCODER_FIELDS, encoder_fields, load_encoder
from micromae.train.checkpoint import save_checkpoint
from micromae.train.export import export_encoder

SHAPE = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
             qkv_bias=True, pos_embed_weight=0.5)


def encoder(seed: int) -> ViTEncoder:
    torch.manual_seed(seed)
    return ViTEncoder(**SHAPE)


def save(tmp_path, name: str, model: dict, config: dict):
    return save_checkpoint(tmp_path / name, {"model": model, "step": 3, "config": config})


def same_outputs(a: ViTEncoder, b: ViTEncoder) -> bool:
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_encoder_fields_and_from_config_round_trip():
    enc = encoder(0)
    assert tuple(encoder_fields(enc)) == ENCODER_FIELDS
    again = ViTEncoder.from_config(encoder_fields(enc))
    assert encoder_fields(again) == encoder_fields(enc)


def test_mae_checkpoint(tmp_path):
    torch.manual_seed(1)
    mae = MaskedAutoencoder(**SHAPE, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    path = save(tmp_path, "mae", mae.state_dict(), {"objective": "mae", "model": dict(SHAPE),
                                                     "data": {"normalize": "percentile", "percentiles": [1, 99]}})
    enc, meta = load_encoder(path)
    assert same_outputs(enc, mae.encoder)
    assert meta.source == "pretrain" and meta.fields == SHAPE and len(meta.sha256) == 64
    assert (meta.normalize, meta.percentiles) == ("percentile", (1.0, 99.0))


def test_dama_branches(tmp_path):
    b1, b2 = encoder(1), encoder(2)
    model = {**{f"branch1.encoder.{k}": v for k, v in b1.state_dict().items()},
             **{f"branch2.encoder.{k}": v for k, v in b2.state_dict().items()}}
    path = save(tmp_path, "dama", model, {"objective": "dama", "model": dict(SHAPE)})
    assert same_outputs(load_encoder(path)[0], b1)
    assert same_outputs(load_encoder(path, branch=1)[0], b1)
    assert same_outputs(load_encoder(path, branch=2)[0], b2)
    exported = export_encoder(path, tmp_path / "enc.safetensors", branch=2)
    enc, meta = load_encoder(exported)
    assert same_outputs(enc, b2) and meta.source == "safetensors" and meta.provenance["branch"] == 2
    assert meta.normalize is None  # an export without a config records no normalisation


def test_fine_tuning_checkpoints(tmp_path):
    enc = encoder(3)
    seg = SupervisedSegmenter(enc, build_head("vit_decoder", enc, 3, decoder_embed_dim=16, depth=1, num_heads=2))
    path = save(tmp_path, "seg", seg.state_dict(), {"task": "segmentation", "model": dict(SHAPE),
                                                     "data": {"normalize": "dtype"}})
    loaded, meta = load_encoder(path)
    assert same_outputs(loaded, enc) and meta.source == "finetune" and meta.normalize == "dtype"
    backbone = {f"backbone.encoder.{k}": v for k, v in encoder(4).state_dict().items()}
    path = save(tmp_path, "maskrcnn", {**backbone, "roi_heads.x": torch.zeros(1)},
                {"task": "instances", "model": dict(SHAPE)})
    assert same_outputs(load_encoder(path)[0], encoder(4))


def test_pos_embed_policies(tmp_path):
    enc = encoder(5)
    path = save(tmp_path, "mae", {f"encoder.{k}": v for k, v in enc.state_dict().items()},
                {"objective": "mae", "model": dict(SHAPE)})
    kept, _ = load_encoder(path, pos_embed="keep")
    assert torch.equal(kept.pos_embed, enc.pos_embed)
    with pytest.raises(MicromaeInputError, match="pos_embed=interpolate or recompute"):
        load_encoder(path, img_size=32, pos_embed="keep")
    big, _ = load_encoder(path, img_size=48, pos_embed="interpolate")  # 12 x 12 tokens: token 1 + 3i on old i
    old = enc.pos_embed[0, 1:].reshape(4, 4, -1)
    assert torch.allclose(big.pos_embed[0, 1:].reshape(12, 12, -1)[1::3, 1::3], old, atol=1e-5)
    new, _ = load_encoder(path, img_size=32, pos_embed="recompute", pos_embed_weight=1.0)
    torch.testing.assert_close(new.pos_embed[0], get_2d_sincos_pos_embed(32, (8, 8)))
    assert torch.equal(new.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
    same_weight, _ = load_encoder(path, img_size=32, pos_embed="recompute")  # the checkpoint's weight 0.5
    torch.testing.assert_close(same_weight.pos_embed[0], 0.5 * get_2d_sincos_pos_embed(32, (8, 8)))
    with pytest.raises(MicromaeInputError, match="pos_embed"):
        load_encoder(path, pos_embed="stretch")


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(MicromaeInputError, match="no such file"):
        load_encoder(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MicromaeInputError, match="unreadable"):
        load_encoder(tmp_path / "junk.pt")
    path = save(tmp_path, "noshape", encoder(0).state_dict(), {"model": {}})
    with pytest.raises(MicromaeInputError, match="model.img_size"):
        load_encoder(path)
    (tmp_path / "lonely.safetensors").write_bytes(b"")
    with pytest.raises(MicromaeInputError, match="lonely.json"):
        load_encoder(tmp_path / "lonely.safetensors")
