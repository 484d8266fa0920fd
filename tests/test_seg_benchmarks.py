"""Tests of the segmentation benchmarks (``benchmarks/bench_cover_stride.py``, ``bench_segment_memory.py``):
each runs with ``--quick`` in a subprocess and prints valid JSON lines with the expected figures and positive
values, and their helpers do what they say. No assertion on speed: CI never fails on a time."""

from __future__ import annotations

import importlib.util
import json
import math
import resource
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from micromae.segment.cover_stride import count_windows

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
KEYS = {"bench", "figure", "value", "unit", "goal", "met", "quick", "env"}
MODES = ("exact", "central_8", "central_12", "fast")
EXPECTED = {
    "bench_cover_stride": {"peak", "peak_end", "cover_stride_mfu", "cover_stride_pixels_per_s",
                           "encoder_mfu_same_batch", "cover_stride_vs_encoder", "naive_speedup",
                           "speedup_central_8", "speedup_central_12", "speedup_fast",
                           *(f"tiny_speedup_{m}" for m in MODES[1:]), *(f"dice_{m}" for m in MODES)},
    "bench_segment_memory": {"peak_rss_small_mb", "peak_rss_large_mb", "memory_ratio", "memory_increment_ratio"},
}


def load_bench(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (the folder is not a package; its scripts import ``common``)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    key = f"_segbench_{name}"
    if key not in sys.modules:  # registered first: dataclasses look their module up while it executes
        spec = importlib.util.spec_from_file_location(key, BENCH_DIR / f"{name}.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def run_quick(name: str, out: Path) -> list[dict]:
    proc = subprocess.run([sys.executable, str(BENCH_DIR / f"{name}.py"), "--quick", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    saved = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
    assert saved == lines  # stdout and the .jsonl file carry the same figures
    return lines


@pytest.fixture(scope="module")
def cover_stride_lines(tmp_path_factory) -> list[dict]:
    return run_quick("bench_cover_stride", tmp_path_factory.mktemp("cs"))


@pytest.fixture(scope="module")
def memory_lines(tmp_path_factory) -> list[dict]:
    return run_quick("bench_segment_memory", tmp_path_factory.mktemp("mem"))


# ----------------------------------------------------------------------------------------------- --quick runs
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quick_run_prints_every_figure_with_positive_values(name, cover_stride_lines, memory_lines):
    lines = cover_stride_lines if name == "bench_cover_stride" else memory_lines
    assert {line["figure"] for line in lines} == EXPECTED[name]
    for line in lines:
        assert KEYS <= set(line), line["figure"]
        assert line["bench"] == name and line["quick"] is True
        assert math.isfinite(line["value"]) and line["value"] > 0, line["figure"]
        assert line["env"]["cores"] >= 1 and line["env"]["device"] == "cpu"


def test_cover_stride_context_is_consistent(cover_stride_lines):
    by = {line["figure"]: line for line in cover_stride_lines}
    naive = by["naive_speedup"]
    assert naive["windows_naive"] == naive["crop"] ** 2 > naive["windows_exact"]
    assert naive["max_abs_diff"] < 1e-4  # the reference and cover-and-stride computed the same embeddings
    assert by["speedup_fast"]["goal"] == 20.0 and by["cover_stride_mfu"]["goal"] == 0.8
    for mode in MODES:
        dice = by[f"dice_{mode}"]
        assert 0 < dice["value"] <= 1 and 0 <= dice["agreement_with_exact"] <= 1
        assert dice["dice_change"] == pytest.approx(dice["value"] - by["dice_exact"]["value"])
    assert by["dice_exact"]["agreement_with_exact"] == 1.0
    mfu = by["cover_stride_mfu"]
    assert by["cover_stride_vs_encoder"]["value"] == pytest.approx(
        mfu["value"] / by["encoder_mfu_same_batch"]["value"])


def test_memory_lines_are_consistent(memory_lines):
    by = {line["figure"]: line for line in memory_lines}
    ratio = by["memory_ratio"]
    assert ratio["goal_is"] == "at most" and ratio["met"] == (ratio["value"] <= ratio["goal"])
    assert ratio["value"] == pytest.approx(by["peak_rss_large_mb"]["value"] / by["peak_rss_small_mb"]["value"])
    assert ratio["voxels_large"] == 8 * ratio["voxels_small"]
    for name in ("peak_rss_small_mb", "peak_rss_large_mb"):
        assert by[name]["value"] >= by[name]["before_mb"] > 0  # a peak never falls


# ----------------------------------------------------------------------------------------------- helpers
def test_flop_per_pixel_counts_every_window():
    bench = load_bench("bench_cover_stride")
    common = load_bench("common")
    enc = bench.paper_encoder(quick=True, device=torch.device("cpu"))  # FOV 60, p 5, 12x12 tokens
    per_window = common.encoder_flops(enc, 1)
    # 40 x 40 exact: 2 blocks of 20 px x 5 shifts per axis = 100 windows for 1600 pixels.
    assert bench.flop_per_pixel(enc, 40, 40) == pytest.approx(per_window * 100 / 1600)
    # A larger central region needs fewer windows: c = 8 covers 40 px per block, so 1 x 5 per axis.
    assert bench.flop_per_pixel(enc, 40, 40, central_tokens=8) == pytest.approx(per_window * 25 / 1600)
    assert bench.flop_per_pixel(enc, 37, 23, mode="fast") == pytest.approx(
        per_window * count_windows(37, 23, enc, mode="fast") / (37 * 23))


def test_label_agreement():
    bench = load_bench("bench_cover_stride")
    a = np.array([[0, 1], [2, 3]])
    b = np.array([[0, 1], [0, 0]])
    assert bench.label_agreement(a, b) == 0.5
    assert bench.label_agreement(a, b, mask=np.array([[True, True], [False, False]])) == 1.0
    assert bench.label_agreement(a, a) == 1.0


def test_tiny_config_has_a_12_token_grid():
    bench = load_bench("bench_cover_stride")
    cfg = bench.tiny_config(bench.FULL, torch.device("cpu"))
    assert cfg.model.img_size // cfg.model.patch_size == 12  # so central_tokens 4, 8 and 12 all differ
    assert cfg.train.steps == bench.FULL.tiny_steps and list(cfg.data.synthetic_shape) == list(bench.FULL.tiny_volume)
    assert cfg.data.synthetic_shape[0] + 2 * cfg.data.pad >= cfg.model.img_size  # ZX / ZY crops fit


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(next(row for row in f if row.startswith("VmRSS:")).split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_peak_rss_bytes_is_the_high_water_mark_in_bytes():
    bench = load_bench("bench_segment_memory")
    block = np.ones(64 * 1024 * 1024 // 8)  # 64 MB, touched
    rss = current_rss_bytes()
    peak = bench.peak_rss_bytes()
    assert peak >= rss > block.nbytes  # bytes, not kB, and at least what is resident now
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    assert peak == pytest.approx(maxrss, rel=0.05)
    del block


def test_larger_shape_has_8x_the_voxels():
    bench = load_bench("bench_segment_memory")
    assert bench.larger_shape((3, 5, 7)) == (6, 10, 14)
    assert np.prod(bench.larger_shape(bench.FULL_SHAPE)) == 8 * np.prod(bench.FULL_SHAPE)


def test_upper_bound_reporter_marks_met_when_at_most(tmp_path, capsys):
    bench = load_bench("bench_segment_memory")
    rep = bench.UpperBoundReporter("unit", tmp_path, torch.device("cpu"), quick=True)
    rep.emit_at_most("low", 1.1, "ratio", 1.2)
    rep.emit_at_most("high", 1.3, "ratio", 1.2)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["figure"], p["met"], p["goal_is"]) for p in printed] == [("low", True, "at most"),
                                                                       ("high", False, "at most")]
    path = rep.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == printed


# ----------------------------------------------------------------------------------------------- quality
def test_quality_benchmark_scores_every_method_per_class(tmp_path):
    """``segmentation_quality.py --quick``: MAESTER (both mappings), intensity k-means, Otsu and a supervised
    baseline each get a Dice per class in [0, 1] on the held-out volume, and the Markdown table is written."""
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "segmentation_quality.py"), "--quick", "--seeds", "1",
                           "--ks", "6", "--supervised", "segmenter_tiny", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    scored = [r for r in rows if "dice" in r and "held out" in r["data"]]
    methods = {(r["method"].split(" (")[0], r["mapping"]) for r in scored}
    assert {("MAESTER", "hungarian"), ("MAESTER", "majority"), ("intensity k-means", "hungarian"),
            ("Otsu", "hungarian"), ("segmenter_tiny", "none")} <= {(m, p.split(" ")[0]) for m, p in methods}
    for r in scored:
        assert set(r["dice"]) == {"outside", "cytoplasm", "membrane", "nucleus", "mitochondria", "granules"}
        assert all(0.0 <= v <= 1.0 for v in r["dice"].values())
        assert r["mean_dice"] == pytest.approx(np.mean(list(r["dice"].values())), abs=1e-3)
    table = (tmp_path / "out" / "segmentation_quality.md").read_text()
    assert "| MAESTER (k=6) | hungarian |" in table and "segmenter_tiny (supervised" in table
    # the control: the same pipeline with random-init encoders of the same shape, per seed and aggregated
    seeds = {r["control_seed"] for r in scored if "control_seed" in r}
    assert seeds == {1000, 1001}
    agg = [r for r in scored if r["method"] == "random-init encoder, mean of 2 (k=6)" and r["mapping"] == "hungarian"]
    per = [r["mean_dice"] for r in scored if "control_seed" in r and r["mapping"] == "hungarian"]
    assert len(agg) == 1 and agg[0]["mean_dice"] == pytest.approx(np.mean(per), abs=1e-3)
    assert agg[0]["mean_dice_min"] == min(per) and "| random-init encoder, mean of 2 (k=6) | hungarian |" in table


def test_omezarr_bench_quick_run_prints_its_figures(tmp_path):
    lines = {line["figure"]: line for line in run_quick("bench_omezarr", tmp_path)}
    assert set(lines) == {"ome_overhead", "finish_mvoxels_per_s", "finish_peak_traced_mb",
                          "finish_memory_ratio_2x_depth"}
    assert all(KEYS <= set(line) and line["quick"] is True for line in lines.values())
    assert np.isfinite(lines["ome_overhead"]["value"]) and lines["ome_overhead"]["ome_s"] > 0
    assert lines["finish_mvoxels_per_s"]["value"] > 0 and lines["finish_peak_traced_mb"]["value"] > 0
    ratio = lines["finish_memory_ratio_2x_depth"]
    assert ratio["goal_is"] == "at most" and ratio["met"] == (ratio["value"] <= ratio["goal"])
