"""Tests of the benchmarks: the analytic FLOP count (by hand and against torch's FlopCounterMode) and every
``benchmarks/bench_*.py`` run with ``--quick`` (valid JSON lines, expected figures, positive values).
No assertion on speed: CI never fails on a time."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from micromae.models import ViTEncoder, mae_maester, mae_tiny_test, vit_maester, vit_tiny_test

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
KEYS = {"bench", "figure", "value", "unit", "goal", "met", "quick", "env"}
EXPECTED_FIGURES = {
    "bench_encoder": {"peak", "peak_end", "encoder_gflops", "encoder_mfu", "encoder_images_per_s", "timm_gflops",
                      "timm_mfu", "encoder_vs_timm"},
    "bench_pretrain": {"peak", "peak_end", "pretrain_mfu", "pretrain_gflops", "pretrain_images_per_s"},
    "bench_sampler": {"peak", "peak_end", "train_crops_per_s", "sampler_crops_per_s", "data_ratio",
                      "torch_vs_numpy"},
}


def load_module(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (the folder is not a package) under a private module name."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common() -> ModuleType:
    return load_module("common")


def counted_flops(fn) -> int:
    """FLOPs torch counts for ``fn()``; SDPA forced onto its math path so attention's bmm ops are counted
    (torch's counter does not see the fused CPU attention kernel)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------- FLOP formula
def test_vit_flops_equals_a_hand_count(common):
    # 10x10x1 image, 5x5 patches -> L = 4 patches, T = 5 tokens with CLS; D = 8, one block, MLP hidden 16.
    patch_embed = 4 * 25 * 8              # multiply-adds: every patch (25 values) mapped to 8 features
    qkv, proj = 5 * 8 * 24, 5 * 8 * 8     # per token: 8 -> 3*8, then 8 -> 8
    fc1, fc2 = 5 * 8 * 16, 5 * 16 * 8
    qk, av = 5 * 5 * 8, 5 * 5 * 8         # scores T x T over D, then weighted sum of T values of width D
    hand = 2 * (patch_embed + qkv + proj + fc1 + fc2 + qk + av)
    assert common.vit_flops(1, num_patches=4, patch_pixels=25, dim=8, depth=1, mlp_hidden=16) == hand
    assert common.vit_flops(3, 4, 25, 8, 2, 16) == 3 * (hand + (hand - 2 * patch_embed))  # batch and depth scale
    tiny = ViTEncoder(img_size=10, patch_size=5, in_chans=1, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0)
    assert common.encoder_flops(tiny, 1) == hand  # read off the module: same numbers


def test_maester_encoder_is_about_2_8_gflop_per_window(common):
    """The MAESTER paper model costs 2.8 GFLOP per 80x80 window (docs/METHODS.md, cover-and-stride)."""
    assert common.encoder_flops(vit_maester(), 1) / 1e9 == pytest.approx(2.8, rel=0.02)


@pytest.mark.parametrize("make", [vit_tiny_test, vit_maester], ids=["tiny", "maester"])
def test_encoder_flops_match_flop_counter(common, make):
    torch.manual_seed(0)
    encoder = make().eval()
    batch = 3 if make is vit_tiny_test else 1
    imgs = torch.rand(batch, 1, *encoder.img_size)
    with torch.no_grad():
        assert counted_flops(lambda: encoder.forward_features(imgs)) == common.encoder_flops(encoder, batch)
        keep = encoder.num_patches // 2  # visible patches only, as the MAE encoder runs
        ids_keep = torch.stack([torch.randperm(encoder.num_patches)[:keep] for _ in range(batch)])
        assert (counted_flops(lambda: encoder.forward_features(imgs, ids_keep=ids_keep))
                == common.encoder_flops(encoder, batch, visible=keep))
        ref = VisionTransformer(**encoder.timm_kwargs).eval()  # the model bench_encoder compares against
        assert counted_flops(lambda: ref.forward_features(imgs)) == common.encoder_flops(encoder, batch)


@pytest.mark.parametrize("make", [mae_tiny_test, mae_maester], ids=["tiny", "maester"])
def test_mae_flops_match_flop_counter(common, make):
    torch.manual_seed(0)
    model = make()
    batch = 2
    imgs = torch.rand(batch, 1, *model.encoder.img_size)
    with torch.no_grad():
        assert counted_flops(lambda: model(imgs)) == common.mae_flops(model, batch)
    # the forward count grows with the visible fraction: a lower mask ratio costs more
    model.mask_ratio = 0.25
    assert common.mae_flops(model, batch) > common.mae_flops(make(), batch)


# ----------------------------------------------------------------------------------------------- scripts
def check_lines(lines: list[dict], bench: str) -> None:
    assert lines, f"{bench} printed no figure"
    assert {line["figure"] for line in lines} == EXPECTED_FIGURES[bench]
    for line in lines:
        assert KEYS <= set(line), line
        assert line["bench"] == bench and line["quick"] is True
        assert isinstance(line["value"], float) and math.isfinite(line["value"]) and line["value"] > 0, line
        assert line["goal"] is None or (line["goal"] > 0 and line["met"] == (line["value"] >= line["goal"]))
        assert line["env"]["device"] == "cpu" and line["env"]["torch"] == torch.__version__
        assert line["env"]["other_load"] is None or line["env"]["other_load"] >= 0
    goals = {line["figure"]: line["goal"] for line in lines if line["goal"] is not None}
    expected_goals = {"bench_encoder": {"encoder_mfu": 0.85, "encoder_vs_timm": 0.97},
                      "bench_pretrain": {"pretrain_mfu": 0.5},
                      "bench_sampler": {"data_ratio": 5.0, "torch_vs_numpy": 5.0}}
    assert goals == expected_goals[bench]


@pytest.mark.parametrize("bench", sorted(EXPECTED_FIGURES))
def test_script_quick_prints_json_lines(bench, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH_DIR / f"{bench}.py"), "--quick", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    check_lines(printed, bench)
    written = [json.loads(line) for line in (tmp_path / f"{bench}.jsonl").read_text().splitlines()]
    assert written == printed
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    if bench == "bench_pretrain":
        assert sorted(line["batch"] for line in printed if line["figure"] == "pretrain_mfu") == [2, 4]
    if bench == "bench_sampler":
        modes = {line["mode"] for line in printed if line["figure"] == "data_ratio"}
        assert modes == {"sample_batch", "make_loader_workers0", "make_loader_workers1", "torch_sample_batch"}


def test_every_script_is_known_to_this_test():
    run_all = load_module("run_all")
    assert {p.stem for p in run_all.discover()} >= set(EXPECTED_FIGURES)


def test_run_all_runs_each_script_in_a_fresh_process_with_the_options(monkeypatch, tmp_path):
    run_all = load_module("run_all")
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 3 if "bench_pretrain" in cmd[1] else 0)

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    rc = run_all.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 1  # one script failed ...
    assert [Path(c[1]).name for c in calls] == [p.name for p in run_all.discover()]  # ... and all still ran
    for cmd in calls:
        assert cmd[0] == sys.executable
        assert cmd[2:] == ["--device", "cpu", "--quick", "--out", str(tmp_path)]
    calls.clear()
    assert run_all.main(["--only", "bench_encoder.py"]) == 0
    assert [Path(c[1]).name for c in calls] == ["bench_encoder.py"] and "--quick" not in calls[0]
    with pytest.raises(SystemExit):
        run_all.main(["--only", "bench_nothing"])


def test_reporter_flags_missed_goals_and_writes_jsonl(common, tmp_path, capsys):
    rep = common.Reporter("bench_x", tmp_path, torch.device("cpu"), quick=True)
    rep.emit("a", 0.5, "ratio", 0.85, batch=4)
    rep.emit("b", 2.0, "ratio", None)
    path = rep.close()
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["met"] for line in printed] == [False, None] and printed[0]["batch"] == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == printed
    assert path == tmp_path / "bench_x.jsonl"


def test_cpu_idle_collects_the_figures_with_the_load_into_json_and_a_table(tmp_path):
    """benchmarks/cpu_idle.py --quick on two of its parts (the whole command, demo included, is the lead's
    idle-machine run)."""
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "cpu_idle.py"), "--quick", "--out", str(tmp_path),
                           "--parts", "bench_encoder", "bench_sampler"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "cpu_idle.json").read_text())
    labels = {f["label"] for f in result["figures"]}
    assert labels == {"encoder inference MFU (batch 64)", "encoder throughput / timm's", "numpy sampler crops/s",
                      "torch sampler crops/s", "torch sampler / numpy sampler", "sampler (1 worker) / training step"}
    for f in result["figures"]:
        assert f["value"] > 0 and f["load_before"] >= 0 and f["load_after"] >= 0
    assert set(result["parts"]) == {"bench_encoder", "bench_sampler", "demo"} and result["parts"]["demo"]["skipped"]
    table = (tmp_path / "cpu_idle.md").read_text()
    assert table.count("\n") == 2 + len(labels) and "torch sampler / numpy sampler" in table
