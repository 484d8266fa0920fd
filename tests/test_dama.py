"""DAMA: regression target, token pairing, losses, gradient flow per configuration, EMA, objectives, resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from micromae.errors import MicromaeInputError
from micromae.models import MaskedAutoencoder, ViTEncoder
from micromae.models.dama import (
    DAMA,
    FeatureRegressionHead,
    ema_momentum,
    ema_update,
    encoder_state_dict,
    feature_loss,
    pair_tokens,
    regression_target,
)
from micromae.models.masking import gather_tokens, mask_from_ids_keep
from micromae.models.data2vec import Data2Vec
from micromae.train.dama_objectives import (
    Data2VecObjective,
    DAMAObjective,
    build_dama_comparison_objective,
    channels_to_rgb,
    display_scale,
)
from micromae.train.objectives import MAEObjective


def tiny_mae(seed: int = 0, **kw) -> MaskedAutoencoder:
    """16x16x3 images, 4x4 patches (L = 16), encoder 16 wide x 2 blocks, decoder 16 x 1, mask ratio 0.75."""
    torch.manual_seed(seed)
    cfg = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
               pos_embed_weight=1.0, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75)
    return MaskedAutoencoder(**{**cfg, **kw})


def tiny_dama(config: str = "student1-student2", **kw) -> DAMA:
    return DAMA(tiny_mae(), config=config, K=2, **kw)


def imgs(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- target, head


def test_regression_target_matches_a_hand_computed_forward():
    mae = tiny_mae()
    x = imgs(2)
    ids_keep = torch.tensor([[0, 5, 9, 14], [3, 4, 8, 15]])
    _, _, _, ffn = mae.forward_encoder(x, ids_keep=ids_keep, return_block_ffn=2)
    target = regression_target(ffn)
    # explicit per-block forward: h = x + attn(norm1 x); f = mlp(norm2 h); x = h + f
    enc = mae.encoder
    tok = gather_tokens(enc.patch_embed(x) + enc.pos_embed[:, 1:], ids_keep)
    tok = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), tok], dim=1)
    normed = []
    for blk in enc.blocks:
        h = tok + blk.attn(blk.norm1(tok))
        f = blk.mlp(blk.norm2(h))
        tok = h + f
        normed.append((f - f.mean(-1, keepdim=True)) / torch.sqrt(f.var(-1, unbiased=False, keepdim=True) + 1e-5))
    expected = (normed[0] + normed[1]) / 2
    assert target.shape == (2, 5, 16)
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(regression_target(ffn[-1:]), normed[1], rtol=1e-5, atol=1e-5)  # K = 1


def test_feature_regression_head_layout():
    head = FeatureRegressionHead(16)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm"]
    assert head[0].weight.shape == (32, 16) and head[3].weight.shape == (16, 32)
    assert head(torch.randn(2, 5, 16)).shape == (2, 5, 16)


def test_feature_loss_is_smooth_l1_summed_over_channels_averaged_over_weighted_tokens():
    g = torch.Generator().manual_seed(0)
    pred, target = 3 * torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    weight = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    d = (pred - target).abs()
    beta = 2.0
    per = torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).sum(-1)
    expected = (per * weight).sum() / weight.sum()
    torch.testing.assert_close(feature_loss(pred, target, beta, weight), expected)
    torch.testing.assert_close(feature_loss(pred, target, beta), per.mean())
    sm = feature_loss(pred, target, beta, weight, softmax=True)
    torch.testing.assert_close(sm, feature_loss(pred.softmax(-1), target.softmax(-1), beta, weight))


def test_pairing_by_position_matches_patch_indices_and_by_index_does_not():
    num_patches, d = 8, 8
    # token features = one-hot of their patch index; CLS = all -1
    def tokens(ids):
        t = F.one_hot(ids, d).float()
        return torch.cat([torch.full((1, 1, d), -1.0), t], dim=1)

    ids1, ids2 = torch.tensor([[3, 1, 5]]), torch.tensor([[5, 2, 3]])
    pred, target, weight = pair_tokens(tokens(ids1), ids1, tokens(ids2), ids2, num_patches, "position")
    assert weight.tolist() == [[1, 0, 0, 0, 1, 0, 1, 0, 0]]  # CLS, then patches 3 and 5 (seen by both)
    paired = weight[0].bool()
    assert torch.equal(pred[0, paired], target[0, paired])  # identical patch on both sides
    assert feature_loss(pred, target, weight=weight) == 0
    pred_i, target_i, weight_i = pair_tokens(tokens(ids1), ids1, tokens(ids2), ids2, num_patches, "index")
    assert weight_i.shape == (1, 4) and not torch.equal(pred_i[0, 1], target_i[0, 1])  # patch 3 vs patch 5
    assert feature_loss(pred_i, target_i, weight=weight_i) > 0
    with pytest.raises(MicromaeInputError, match="pairing"):
        pair_tokens(tokens(ids1), ids1, tokens(ids2), ids2, num_patches, "nearest")


# ---------------------------------------------------------------------------------------------- the model


def test_forward_masks_and_pairs_per_sample():
    dama = tiny_dama()
    out = dama(imgs(6), generator=torch.Generator().manual_seed(0))
    keep, overlap = 4, 2
    assert out.pred1.shape == out.pred2.shape == (6, 16, 48)
    assert torch.equal(out.mask1, mask_from_ids_keep(out.ids_keep1, 16))
    assert torch.equal(out.mask2, mask_from_ids_keep(out.ids_keep2, 16))
    assert bool((out.mask2.sum(1) == 16 - keep).all())
    assert bool((((out.mask1 == 0) & (out.mask2 == 0)).sum(1) == overlap).all())
    assert out.weight.sum(1).tolist() == [1.0 + overlap] * 6  # CLS + the shared patches, by position
    torch.testing.assert_close(out.loss, out.loss_p1 + out.loss_p2 + out.loss_f)
    assert dama.branch1.norm_pix_loss and dama.branch2.norm_pix_loss


def test_adaptive_mask_in_the_model_masks_branch_one_worst_patches():
    dama = tiny_dama()
    x = imgs(4)
    out = dama(x, generator=torch.Generator().manual_seed(0))
    _, lpp = dama.branch1.forward_loss(x, out.pred1, out.mask1)
    worst = (lpp * out.mask1).argmax(dim=1)
    assert bool((out.mask2.gather(1, worst[:, None]) == 1).all())
    rand = tiny_dama(masking="random_overlap")(x, generator=torch.Generator().manual_seed(0))
    assert bool((((rand.mask1 == 0) & (rand.mask2 == 0)).sum(1) == 2).all())


def test_public_code_emulation_in_the_model_scores_other_patches_than_it_hides():
    out = tiny_dama(emulate_public_code=True, pairing="index", target_softmax=True)(imgs(8))
    assert not torch.equal(out.mask2, mask_from_ids_keep(out.ids_keep2, 16))  # the released code's loss mask
    assert bool((out.mask2.sum(1) < 12).all())
    assert torch.isfinite(out.loss)


def _grad_receivers(dama: DAMA, loss: torch.Tensor) -> set[str]:
    """Top-level groups (branch1.encoder, branch1.decoder, branch2.encoder, branch2.decoder, head) whose
    parameters get a non-zero gradient from ``loss``."""
    named = [(n, p) for n, p in dama.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    groups = set()
    for (name, _), g in zip(named, grads):
        if g is not None and bool(g.abs().sum() > 0):
            top, sub = name.split(".")[:2]
            groups.add("head" if top == "head" else f"{top}.{'encoder' if sub == 'encoder' else 'decoder'}")
    return groups


@pytest.mark.parametrize("config, stop_grad, expected", [
    ("student1-student2", False, {
        "p1": {"branch1.encoder", "branch1.decoder"}, "p2": {"branch2.encoder", "branch2.decoder"},
        "f": {"branch1.encoder", "head", "branch2.encoder"}}),
    ("student1-student2", True, {
        "p1": {"branch1.encoder", "branch1.decoder"}, "p2": {"branch2.encoder", "branch2.decoder"},
        "f": {"branch1.encoder", "head"}}),
    ("ema", None, {
        "p1": {"branch1.encoder", "branch1.decoder"}, "p2": set(), "f": {"branch1.encoder", "head"}}),
    ("shared", None, {
        "p1": {"branch1.encoder", "branch1.decoder"}, "p2": {"branch1.encoder", "branch1.decoder"},
        "f": {"branch1.encoder", "head"}}),
])
def test_gradient_flow_per_configuration(config, stop_grad, expected):
    dama = tiny_dama(config, stop_grad_target=stop_grad)
    out = dama(imgs(4), generator=torch.Generator().manual_seed(0))
    losses = {"p1": out.loss_p1, "p2": out.loss_p2, "f": out.loss_f}
    for key, loss in losses.items():
        if not loss.requires_grad:
            assert expected[key] == set(), key
            continue
        assert _grad_receivers(dama, loss) == expected[key], key
    if config == "ema":
        assert all(not p.requires_grad for p in dama.branch2.parameters())
    if config == "shared":
        assert dama.branch2 is None and dama.second is dama.branch1
        assert not any(k.startswith("branch2.") for k in dama.state_dict())


def test_shared_target_gradient_reaches_the_same_module_twice():
    """shared, stop_grad_target false: L_f's target path also trains branch 1 (it is branch 2)."""
    x, g = imgs(4), torch.Generator().manual_seed(0)
    live = tiny_dama("shared", stop_grad_target=False)
    stop = copy.deepcopy(live)
    stop.stop_grad_target = True
    block = "branch1.encoder.blocks.1.mlp.fc2.weight"
    g1 = torch.autograd.grad(live(x, generator=g).loss_f, dict(live.named_parameters())[block])[0]
    g2 = torch.autograd.grad(stop(x, generator=torch.Generator().manual_seed(0)).loss_f,
                             dict(stop.named_parameters())[block])[0]
    assert not torch.allclose(g1, g2)


def test_a_mismatched_second_student_is_rejected():
    with pytest.raises(MicromaeInputError, match="branch2"):
        DAMA(tiny_mae(), branch2=tiny_mae(embed_dim=32), K=2)
    with pytest.raises(MicromaeInputError, match="branch2"):
        DAMA(tiny_mae(), config="ema", branch2=tiny_mae(), K=2)


def test_student2_is_initialised_independently():
    dama = tiny_dama()
    w1 = dama.branch1.encoder.blocks[0].attn.qkv.weight
    w2 = dama.branch2.encoder.blocks[0].attn.qkv.weight
    assert w1.shape == w2.shape and not torch.equal(w1, w2)
    ema = tiny_dama("ema")
    assert not dama.stop_grad_target and not tiny_dama("shared").stop_grad_target and ema.stop_grad_target
    assert torch.equal(ema.branch1.encoder.blocks[0].attn.qkv.weight, ema.branch2.encoder.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("kwargs, match", [
    (dict(config="teacher"), "config"), (dict(masking="grid"), "masking"), (dict(pairing="x"), "pairing"),
    (dict(config="ema", stop_grad_target=False), "stop_grad_target"), (dict(K=3), "K"),
    (dict(mask_ratio=0.4), "mask_ratio"), (dict(beta=-1.0), "beta"),
])
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises(MicromaeInputError, match=match):
        DAMA(tiny_mae(), **{"K": 2, **kwargs})


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_update_rule_is_exact_and_momentum_is_cosine():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    teacher.register_buffer("b", torch.zeros(2))
    student.register_buffer("b", torch.ones(2))
    before = copy.deepcopy(teacher)
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.weight, 0.9 * before.weight + 0.1 * student.weight)
    torch.testing.assert_close(teacher.bias, 0.9 * before.bias + 0.1 * student.bias)
    assert torch.equal(teacher.b, student.b)
    assert ema_momentum(0, 100) == pytest.approx(0.996) and ema_momentum(100, 100) == 1.0
    assert ema_momentum(50, 100) == pytest.approx(0.998) and ema_momentum(500, 100) == 1.0
    values = [ema_momentum(s, 100) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_ema_objective_moves_the_teacher_by_the_scheduled_momentum():
    obj = DAMAObjective(tiny_mae(), total_steps=10, config="ema", K=2)
    with torch.no_grad():
        for p in obj.model.branch1.parameters():
            p.add_(0.5)
    t_before = copy.deepcopy(obj.model.branch2)
    obj.after_step(3)
    lam = ema_momentum(3, 10)
    for (name, t), t0, s in zip(obj.model.branch2.named_parameters(), t_before.parameters(),
                                obj.model.branch1.parameters()):
        torch.testing.assert_close(t, lam * t0 + (1 - lam) * s, msg=name)


# ---------------------------------------------------------------------------------------------- training


def _step(obj, opt, batch):
    opt.zero_grad(set_to_none=True)
    loss, logs = obj.loss(obj.model, batch)
    loss.backward()
    opt.step()
    return float(loss.detach()), logs


def test_total_loss_decreases_on_random_data():
    obj = DAMAObjective(tiny_mae(), total_steps=12, K=2)
    opt = torch.optim.AdamW([p for p in obj.model.parameters() if p.requires_grad], lr=3e-3)
    batch = imgs(8)
    losses = []
    for step in range(12):
        torch.manual_seed(step % 2)  # two fixed random masks, so the drop is the model's doing
        loss, logs = _step(obj, opt, batch)
        obj.after_step(step)
        losses.append(loss)
        assert set(logs) >= {"loss_p1", "loss_p2", "loss_f"}
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_resume_round_trip_gives_the_same_next_step():
    batch = imgs(4)

    def make(seed):
        obj = DAMAObjective(tiny_mae(seed), total_steps=10, config="ema", K=2)
        return obj, torch.optim.AdamW([p for p in obj.model.parameters() if p.requires_grad], lr=1e-3)

    obj, opt = make(0)
    for step in range(2):
        _step(obj, opt, batch)
        obj.after_step(step)
    snap = dict(model=copy.deepcopy(obj.model.state_dict()), opt=copy.deepcopy(opt.state_dict()),
                extra=obj.state_dict(), rng=torch.get_rng_state())
    assert any(k.startswith("branch2.") for k in snap["model"])  # the teacher is checkpointed with the model
    loss_a, _ = _step(obj, opt, batch)
    obj.after_step(2)
    obj2, opt2 = make(7)
    obj2.model.load_state_dict(snap["model"])
    opt2.load_state_dict(snap["opt"])
    obj2.load_state_dict(snap["extra"])
    torch.set_rng_state(snap["rng"])
    loss_b, _ = _step(obj2, opt2, batch)
    obj2.after_step(2)
    assert loss_a == loss_b
    for (k, a), b in zip(obj.model.state_dict().items(), obj2.model.state_dict().values()):
        assert torch.equal(a, b), k
    other = DAMAObjective(tiny_mae(), total_steps=10, config="shared", K=2)
    with pytest.raises(MicromaeInputError, match="objective state"):
        other.load_state_dict(snap["extra"])


def test_engine_trains_checkpoints_and_resumes_dama(tmp_path):
    from micromae.config import TrainConfig
    from micromae.train.checkpoint import load_checkpoint
    from micromae.train.distributed import DistInfo
    from micromae.train.engine import train
    from micromae.train.log import read_log

    def stream(start):
        for i in range(start, start + 100):
            yield i, imgs(4, seed=i)

    def run(name, **kw):
        torch.manual_seed(0)
        obj = DAMAObjective(tiny_mae(), total_steps=4, config="ema", K=2)
        cfg = TrainConfig(steps=4, batch_size=4, log_every=1, figure_every=0, ckpt_every=100, device="cpu")
        return train(cfg, obj, stream, tmp_path / name, {}, DistInfo(), torch.device("cpu"), **kw)

    straight = run("a")
    half = run("b", stop_after=2)
    resumed = run("b", resume_from=half.checkpoint)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["extra"]["objective"] == "dama" and a["extra"]["settings"]["config"] == "ema"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    records = read_log(tmp_path / "a")
    assert {"loss", "loss_p1", "loss_p2", "loss_f", "ema_momentum"} <= set(records[-1])


# ---------------------------------------------------------------------------------------------- data2vec


def test_data2vec_student_sees_only_visible_patches_and_teacher_gets_no_gradient():
    model = Data2Vec(tiny_mae().encoder, mask_ratio=0.75, K=2)
    x = imgs(3)
    loss, pred, target, mask = model(x, generator=torch.Generator().manual_seed(0))
    assert pred.shape == target.shape == (3, 16, 16) and mask.sum().item() == 3 * 12
    _, ffn = model.teacher.forward_features(x, return_block_ffn=2)
    torch.testing.assert_close(target, regression_target(ffn)[:, 1:])  # unmasked image, all patches
    torch.testing.assert_close(loss, feature_loss(pred, target, 2.0, weight=mask))
    # changing the pixels of masked patches leaves the student's predictions unchanged
    pix = torch.nn.functional.interpolate(mask.reshape(3, 1, 4, 4), scale_factor=4.0)
    _, pred_b, target_b, _ = model(x + 5.0 * pix, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pred, pred_b)
    assert not torch.allclose(target, target_b)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    assert all(g is not None for g in grads)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    obj = Data2VecObjective(tiny_mae(), total_steps=4, K=2)
    assert obj.model.mask_ratio == 0.75
    t0 = copy.deepcopy(obj.model.teacher)
    with torch.no_grad():
        obj.model.encoder.cls_token.add_(1.0)
    obj.after_step(0)
    torch.testing.assert_close(obj.model.teacher.cls_token, 0.996 * t0.cls_token + 0.004 * obj.model.encoder.cls_token)


# ---------------------------------------------------------------------------------------------- glue


def test_objective_factory_and_encoder_extraction():
    mae = tiny_mae()
    assert isinstance(build_dama_comparison_objective("mae", mae, 5), MAEObjective)
    d2v = build_dama_comparison_objective("data2vec", tiny_mae(), 5, K=2)
    dama_obj = build_dama_comparison_objective("dama", tiny_mae(), 5, K=2, overlap_ratio=0.0)
    assert isinstance(d2v, Data2VecObjective) and isinstance(dama_obj, DAMAObjective)
    assert dama_obj.model.overlap == 0
    with pytest.raises(MicromaeInputError, match="objective"):
        build_dama_comparison_objective("moco", mae, 5)
    for state, source in [(dama_obj.model.state_dict(), dama_obj.model.branch1.encoder),
                          (d2v.model.state_dict(), d2v.model.encoder), (mae.state_dict(), mae.encoder)]:
        enc = ViTEncoder(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2)
        enc.load_state_dict(encoder_state_dict(state), strict=True)
        assert torch.equal(enc.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    b2 = encoder_state_dict(dama_obj.model.state_dict(), branch=2)
    assert torch.equal(b2["cls_token"], dama_obj.model.branch2.encoder.cls_token)


def test_save_figure_and_channel_colours(tmp_path):
    assert channels_to_rgb(np.ones((1, 2, 2))).shape == (2, 2, 3)
    rgb = channels_to_rgb(np.stack([np.full((2, 2), v) for v in (0.2, 0.4, 0.6)]))
    assert np.allclose(rgb[0, 0], [0.2, 0.4, 0.6])
    seven = np.zeros((7, 2, 2))
    seven[0] = 1.0  # channel 0 (DAPI) is blue
    assert np.allclose(channels_to_rgb(seven)[0, 0], [0, 0, 1])
    bright = np.ones((7, 4, 4))  # every marker on: the raw composite saturates, the scaled one does not
    assert channels_to_rgb(bright).max() == 1.0 and np.all(channels_to_rgb(bright) == 1.0)
    scaled = channels_to_rgb(bright, display_scale(bright))
    assert scaled.max() == pytest.approx(1.0) and scaled[0, 0, 2] < scaled[0, 0, 0]  # 3 blue vs 4 red channels
    obj = DAMAObjective(tiny_mae(), total_steps=2, K=2)
    path = obj.save_figure(imgs(2), tmp_path / "fig.png") or tmp_path / "fig.png"
    assert path.is_file() and path.stat().st_size > 1000
    assert obj.model.training


def test_momentum_objectives_share_schedule_state_and_resume_checks():
    """DAMA (ema), data2vec and MoCo v3 keep their momentum the same way: a cosine from the base to 1, saved
    with the settings, and resuming under another base momentum or another objective is refused."""
    from micromae.models.dama import ema_momentum
    from micromae.models.mocov3 import MoCoV3
    from micromae.train.ssl_objectives import MoCoV3Objective

    objs = [DAMAObjective(tiny_mae(), total_steps=10, ema_momentum=0.9, config="ema", K=2),
            Data2VecObjective(tiny_mae(), total_steps=10, ema_momentum=0.9, K=2),
            MoCoV3Objective(MoCoV3(tiny_mae().encoder, dim=8, mlp_dim=16), total_steps=10, ema_momentum=0.9)]
    for obj in objs:
        obj.after_step(4)
        assert obj.last_momentum == pytest.approx(ema_momentum(4, 10, 0.9)) and 0.9 < obj.last_momentum < 1.0
        state = obj.state_dict()
        assert state["objective"] == obj.name and state["last_momentum"] == obj.last_momentum
        fresh = type(obj).__new__(type(obj))
        fresh.__dict__.update({**obj.__dict__, "last_momentum": obj.ema_base})
        fresh.load_state_dict(state)
        assert fresh.last_momentum == obj.last_momentum
        with pytest.raises(MicromaeInputError, match="objective state"):
            fresh.load_state_dict({**state, "ema_momentum": 0.5})
        with pytest.raises(MicromaeInputError, match="objective state"):
            fresh.load_state_dict({**state, "objective": "mae"})
    with pytest.raises(MicromaeInputError, match=r"\[0, 1\]"):
        Data2VecObjective(tiny_mae(), total_steps=10, ema_momentum=1.5, K=2)
