"""Tests of the DAMA benchmarks: ``benchmarks/bench_dama.py``, ``dama_probe.py``, ``mif_calibration.py`` and
``mif_comparison.py`` run with
``--quick`` as subprocesses and print valid JSON lines with the expected figures, keys and finite values
(no assertion on speed or accuracy); plus the probe's linear-probe helper on features that do or do not
carry the label."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
KEYS = {"bench", "figure", "value", "unit", "goal", "met", "quick", "env"}
CONFIGS = {"student1-student2", "ema", "shared", "data2vec"}
METHODS = {"DAMA", "DAMA-ema", "MAE", "data2vec"}


def run_quick(script: str, out: Path) -> list[dict]:
    """Run ``benchmarks/<script>.py --quick --device cpu --out out``; return its stdout JSON lines, after
    checking they equal ``<out>/<script>.jsonl`` and that no temporary file is left. One torch thread: the
    figures mean nothing here, and on a busy 2-core machine two threads only wait for each other."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH_DIR / f"{script}.py"), "--quick", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    written = [json.loads(line) for line in (out / f"{script}.jsonl").read_text().splitlines()]
    assert printed and written == printed
    assert not list(out.glob(".*.tmp"))
    for line in printed:
        assert KEYS <= set(line), line
        assert line["bench"] == script and line["quick"] is True
        assert isinstance(line["value"], float) and math.isfinite(line["value"]), line
        assert line["env"]["device"] == "cpu" and line["env"]["torch"] == torch.__version__
    return printed


def load_module(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (its folder on ``sys.path`` for ``common``)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_dama_quick(tmp_path):
    lines = run_quick("bench_dama", tmp_path)
    assert {line["figure"] for line in lines} == {"peak", "peak_end", "dama_cost"}
    costs = [line for line in lines if line["figure"] == "dama_cost"]
    # every variant on both shapes, once each
    assert sorted((c["shape"], c["config"]) for c in costs) == sorted(
        (s, c) for s in ("vit_s", "dama_tiny") for c in CONFIGS)
    goals = {}
    for c in costs:
        assert c["value"] > 0 and c["median_s"] > 0 and c["mae_median_s"] > 0
        assert c["goal_is"] == "at most"
        # upper-bound goals: met means the ratio is at most the goal
        assert c["met"] == (None if c["goal"] is None else c["value"] <= c["goal"])
        goals[c["config"]] = c["goal"]
        # the ratio is the DAMA time over the MAE steps around it: consistent with the medians
        assert len(c["ratios"]) == c["rounds"] == 1
        assert c["value"] == pytest.approx(c["ratios"][0], rel=1e-3)
    assert goals == {"student1-student2": 2.1, "ema": 1.6, "shared": None, "data2vec": None}
    # two students train twice the parameters of MAE plus the feature head; the EMA teacher trains none
    by = {(c["shape"], c["config"]): c for c in costs}
    for shape in ("vit_s", "dama_tiny"):
        mae = by[(shape, "ema")]["mae_params"]
        assert by[(shape, "student1-student2")]["trained_params"] > 2 * mae
        assert mae < by[(shape, "ema")]["trained_params"] < 2 * mae


def test_dama_probe_quick(tmp_path):
    lines = run_quick("dama_probe", tmp_path)
    assert {line["figure"] for line in lines} == {"pretrain_cpu_s", "probe_accuracy"}
    runs = {line["method"]: line for line in lines if line["figure"] == "pretrain_cpu_s"}
    assert set(runs) == METHODS
    for run in runs.values():
        assert run["value"] >= 0 and run["wall_s"] > 0 and run["steps"] == 2
        assert math.isfinite(run["last_loss"])
    probes = [line for line in lines if line["figure"] == "probe_accuracy"]
    features = METHODS | {"random init", "raw channel means"}
    assert sorted((p["method"], p["crop"]) for p in probes) == sorted((f, s) for f in features for s in (16, 32))
    for p in probes:
        assert 0.0 <= p["value"] <= 1.0 and len(p["accuracies"]) == p["splits"] == 2
        assert p["value"] == pytest.approx(float(np.mean(p["accuracies"])))
        assert p["n_cells"] == sum(p["class_counts"].values()) and len(p["class_counts"]) == 5
        assert p["feature_dim"] == (7 if p["method"] == "raw channel means" else 64)
    table = (tmp_path / "dama_probe.md").read_text()
    assert all(f"| {name} |" in table for name in features)


def test_linear_probe_reads_the_label_only_when_features_carry_it():
    probe = load_module("dama_probe")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 20)
    informative = np.eye(5)[labels] * 6.0 + rng.normal(size=(100, 5))  # class means 6 sigma apart
    noise = rng.normal(size=(100, 5))
    good, bad = probe.linear_probe(informative, labels, 3), probe.linear_probe(noise, labels, 3)
    assert len(good) == len(bad) == 3
    assert np.mean(good) > 0.9 and np.mean(bad) < 0.5  # chance is 0.2


def test_mif_calibration_quick(tmp_path):
    lines = run_quick("mif_calibration", tmp_path)
    figures = {line["figure"]: line for line in lines}
    assert set(figures) == {"channel_means_accuracy", "random_init_accuracy"}
    means = figures["channel_means_accuracy"]
    assert means["realism"] == "paper" and means["crop"] == 64 and means["n_crops"] == sum(means["classes"].values())
    assert len(means["per_fold"]) == 2 and means["value"] == pytest.approx(float(np.mean(means["per_fold"])))
    finetuned = figures["random_init_accuracy"]
    assert 0.0 <= finetuned["value"] <= 1.0 and finetuned["steps"] == 2 and finetuned["model_size"] == 64
    assert finetuned["n_train"] + finetuned["n_test"] == means["n_crops"]


def test_channel_means_accuracy_reads_the_label_only_when_means_carry_it():
    calibration = load_module("mif_calibration")
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 30)
    splits = [(np.flatnonzero(np.arange(150) % 5 != k), np.flatnonzero(np.arange(150) % 5 == k)) for k in range(2)]
    informative = np.eye(5, 7)[labels] * 6.0 + rng.normal(size=(150, 7))
    good = calibration.channel_means_accuracy(informative, labels, splits)
    bad = calibration.channel_means_accuracy(rng.normal(size=(150, 7)), labels, splits)
    assert len(good) == len(bad) == 2
    assert np.mean(good) > 0.9 and np.mean(bad) < 0.45  # chance is 0.2


def test_mif_comparison_quick(tmp_path):
    lines = run_quick("mif_comparison", tmp_path)
    runs = {line["method"]: line for line in lines if line["figure"] == "pretrain_cpu_s"}
    assert set(runs) == {"MAE", "DAMA", "DAMA-rand", "data2vec", "SimMIM", "MoCo-v3"}
    assert all(r["steps"] == 2 and r["value"] >= 0 and math.isfinite(r["last_loss"]) for r in runs.values())
    accuracy = [line for line in lines if line["figure"] == "accuracy"]
    encoders = set(runs) | {"random init"}
    expected = {(e, m, f) for e in encoders for m in ("knn", "linear", "finetune") for f in (0.1, 0.2, 0.5, 1.0)}
    assert {(a["encoder"], a["method"], a["fraction"]) for a in accuracy} == expected
    for a in accuracy:
        assert 0.0 <= a["value"] <= 1.0 and a["folds"] == (1 if a["method"] == "finetune" else 2)
    # smaller shares are subsets: never more training crops at a smaller share
    for e in encoders:
        n = [next(a["n_train"] for a in accuracy if (a["encoder"], a["method"], a["fraction"]) == (e, "knn", f))
             for f in (0.1, 0.2, 0.5, 1.0)]
        assert n == sorted(n) and n[0] < n[-1]
    assert any(line["figure"] == "channel_means_accuracy" for line in lines)
    table = (tmp_path / "mif_comparison.md").read_text()
    assert all(f"| {name} |" in table for name in encoders) and "channel means" in table
    # parts evaluated apart combine into the same table; the same rows twice are refused
    comparison = load_module("mif_comparison")
    assert comparison.main(["--combine", str(tmp_path), "--out", str(tmp_path / "combined")]) == 0
    assert (tmp_path / "combined" / "mif_comparison.md").read_text() == table
    assert (tmp_path / "combined" / "mif_comparison_finetune.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="in two parts"):
        comparison.main(["--combine", f"{tmp_path},{tmp_path}", "--out", str(tmp_path / "twice")])


def test_mif_benchmarks_share_the_calibrated_data():
    """The comparison runs on the crops the calibration measured (and test_synthetic_mif bounds at 64 px)."""
    calibration, comparison = load_module("mif_calibration"), load_module("mif_comparison")
    cal, com = calibration.parse_args([]), comparison.parse_args([])
    assert cal.crop_size == com.crop_size == 64 and cal.realism == "paper"
    assert (cal.pretrain_images, cal.labelled_images, cal.patch_size) == (com.pretrain_images, com.labelled_images,
                                                                          com.patch_size)
    assert comparison.SEED == calibration.SEED and cal.steps == com.finetune_steps


def test_mif_comparison_keeps_checkpoints_by_pretraining_minutes(tmp_path):
    """``--checkpoint-every-min`` keeps the intermediate weights of one schedule and evaluates them as
    ``METHOD@<minutes>min`` beside the method's last checkpoint."""
    comparison = load_module("mif_comparison")
    runs = tmp_path / "runs"
    common = ["--quick", "--keep-runs", str(runs), "--methods", "MAE", "--checkpoint-every-min", "10"]
    assert comparison.main(common + ["--pretrain-only", "--out", str(tmp_path / "pre")]) == 0
    ckpts = runs / "pretrain" / "MAE" / "checkpoints"
    marks = json.loads((runs / "pretrain" / "MAE" / "checkpoint_minutes.json").read_text())
    assert marks == {"minutes": {"10": "step_0000001.pt"}, "final": "step_0000002.pt"}  # quick: 2 steps
    early = torch.load(ckpts / marks["minutes"]["10"], map_location="cpu", weights_only=False)
    last = torch.load(ckpts / "last.pt", map_location="cpu", weights_only=False)
    assert (early["step"], last["step"]) == (1, 2)
    assert any(not torch.equal(early["model"][k], last["model"][k]) for k in last["model"])  # step 1's own weights
    out = tmp_path / "eval"
    assert comparison.main(common + ["--skip-finetune", "--fractions", "0.5,1.0", "--out", str(out)]) == 0
    table = (out / "mif_comparison.md").read_text()
    assert all(f"| {name} |" in table for name in ("MAE@10min", "MAE", "random init"))
    # a stopped run (its final step file absent, last.pt at an earlier step) is not evaluated as the method
    (ckpts / marks["final"]).unlink()
    with pytest.raises(SystemExit, match="no checkpoint yet"):
        comparison.main(common + ["--skip-finetune", "--out", str(tmp_path / "stopped")])


def test_mif_comparison_repeats_a_given_schedule_and_fine_tunes_without_probes(tmp_path):
    """``--cpu-s-per-step`` sets the step count from a given cost (no timing), so an earlier schedule can be
    repeated under any load; ``--skip-probes`` evaluates by fine-tuning only."""
    comparison = load_module("mif_comparison")
    runs = tmp_path / "runs"
    common = ["--quick", "--keep-runs", str(runs), "--methods", "MAE"]
    pre = common + ["--budget-min", "0.05", "--cpu-s-per-step", "1.0", "--checkpoint-every-min", "0.025"]
    assert comparison.main(pre + ["--pretrain-only", "--out", str(tmp_path / "pre")]) == 0
    marks = json.loads((runs / "pretrain" / "MAE" / "checkpoint_minutes.json").read_text())
    assert marks == {"minutes": {"0.025": "step_0000001.pt"}, "final": "step_0000003.pt"}  # 3 s at 1 s per step
    last = torch.load(runs / "pretrain" / "MAE" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert last["step"] == 3
    given = [json.loads(line) for line in (tmp_path / "pre" / "mif_comparison.jsonl").read_text().splitlines()]
    assert any(g["figure"] == "pretrain_cpu_s_per_step" and g.get("given") and g["steps"] == 3 for g in given)
    out = tmp_path / "ft"
    assert comparison.main(common + ["--encoders", "MAE", "--skip-probes", "--finetune-fractions", "1.0",
                                     "--out", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "mif_comparison.jsonl").read_text().splitlines()]
    methods = {(a["encoder"], a["method"]) for a in lines if a["figure"] == "accuracy"}
    assert methods == {("MAE", "finetune")}
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        comparison.main(common + ["--skip-probes", "--skip-finetune", "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="needs one method"):
        comparison.main(["--quick", "--methods", "MAE,DAMA", "--cpu-s-per-step", "0.1", "--out", str(tmp_path / "x")])


def test_data2vec_collapse_quick(tmp_path):
    """Each variant changes what it names (same initialisation and batches otherwise), and each gets its target
    spread and a linear probe beside random init."""
    lines = run_quick("data2vec_collapse", tmp_path)
    spread = {line["variant"]: line for line in lines if line["figure"] == "target_spread"}
    variants = load_module("data2vec_collapse").VARIANTS
    assert set(spread) == set(variants)
    default, frozen = spread["layer norm (default)"], spread["momentum 1 (teacher frozen)"]
    # the first logged step comes before the teachers can differ: the momentum variants start where the default does
    assert frozen["tokens_first"] == pytest.approx(default["tokens_first"], rel=1e-6)
    # normalising each block's output over the tokens spreads the target across tokens far more than per token
    assert spread["instance norm"]["tokens_first"] > 2 * default["tokens_first"]
    assert spread["K=1"]["tokens_first"] != pytest.approx(default["tokens_first"], rel=1e-3)
    for s in spread.values():
        assert all(math.isfinite(s[k]) and s[k] >= 0 for k in ("tokens_first", "tokens_last", "images_first"))
    linear = {line["variant"] for line in lines if line["figure"] == "linear_accuracy"}
    assert linear == set(variants) | {"random init"}
    assert "| random init (no pre-training) |" in (tmp_path / "data2vec_collapse.md").read_text()
    assert (tmp_path / "data2vec_collapse.png").stat().st_size > 1000
