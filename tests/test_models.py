"""Tests of the ViT encoder, masking, sin-cos position embeddings and the masked autoencoder."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from micromae.errors import MicromaeInputError
from micromae.models import (
    MaskedAutoencoder, ViTEncoder, build_mae, get_2d_sincos_pos_embed, interpolate_pos_embed, mae_maester,
    mae_tiny_test, mask_from_ids_keep, random_masking, restore_from_ids_keep, vit_maester, vit_tiny_test,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _block_params(d: int, mlp_ratio: float) -> int:
    """Parameters of one pre-norm transformer block: 2 LayerNorms, qkv + proj, fc1 + fc2 (all with bias)."""
    h = int(d * mlp_ratio)
    return 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- parameter counts


def test_paper_model_parameter_counts() -> None:
    model = mae_maester()
    p, d, dd, out = 5, 192, 128, 25
    enc = (p * p * d + d) + d + 14 * _block_params(d, 2.0) + 2 * d  # patch embed, CLS, blocks, final norm
    dec = (d * dd + dd) + dd + 7 * _block_params(dd, 2.0) + 2 * dd + (dd * out + out)
    assert _count(model.encoder) == enc
    assert _count(model) - _count(model.encoder) == dec
    # The paper rounds: encoder "4.16 M", decoder "0.96 M" (half a unit of the last digit: 0.005 M),
    # total "5.1 M" (0.05 M). Position embeddings are fixed buffers, not parameters.
    assert abs(enc / 1e6 - 4.16) <= 0.005
    assert abs(dec / 1e6 - 0.96) <= 0.005
    assert abs(_count(model) / 1e6 - 5.1) <= 0.05
    assert not any(name.endswith("pos_embed") for name, _ in model.named_parameters())


# ---------------------------------------------------------------- patchify


@pytest.mark.parametrize("in_chans,patch_size,img_size", [(1, 5, 20), (3, 4, 16)])
def test_patchify_round_trip_and_layout(in_chans: int, patch_size: int, img_size: int) -> None:
    model = mae_tiny_test(in_chans=in_chans, patch_size=patch_size, img_size=img_size)
    imgs = torch.randn(2, in_chans, img_size, img_size)
    patches = model.patchify(imgs)
    g, p = img_size // patch_size, patch_size
    assert patches.shape == (2, g * g, p * p * in_chans)
    assert torch.equal(model.unpatchify(patches), imgs)
    i, j = 1, g - 1  # token k = i * g + j holds the block at row i, column j, values ordered (row, col, channel)
    block = imgs[1, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, i * g + j], block)


# ---------------------------------------------------------------- masking


def test_random_masking_counts_restore_and_variety() -> None:
    n, length, d, ratio = 8, 64, 3, 0.75
    x = torch.randn(n, length, d)
    x_vis, mask, ids_restore, ids_keep = random_masking(x, ratio)
    keep = int(length * (1 - ratio))
    assert x_vis.shape == (n, keep, d) and ids_keep.shape == (n, keep)
    assert torch.equal((mask == 0).sum(1), torch.full((n,), keep))
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - keep)))
    for b in range(n):  # the kept tokens are the unmasked ones, taken from x
        assert torch.equal(torch.sort(ids_keep[b]).values, torch.nonzero(mask[b] == 0).flatten())
        assert torch.equal(x_vis[b], x[b, ids_keep[b]])
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :keep], ids_keep)
    shuffled = torch.gather(x, 1, ids_shuffle[..., None].expand(-1, -1, d))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, d)), x)
    assert len({tuple(m.tolist()) for m in mask}) == n  # every sample has its own mask


def test_random_masking_generator_and_validation() -> None:
    x = torch.randn(4, 16, 2)
    a = random_masking(x, 0.5, generator=torch.Generator().manual_seed(3))[1]
    b = random_masking(x, 0.5, generator=torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, b)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(MicromaeInputError, match="mask_ratio"):
            random_masking(x, bad)
    assert random_masking(x, 0.0)[0].shape == (4, 16, 2)


def test_mask_and_restore_from_ids_keep_match_random_masking() -> None:
    x = torch.randn(5, 25, 4)
    _, mask, ids_restore, ids_keep = random_masking(x, 0.6)
    assert torch.equal(mask_from_ids_keep(ids_keep, 25), mask)
    mask2, ids_restore2 = restore_from_ids_keep(ids_keep, 25)
    assert torch.equal(mask2, mask)
    assert torch.equal(torch.argsort(ids_restore2, 1)[:, :ids_keep.shape[1]], ids_keep)
    with pytest.raises(MicromaeInputError, match="ids_keep"):
        mask_from_ids_keep(ids_keep.float(), 25)


# ---------------------------------------------------------------- position embeddings


def test_sincos_values_against_formula() -> None:
    d, g = 16, 5
    pe = get_2d_sincos_pos_embed(d, g, cls_token=True)
    assert pe.shape == (1 + g * g, d) and torch.all(pe[0] == 0)
    q = d // 4
    for row, col in [(0, 0), (1, 3), (4, 2)]:
        vec = pe[1 + row * g + col]
        for k in range(q):
            omega = 1.0 / 10000 ** (2 * k / (d / 2))
            expected = [math.sin(col * omega), math.cos(col * omega), math.sin(row * omega), math.cos(row * omega)]
            got = [vec[k], vec[q + k], vec[2 * q + k], vec[3 * q + k]]
            assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-6)
    with pytest.raises(MicromaeInputError, match="multiple of 4"):
        get_2d_sincos_pos_embed(18, 4)


def test_interpolate_pos_embed() -> None:
    pe = get_2d_sincos_pos_embed(8, 4)[None]
    assert torch.equal(interpolate_pos_embed(pe, 4), pe)
    up = interpolate_pos_embed(pe, 6)
    assert up.shape == (1, 1 + 36, 8) and torch.equal(up[:, 0], pe[:, 0])
    const = torch.cat([torch.full((1, 1, 8), 7.0), torch.full((1, 16, 8), 2.5)], dim=1)
    out = interpolate_pos_embed(const[0], (3, 5))  # bicubic weights sum to one: a constant stays constant
    assert out.shape == (16, 8) and torch.allclose(out[1:], torch.full((15, 8), 2.5)) and torch.all(out[0] == 7)
    with pytest.raises(MicromaeInputError, match="grid tokens"):
        interpolate_pos_embed(pe[:, :-1], 6)


def test_encoder_adds_weighted_pos_embed() -> None:
    enc = vit_tiny_test(pos_embed_weight=0.08)
    sincos = get_2d_sincos_pos_embed(32, 4)
    assert torch.allclose(enc.pos_embed[0], 0.08 * sincos)
    assert "pos_embed" in enc.state_dict() and not enc.pos_embed.requires_grad
    enc0 = vit_tiny_test(pos_embed_weight=0.0)
    enc0.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "pos_embed"}, strict=False)
    imgs = torch.randn(2, 1, 20, 20)
    diff = enc.embed_patches(imgs) - enc0.embed_patches(imgs)
    assert torch.allclose(diff, (0.08 * sincos[1:]).expand(2, -1, -1), atol=1e-6)
    assert not torch.allclose(enc(imgs), enc0(imgs))


# ---------------------------------------------------------------- timm compatibility


@pytest.mark.parametrize("encoder", [
    lambda: vit_tiny_test(), lambda: vit_tiny_test(in_chans=3, patch_size=4, img_size=24, num_heads=4),
    lambda: vit_maester()], ids=["tiny", "tiny-rgb-p4", "paper"])
def test_timm_state_dict_and_forward_features(encoder) -> None:
    enc: ViTEncoder = encoder().eval()
    timm_vit = VisionTransformer(**enc.timm_kwargs).eval()
    timm_vit.load_state_dict(enc.to_timm_state_dict(), strict=True)
    imgs = torch.randn(2, enc.in_chans, *enc.img_size)
    with torch.no_grad():
        ours, theirs = enc(imgs), timm_vit.forward_features(imgs)
    assert ours.shape == (2, 1 + enc.num_patches, enc.embed_dim)
    assert torch.allclose(ours, theirs, atol=1e-5)


# ---------------------------------------------------------------- MAE


def test_forward_encoder_matches_encoder() -> None:
    model = mae_tiny_test().eval()
    imgs = torch.randn(3, 1, 20, 20)
    all_ids = torch.arange(16).expand(3, -1)
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, ids_keep=all_ids)
        assert torch.allclose(latent, model.encoder.forward_features(imgs), atol=1e-6)
        assert torch.all(mask == 0) and torch.equal(ids_restore, all_ids)
        latent, mask, ids_restore = model.forward_encoder(imgs)  # random mask at the default ratio 0.5
        ids_keep = torch.argsort(ids_restore, 1)[:, :8]
        assert latent.shape == (3, 9, 32) and torch.equal(mask.sum(1), torch.full((3,), 8.0))
        assert torch.allclose(latent, model.encoder.forward_features(imgs, ids_keep=ids_keep), atol=1e-6)


def test_loss_counts_only_masked_patches() -> None:
    model = mae_tiny_test()
    imgs = torch.rand(2, 1, 20, 20)
    out = model(imgs)
    assert out.pred.shape == (2, 16, 25) and out.loss_per_patch.shape == (2, 16)
    masked = out.mask.bool()
    assert torch.allclose(out.loss, out.loss_per_patch[masked].mean())
    kept = torch.nonzero(~masked[0]).flatten()[0]
    pred = out.pred.detach().clone()
    pred[0, kept] += 100.0
    loss, per_patch = model.forward_loss(imgs, pred, out.mask)
    assert torch.allclose(loss, out.loss) and per_patch[0, kept] > 1000
    pred[0, torch.nonzero(masked[0]).flatten()[0]] += 100.0
    assert model.forward_loss(imgs, pred, out.mask)[0] > out.loss + 1


def test_norm_pix_loss() -> None:
    model = mae_tiny_test(norm_pix_loss=True)
    imgs = torch.rand(2, 1, 20, 20)
    mask = torch.ones(2, 16)
    zeros = torch.zeros(2, 16, 25)
    loss, _ = model.forward_loss(imgs, zeros, mask)
    # Normalised by the unbiased variance, each patch's squares sum to n - 1 (n = 25 values), up to eps.
    assert torch.allclose(loss, torch.tensor(24 / 25), atol=1e-3)
    loss_affine, _ = model.forward_loss(3.0 * imgs + 1.0, zeros, mask)
    assert torch.allclose(loss_affine, loss, atol=1e-4)
    raw = mae_tiny_test(norm_pix_loss=False)
    raw_affine, raw_plain = raw.forward_loss(3.0 * imgs + 1.0, zeros, mask)[0], raw.forward_loss(imgs, zeros, mask)[0]
    assert not torch.allclose(raw_affine, raw_plain)


def test_training_steps_reduce_loss() -> None:
    model = mae_tiny_test()
    imgs = torch.rand(8, 1, 20, 20)
    eval_ids = torch.stack([torch.randperm(16)[:8] for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with torch.no_grad():
        before = model(imgs, ids_keep=eval_ids).loss.item()
    for _ in range(30):
        opt.zero_grad()
        model(imgs).loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(imgs, ids_keep=eval_ids).loss.item()
    assert after < 0.7 * before


def test_return_block_ffn() -> None:
    enc = vit_tiny_test(depth=3).eval()
    imgs = torch.randn(2, 1, 20, 20)
    ids_keep = torch.stack([torch.randperm(16)[:6] for _ in range(2)])
    with torch.no_grad():
        tokens, ffn = enc.forward_features(imgs, ids_keep=ids_keep, return_block_ffn=2)
        assert torch.equal(tokens, enc.forward_features(imgs, ids_keep=ids_keep))
        x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1),
                       torch.gather(enc.embed_patches(imgs), 1, ids_keep[..., None].expand(-1, -1, 32))], dim=1)
        expected = []
        for blk in enc.blocks:  # explicit pre-norm block: the MLP output is what is added to the residual
            x = x + blk.attn(blk.norm1(x))
            expected.append(blk.mlp(blk.norm2(x)))
            x = x + expected[-1]
    assert len(ffn) == 2 and all(f.shape == (2, 7, 32) for f in ffn)
    assert all(torch.allclose(f, e, atol=1e-6) for f, e in zip(ffn, expected[1:]))
    assert all(len(blk.mlp._forward_hooks) == 0 for blk in enc.blocks)
    model = mae_tiny_test()
    latent, mask, ids_restore, ffn = model.forward_encoder(imgs, ids_keep=ids_keep, return_block_ffn=1)
    assert len(ffn) == 1 and ffn[0].shape == latent.shape == (2, 7, 32)
    with pytest.raises(MicromaeInputError, match="return_block_ffn"):
        enc.forward_features(imgs, return_block_ffn=4)


def test_bad_inputs_raise() -> None:
    with pytest.raises(MicromaeInputError, match="img_size"):
        ViTEncoder(img_size=21, patch_size=5, embed_dim=32, depth=1)
    with pytest.raises(MicromaeInputError, match="patch_size"):
        ViTEncoder(img_size=20, patch_size=0, embed_dim=32, depth=1)
    with pytest.raises(MicromaeInputError, match="embed_dim"):
        ViTEncoder(img_size=20, patch_size=5, embed_dim=30, depth=1, num_heads=1)
    enc = vit_tiny_test()
    with pytest.raises(MicromaeInputError, match="images"):
        enc(torch.randn(1, 1, 25, 25))
    with pytest.raises(MicromaeInputError, match="images"):
        enc(torch.randn(1, 3, 20, 20))
    with pytest.raises(MicromaeInputError, match="mask_ratio"):
        mae_tiny_test(mask_ratio=1.0)
    with pytest.raises(MicromaeInputError, match="unknown"):
        build_mae(img_size=20, patch_size=5, mask_rato=0.5)
    assert isinstance(build_mae(img_size=20, patch_size=5, embed_dim=32, depth=1, decoder_depth=1),
                      MaskedAutoencoder)
