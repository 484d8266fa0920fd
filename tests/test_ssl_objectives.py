"""SimMIM and MoCo v3 (the DAMA paper's other columns) and data2vec's target spread: what each loss trains."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from micromae.config import PretrainConfig, apply_overrides
from micromae.data.views import FluorescenceViews
from micromae.models.data2vec import target_spread
from micromae.models.mocov3 import MoCoV3
from micromae.models.pretrained import load_encoder
from micromae.models.simmim import SimMIM, patchify
from micromae.models.vit import ViTEncoder
from micromae.train.checkpoint import load_checkpoint
from micromae.train.export import export_encoder
from micromae.train.log import read_log
from micromae.train.pretrain import run_pretrain

TINY = ["model.in_chans=7", "model.img_size=16", "model.patch_size=4", "model.embed_dim=16",
        "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
        "model.decoder_num_heads=2", "model.mask_ratio=0.6", "data.source=synthetic_mif",
        "data.synthetic_shape=[96,96]", "data.n_images=4", "dama.K=2", "mocov3.dim=16", "mocov3.mlp_dim=32",
        "train.batch_size=4", "train.log_every=1", "train.figure_every=0", "train.device=cpu"]


def encoder(**kw) -> ViTEncoder:
    return ViTEncoder(**{"img_size": 16, "patch_size": 4, "in_chans": 3, "embed_dim": 16, "depth": 2,
                         "num_heads": 2, "mlp_ratio": 2.0, "pos_embed_weight": 1.0, **kw})


def fit(loss_fn, params, steps: int = 40, lr: float = 3e-3) -> tuple[float, float]:
    opt = torch.optim.Adam(params, lr=lr)
    first = last = None
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    return first, last


# ------------------------------------------------------------------------------------------------ SimMIM

def test_simmim_loss_is_on_the_masked_patches_and_masked_pixels_do_not_reach_the_encoder():
    model = SimMIM(encoder(), mask_ratio=0.5)
    imgs = torch.rand(2, 3, 16, 16)
    mask = model.random_mask(2, imgs.device)
    out = model(imgs, mask)
    out.pred.retain_grad()
    out.loss.backward()
    touched = out.pred.grad.abs().sum(-1) > 0  # (N, L): the patches the loss looks at
    assert torch.equal(touched, mask.bool())
    # the loss is the L1 of the pixels of the masked patches
    target = patchify(imgs, 4)
    expected = (out.pred.detach() - target).abs().mean(-1)[mask.bool()].mean()
    assert torch.allclose(out.loss, expected)
    # masked patches enter as mask tokens: changing their pixels changes no prediction
    pix = model.unpatchify(mask[..., None].expand(-1, -1, 4 * 4 * 3))  # (N, C, H, W) 1 on masked pixels
    changed = torch.where(pix.bool(), torch.rand_like(imgs), imgs)
    with torch.no_grad():
        assert torch.allclose(model(changed, mask).pred, out.pred.detach(), atol=1e-6)
        assert not torch.allclose(model(imgs, 1 - mask).pred, out.pred.detach())


def test_simmim_gradient_reaches_encoder_mask_token_and_head_and_loss_falls():
    model = SimMIM(encoder(), mask_ratio=0.5)
    imgs = torch.rand(4, 3, 16, 16)
    model(imgs).loss.backward()
    for name in ("encoder.patch_embed.proj.weight", "encoder.blocks.1.mlp.fc2.weight", "mask_token", "head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    mask = model.random_mask(4, imgs.device)
    first, last = fit(lambda: model(imgs, mask).loss, model.parameters())
    assert last < 0.5 * first


# ------------------------------------------------------------------------------------------------ MoCo v3

def test_moco_momentum_branch_gets_no_gradient_and_follows_by_ema():
    model = MoCoV3(encoder(), dim=8, mlp_dim=16)
    v1, v2 = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    model(v1, v2).backward()
    for name, p in model.named_parameters():
        if name.startswith("momentum_"):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    before = model.momentum_encoder.blocks[0].mlp.fc1.weight.clone()
    with torch.no_grad():
        model.encoder.blocks[0].mlp.fc1.weight.add_(1.0)
    model.update_momentum(0.9)
    after = model.momentum_encoder.blocks[0].mlp.fc1.weight
    assert torch.allclose(after, before + 0.1 * (model.encoder.blocks[0].mlp.fc1.weight - before), atol=1e-6)


def test_moco_loss_falls_on_a_tiny_batch():
    model = MoCoV3(encoder(), dim=8, mlp_dim=16)
    imgs = torch.rand(8, 3, 16, 16)
    views = FluorescenceViews()
    pairs = [views(imgs) for _ in range(4)]
    step = iter(range(10**6))
    first, last = fit(lambda: model(*pairs[next(step) % 4]), [p for p in model.parameters() if p.requires_grad],
                      steps=60)
    assert last < 0.7 * first


def test_views_act_on_every_channel_alike():
    # channel c is a_c times channel 0: without noise, every view keeps the ratios (no colour jitter)
    base = torch.rand(1, 1, 16, 16) * 0.5
    scales = torch.tensor([1.0, 0.5, 0.25]).view(1, 3, 1, 1)
    imgs = base * scales
    v1, v2 = FluorescenceViews(noise=0.0, gain=(0.8, 1.2))(imgs.repeat(2, 1, 1, 1))
    for v in (v1, v2):
        assert torch.allclose(v[:, 1], 0.5 * v[:, 0], atol=1e-5) and torch.allclose(v[:, 2], 0.25 * v[:, 0], atol=1e-5)
    assert not torch.allclose(v1, v2)  # two different views


# ------------------------------------------------------------------------------------------------ trainer

@pytest.mark.parametrize("objective", ["simmim", "mocov3"])
def test_objective_trains_resumes_bit_exact_and_exports(tmp_path, objective):
    c = apply_overrides(PretrainConfig(), TINY + [f"objective={objective}", "train.steps=4", "train.ckpt_every=100"])
    run_pretrain(c, tmp_path / "straight")
    run_pretrain(c, tmp_path / "split", stop_after=2)
    run_pretrain(c, tmp_path / "split", resume="auto")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(tmp_path / "straight")[-1]["loss"] > 0
    ckpt = tmp_path / "straight" / "checkpoints" / "last.pt"
    enc, meta = load_encoder(ckpt)
    assert meta.provenance["objective"] == objective
    assert torch.equal(enc.state_dict()["blocks.0.attn.qkv.weight"], a["encoder.blocks.0.attn.qkv.weight"])
    path = export_encoder(ckpt, tmp_path / "enc.safetensors")
    vit = timm.models.vision_transformer.VisionTransformer(**json.loads(path.with_suffix(".json").read_text())
                                                           ["timm_kwargs"]).eval()
    vit.load_state_dict(load_file(str(path)))
    x = torch.rand(2, 7, 16, 16)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), enc.eval().forward_features(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------ data2vec

def spread_ok(values: dict[str, float]) -> bool:
    """The collapse check: the target varies across the tokens of an image and across images."""
    return values["target_std_tokens"] > 0.02 and values["target_std_images"] > 0.002


def test_data2vec_logs_a_target_that_varies_and_the_check_fails_for_a_constant_target(tmp_path):
    run_pretrain(apply_overrides(PretrainConfig(), TINY + ["objective=data2vec", "train.steps=3"]), tmp_path / "r")
    log = read_log(tmp_path / "r")
    assert all(spread_ok(r) for r in log)
    constant = torch.randn(1, 1, 16).expand(4, 16, 16)
    assert target_spread(constant) == {"target_std_tokens": 0.0, "target_std_images": 0.0}
    assert not spread_ok(target_spread(constant))
    per_image = torch.randn(4, 1, 16).expand(4, 16, 16)  # one vector per image: collapsed across tokens
    assert not spread_ok(target_spread(per_image)) and target_spread(per_image)["target_std_images"] > 0.5
