"""The pre-training benchmarks run (``--quick``) and write what BENCHMARKS.md and the README quote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from micromae.data.samples import sample_status

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH_DIR / script), "--quick", *args], capture_output=True,
                          text=True, timeout=600, check=False, env={"OMP_NUM_THREADS": "1", **_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def test_pretraining_gain_scores_each_checkpoint_against_cached_controls(tmp_path):
    proc = run("pretraining_gain.py", "--out", str(tmp_path))
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["checkpoint"] for r in rows][-1] == "last.pt" and len(rows) >= 2
    for r in rows:
        assert set(r["gain"]) == {"kmeans_k3", "probe"}
        assert r["gain"]["probe"] == pytest.approx(r["pretrained"]["probe"] - r["random_mean"]["probe"])
    # one shape: the controls were computed once and reused, so every row has the same control scores
    assert len({json.dumps(r["random_mean"], sort_keys=True) for r in rows}) == 1
    assert len(list((tmp_path / "controls").glob("controls_*.json"))) == 1
    assert rows[0]["train_wall_s"] > 0 and "load_before" in rows[0]


@pytest.mark.skipif(sample_status()["islet"] != "installed", reason=f"islet: {sample_status()['islet']}")
def test_islet_figure_writes_both_panels(tmp_path):
    proc = run("islet_figure.py", "--out", str(tmp_path))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (tmp_path / "islet_clusters.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("MAESTER", "random-init encoder"):
        assert sum(info[name]["cluster_fraction"]) == pytest.approx(1.0, abs=1e-3)
        means = [m for m in info[name]["cluster_mean_intensity"] if m is not None]
        assert means == sorted(means)  # clusters relabelled darkest first


def test_gpu_script_runs_on_cpu_and_writes_one_json(tmp_path):
    """The prepared GPU check (benchmarks/gpu_maester.py) is tested here on CPU with --quick."""
    run("gpu_maester.py", "--no-zarr", "--out", str(tmp_path))  # the GPU machine has no zarr
    info = json.loads((tmp_path / "gpu_maester.json").read_text())
    assert info["zarr_placeholder"] is True
    assert info["steps"] == 6 and info["crops_per_s"] > 0
    checks = info["checks"]
    assert set(checks) == {"bf16_step", "resume_bit_exact", "ddp_one_gpu", "segmentation_cpu_vs_device"}
    assert info["checks_ok"] and all(c["ok"] for c in checks.values()), checks
    assert checks["resume_bit_exact"]["max_abs_weight_diff"] == 0.0 and checks["bf16_step"]["weights_moved"]
    bench = info["benchmarks"]
    assert bench["peak_gflops"] > 0 and "error" not in json.dumps(bench), bench
    for section, key in (("encoder_vs_timm", "vs_timm"), ("train_step", "crops_per_s"),
                         ("samplers", "torch_crops_per_s"), ("pretrain_runs", "projected_recipe_minutes"),
                         ("cover_stride_exact", "pixels_per_s")):
        assert bench[section][key] > 0, section
    assert set(info["gain"]) == {"kmeans_k3", "probe"} and len(info["random_spread"]["probe"]) == 2
