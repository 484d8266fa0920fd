"""The run skeleton shared by every training verb: resolved config saved, process group left on failure."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import yaml
from torch import nn

import micromae.train.run as run_mod
from micromae.config import TrainConfig
from micromae.errors import MicromaeInputError
from micromae.train.engine import Objective
from micromae.train.run import RunPlan, run_training


@dataclass
class ToyConfig:
    name: str = "toy"
    classes: list[str] = field(default_factory=list)  # resolved by build, as the fine-tuning runs do
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2, batch_size=2, lr=1e-2, warmup_steps=0, device="cpu", log_every=1, ckpt_every=0,
        figure_every=0))


class ToyObjective(Objective):
    def loss(self, module: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return module(batch).pow(2).mean(), {}


def toy_stream(start: int):
    step = start
    while True:
        yield step, torch.ones(2, 3)
        step += 1


def toy_build(cfg: ToyConfig):
    def build(ctx) -> RunPlan:
        resolved = ToyConfig(cfg.name, ["a", "b"], cfg.train)
        return RunPlan(ToyObjective(nn.Linear(3, 1)), toy_stream, resolved, messages=["toy run"])
    return build


def test_saves_the_resolved_config_and_trains(tmp_path):
    result = run_training(ToyConfig(), tmp_path / "run", None, None, lambda c: None, toy_build(ToyConfig()))
    assert result.step == 2 and result.checkpoint is not None
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["classes"] == ["a", "b"]  # what build resolved, not the config passed in
    assert torch.load(result.checkpoint, weights_only=False)["config"]["classes"] == ["a", "b"]
    with pytest.raises(MicromaeInputError, match="run directory"):  # one run per folder
        run_training(ToyConfig(), tmp_path / "run", None, None, lambda c: None, toy_build(ToyConfig()))


def test_leaves_the_process_group_when_build_fails(tmp_path, monkeypatch):
    left = []
    monkeypatch.setattr(run_mod, "cleanup_distributed", lambda info: left.append(info))

    def failing(ctx):
        raise MicromaeInputError("broken data")

    with pytest.raises(MicromaeInputError, match="broken data"):
        run_training(ToyConfig(), tmp_path / "run", None, None, lambda c: None, failing)
    assert len(left) == 1 and not (tmp_path / "run" / "config.yaml").exists()


def test_check_runs_before_anything_is_written(tmp_path):
    def check(cfg: ToyConfig) -> None:
        raise MicromaeInputError("bad config")

    with pytest.raises(MicromaeInputError, match="bad config"):
        run_training(ToyConfig(), tmp_path / "run", None, None, check, toy_build(ToyConfig()))
    assert not (tmp_path / "run").exists()
