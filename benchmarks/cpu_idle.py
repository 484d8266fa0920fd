"""The CPU figures of issue 14, item 5, in one command, to be run when nothing else runs on the machine.

Runs, each in a fresh process through ``run_all.py`` (``--device cpu``): ``bench_encoder`` (encoder MFU and
ratio to timm), ``bench_pretrain`` (pre-training step MFU), ``bench_cover_stride`` (cover-and-stride MFU and
ratio to the encoder alone), ``bench_sampler`` (numpy and torch sampler crops/s), then times
``micromae demo`` end to end. The 1-minute load average is recorded before and after every part: figures are
only comparable to the goals when it stayed near 0 besides this command. Writes ``<out>/cpu_idle.json`` (every
figure with its load) and ``<out>/cpu_idle.md`` (a table for BENCHMARKS.md), plus each script's ``.jsonl``.

    python benchmarks/cpu_idle.py --out benchmarks/out/idle          # the real run (about 15-25 min)
    python benchmarks/cpu_idle.py --quick --out /tmp/idle            # smoke test (figures mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("bench_encoder", "bench_pretrain", "bench_cover_stride", "bench_sampler")
# (script, figure, selector on the line, label, goal text)
ROWS = (
    ("bench_encoder", "encoder_mfu", {}, "encoder inference MFU (batch 64)", ">= 0.85"),
    ("bench_encoder", "encoder_vs_timm", {}, "encoder throughput / timm's", ">= 0.97"),
    ("bench_pretrain", "pretrain_mfu", {"batch": 64}, "pre-training step MFU (batch 64)", ">= 0.5"),
    ("bench_pretrain", "pretrain_mfu", {"batch": 32}, "pre-training step MFU (batch 32)", ">= 0.5"),
    ("bench_cover_stride", "cover_stride_mfu", {}, "cover-and-stride MFU (256x256)", ">= 0.8"),
    ("bench_cover_stride", "cover_stride_vs_encoder", {}, "cover-and-stride / encoder alone", ">= 0.8"),
    ("bench_sampler", "sampler_crops_per_s", {"mode": "sample_batch"}, "numpy sampler crops/s", ""),
    ("bench_sampler", "sampler_crops_per_s", {"mode": "torch_sample_batch"}, "torch sampler crops/s", ""),
    ("bench_sampler", "torch_vs_numpy", {}, "torch sampler / numpy sampler", ">= 5"),
    ("bench_sampler", "data_ratio", {"mode": "make_loader_workers1"}, "sampler (1 worker) / training step", ">= 5"),
)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def run_part(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; its wall time, exit status and the load average before and after."""
    before, start = load1(), time.perf_counter()
    rc = subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL).returncode
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - start, 1), "load_before": before,
            "load_after": load1()}


def pick(lines: list[dict], figure: str, where: dict) -> dict | None:
    for line in lines:
        if line["figure"] == figure and all(line.get(k) == v for k, v in where.items()):
            return line
    return None


def table(figures: list[dict], demo: dict | None) -> str:
    rows = ["| figure | value | goal | met | load before → after |", "|---|---|---|---|---|"]
    for f in figures:
        met = "" if f["met"] is None else ("yes" if f["met"] else "no")
        rows.append(f"| {f['label']} | {f['value']:.4g} | {f['goal']} | {met} | {f['load_before']} → "
                    f"{f['load_after']} |")
    if demo is not None:
        rows.append(f"| `micromae demo` wall time | {demo['wall_s']} s | | | {demo['load_before']} → "
                    f"{demo['load_after']} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "idle")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (figures mean nothing)")
    ap.add_argument("--demo-steps", type=int, default=None, help="pre-training steps of the demo (default: its own)")
    ap.add_argument("--parts", nargs="+", default=[*SCRIPTS, "demo"], choices=[*SCRIPTS, "demo"],
                    help="which parts to run (default: all)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    result: dict = {"quick": args.quick, "cpu_count": os.cpu_count(), "load_start": os.getloadavg(), "parts": {}}
    quick = ["--quick"] if args.quick else []
    for script in (s for s in SCRIPTS if s in args.parts):
        cmd = [sys.executable, str(HERE / "run_all.py"), "--device", "cpu", "--out", str(args.out),
               "--only", script, *quick]
        result["parts"][script] = run_part(cmd, env)
    demo = {"rc": 0, "wall_s": None, "skipped": True}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        if args.quick:  # the same function as `micromae demo`, on a tiny volume without the k sweep
            code = ("from pathlib import Path; from micromae.demo import run_demo; "
                    f"run_demo(Path({str(out)!r}), steps=2, sweep=(), samples=500, heldout_shape=(8, 32, 32), "
                    "overrides=['data.synthetic_shape=[32,48,48]'])")
            cmd = [sys.executable, "-c", code]
        else:
            cmd = [sys.executable, "-m", "micromae", "demo", "--out", str(out)]
            cmd += ["--steps", str(args.demo_steps)] if args.demo_steps is not None else []
        if "demo" in args.parts:
            demo = run_part(cmd, env)
    result["parts"]["demo"] = demo
    figures = []
    for script, figure, where, label, goal in ROWS:
        path = args.out / f"{script}.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        line = pick(lines, figure, where)
        if line is None:
            continue
        part = result["parts"].get(script)
        if part is None:
            continue
        figures.append({"label": label, "script": script, "figure": figure, **where, "value": line["value"],
                        "goal": goal, "met": line["met"], "load_before": part["load_before"],
                        "load_after": part["load_after"], "peak_gflops": line.get("peak_gflops")})
    result.update({"figures": figures, "load_end": os.getloadavg(), "demo_wall_s": demo["wall_s"]})
    (args.out / "cpu_idle.json").write_text(json.dumps(result, indent=1))
    ran_demo = demo["rc"] == 0 and not demo.get("skipped")
    (args.out / "cpu_idle.md").write_text(table(figures, demo if ran_demo else None))
    print(json.dumps({"figures": len(figures), "failed": [k for k, p in result["parts"].items() if p["rc"]],
                      "out": str(args.out)}))
    return 1 if any(p["rc"] for p in result["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
