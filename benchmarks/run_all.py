"""Run every ``bench_*.py`` in this folder, one after another, each in a fresh Python process.

    python benchmarks/run_all.py [--quick] [--device auto|cpu|cuda] [--out DIR] [--only bench_encoder ...]

Each script prints its JSON lines to stdout (passed through) and writes ``<out>/<script>.jsonl``. The exit
status is 0 when every script succeeded, else 1 (every script still runs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover(folder: Path = HERE) -> list[Path]:
    """The benchmark scripts: ``bench_*.py`` in ``folder``, sorted by name."""
    return sorted(folder.glob("bench_*.py"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="passed to every script")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="passed to every script")
    parser.add_argument("--out", type=Path, default=None, help="passed to every script (default: theirs)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only these scripts (names with or without .py)")
    return parser.parse_args(argv)


def select(scripts: list[Path], only: list[str] | None) -> list[Path]:
    """Keep the scripts named in ``only`` (stem or file name); unknown names exit with a message."""
    if not only:
        return scripts
    by_name = {s.stem: s for s in scripts}
    wanted = [name.removesuffix(".py") for name in only]
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        sys.exit(f"run_all: unknown benchmark(s) {unknown}: expected some of {sorted(by_name)}")
    return [by_name[w] for w in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    passthrough = ["--device", args.device] + (["--quick"] if args.quick else [])
    if args.out is not None:
        passthrough += ["--out", str(args.out)]
    failed = []
    for script in select(discover(), args.only):
        print(f"[run_all] {script.name} {' '.join(passthrough)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rc = subprocess.run([sys.executable, str(script), *passthrough], check=False).returncode
        print(f"[run_all] {script.name}: exit {rc} after {time.perf_counter() - start:.1f} s", file=sys.stderr,
              flush=True)
        if rc != 0:
            failed.append(script.name)
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
