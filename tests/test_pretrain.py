"""Pre-training engine: resume equivalence, loss falls, NaN guard, checkpoints, schedules, DDP, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from micromae.cli import main as cli_main
from micromae.config import PretrainConfig, TrainConfig, apply_overrides
from micromae.errors import MicromaeInputError
from micromae.train.checkpoint import load_checkpoint
from micromae.train.distributed import DistInfo
from micromae.train.engine import Objective, TrainingDiverged, train
from micromae.train.log import read_log
from micromae.train.optim import lr_factor, param_groups
from micromae.train.pretrain import build_model, run_pretrain

TINY = [
    "model.img_size=20", "model.patch_size=5", "model.embed_dim=16", "model.depth=2", "model.num_heads=2",
    "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "data.synthetic_shape=[12,40,40]", "train.batch_size=8", "train.log_every=1", "train.figure_every=0",
    "train.device=cpu",
]


def tiny_cfg(*extra: str) -> PretrainConfig:
    return apply_overrides(PretrainConfig(), TINY + list(extra))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def test_resume_gives_the_same_weights(tmp_path):
    cfg = tiny_cfg("train.steps=6", "train.ckpt_every=100", "train.schedule=cosine", "train.warmup_steps=2")
    run_pretrain(cfg, tmp_path / "straight")
    first = run_pretrain(cfg, tmp_path / "split", stop_after=3)
    assert first.step == 3
    second = run_pretrain(cfg, tmp_path / "split", resume="auto")
    assert second.step == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the optimiser actually moved the weights (the comparison above is not between two untouched models)
    init = build_model(cfg).state_dict()
    assert not torch.equal(init["encoder.blocks.0.attn.qkv.weight"], a["encoder.blocks.0.attn.qkv.weight"])


def test_checkpoint_contents_and_pruning(tmp_path):
    cfg = tiny_cfg("train.steps=4", "train.ckpt_every=1", "train.keep_checkpoints=2")
    run_pretrain(cfg, tmp_path / "r")
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["last.pt", "step_0000003.pt", "step_0000004.pt"]
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "step", "rng", "config", "micromae_version"} <= set(state)
    assert state["step"] == 4 and state["config"]["train"]["steps"] == 4
    assert not list((tmp_path / "r" / "checkpoints").glob("*.tmp*"))
    assert (tmp_path / "r" / "config.yaml").is_file()


def test_fresh_run_refuses_to_overwrite_a_run(tmp_path):
    cfg = tiny_cfg("train.steps=1")
    run_pretrain(cfg, tmp_path / "r")
    with pytest.raises(MicromaeInputError, match="--resume auto"):
        run_pretrain(cfg, tmp_path / "r")


def test_loss_falls_on_synthetic_volume(tmp_path):
    cfg = tiny_cfg("train.steps=80", "train.lr=2e-3", "train.batch_size=16", "train.warmup_steps=5",
                   "train.schedule=cosine", "data.synthetic_shape=[16,64,64]")
    run_pretrain(cfg, tmp_path / "r")
    losses = [r["loss"] for r in read_log(tmp_path / "r")]
    assert len(losses) == 80
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from micromae.train import objectives

    original = objectives.MAEObjective.loss
    calls = {"n": 0}

    def poisoned(self, module, batch):
        calls["n"] += 1
        loss, logs = original(self, module, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), logs

    monkeypatch.setattr(objectives.MAEObjective, "loss", poisoned)
    cfg = tiny_cfg("train.steps=5", "train.ckpt_every=1")
    with pytest.raises(TrainingDiverged, match="step 3") as err:
        run_pretrain(cfg, tmp_path / "r")
    assert "newest checkpoint" in str(err.value) and "step_0000002.pt" in str(err.value)
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["step"] == 2


class _LinearObjective(Objective):
    """Least squares on a fixed linear model: the gradient of a mean over crops is easy to reason about."""

    def loss(self, module, batch):
        x, y = batch
        return ((module(x) - y) ** 2).mean(), {}


def _stream(batches):
    def open_stream(start):
        return iter([(i, batches[i]) for i in range(start, len(batches))])
    return open_stream


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches of 8 must give the same update as one batch of 16 made of them."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    info, dev = DistInfo(), torch.device("cpu")
    results = []
    for accum, batches in ((1, [(x, y)]), (2, [(x[:8], y[:8]), (x[8:], y[8:])])):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        cfg = TrainConfig(steps=1, accum_steps=accum, lr=0.1, weight_decay=0.0, ckpt_every=0, figure_every=0)
        train(cfg, _LinearObjective(model), _stream(batches), tmp_path / f"a{accum}", {}, info, dev)
        results.append(model.weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6)
    torch.manual_seed(0)
    init = torch.nn.Linear(4, 1).weight.detach()
    assert not torch.allclose(results[0], init)  # the step did move the weights


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, schedule="cosine", min_lr=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    const = TrainConfig(steps=100, lr=1.0, warmup_steps=0, schedule="constant")
    assert lr_factor(0, const) == lr_factor(99, const) == 1.0


def test_no_decay_groups():
    model = build_model(tiny_cfg())
    decay, no_decay = param_groups(model, 0.05, no_decay_bias_norm=True)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "encoder.cls_token" in nd and "decoder_embed.bias" in nd and "encoder.norm.weight" in nd
    assert "encoder.blocks.0.attn.qkv.weight" in d and no_decay["weight_decay"] == 0.0
    (single,) = param_groups(model, 0.05, no_decay_bias_norm=False)
    assert len(single["params"]) == len(list(model.parameters()))


def test_cli_pretrain_writes_run_dir_and_figure(tmp_path, capsys):
    run = tmp_path / "cli"
    rc = cli_main(["pretrain", "maester_tiny", *TINY, "train.steps=2", "train.figure_every=2",
                   "--run-dir", str(run)])
    assert rc == 0
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    pngs = list((run / "figures").glob("reconstruction_step*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["step"] for r in read_log(run)] == [1, 2]
    assert list((run / "tb").iterdir())  # tensorboard events


def test_cli_bad_override_exits_2_with_message(capsys):
    rc = cli_main(["pretrain", "maester_tiny", "train.stepz=3"])
    assert rc == 2
    assert "train.steps" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "micromae", "pretrain", "maester_tiny", *TINY, "train.steps=3", "--run-dir", str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 3
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3  # only rank 0 writes the log
