"""Shared pieces of the micromae benchmarks (how speed is measured: docs/METHODS.md; the figures: BENCHMARKS.md).

Every figure is a ratio measured in the same process and the same run: ``peak`` (GFLOP/s of a large matmul) is
measured at the start of every script, model FLOPs are counted analytically, and MFU = achieved model GFLOP/s
divided by ``peak``. Each figure is printed as one JSON line on stdout::

    {"bench": ..., "figure": ..., "value": ..., "unit": ..., "goal": ..., "met": ..., <context>, "env": {...}}

``goal`` is a lower bound (every goal here reads "at least"), or null for a figure reported without a goal;
``met`` says whether ``value >= goal``. All lines of a script are also written, atomically, to
``<out>/<script>.jsonl`` (default ``benchmarks/out/``). Progress messages go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import timm
import torch

from micromae.errors import input_error

OUT_DIR = Path(__file__).resolve().parent / "out"

__all__ = [
    "OUT_DIR", "parse_args", "resolve_device", "autocast", "synchronize", "clock", "timed", "time_call", "median",
    "measure_peak", "report_peak", "linear_flops", "block_flops", "vit_flops", "encoder_flops", "mae_flops",
    "cpu_model", "environment", "busy_cpu_seconds", "own_cpu_seconds", "OtherLoad", "Reporter", "log",
]


# ----------------------------------------------------------------------------------------------- command line
def parse_args(description: str | None, argv: list[str] | None = None) -> argparse.Namespace:
    """The options every benchmark takes: ``--quick``, ``--device auto|cpu|cuda``, ``--out DIR``."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny batches and few iterations (for tests; the figures mean nothing)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when available, else CPU (default: auto)")
    parser.add_argument("--out", type=Path, default=OUT_DIR,
                        help=f"folder for <script>.jsonl (default: {OUT_DIR})")
    return parser.parse_args(argv)


def log(msg: str) -> None:
    """Progress message on stderr (stdout carries only JSON lines)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- device, timing
def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cuda`` without a GPU raises MicromaeInputError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise input_error("--device", "a machine with a CUDA GPU", "no CUDA device",
                          "Use --device auto or --device cpu")
    if spec not in ("cpu", "cuda"):
        raise input_error("--device", "auto, cpu or cuda", repr(spec), "Pick one of the three")
    return torch.device(spec)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (as training does), plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def clock(device: torch.device | None = None, digits: int | None = None) -> Iterator[dict[str, float]]:
    """Time the block: the dict it yields gets ``wall_s`` (wall-clock seconds) and ``cpu_s`` (CPU seconds of
    this process, all threads, and of its finished children such as data-loader workers) when the block ends.
    With a CUDA ``device`` queued GPU work is waited for before and after; ``digits`` rounds both."""
    times: dict[str, float] = {}
    if device is not None:
        synchronize(device)
    cpu, wall = own_cpu_seconds(), time.perf_counter()
    try:
        yield times
    finally:
        if device is not None:
            synchronize(device)
        times["wall_s"] = time.perf_counter() - wall
        times["cpu_s"] = own_cpu_seconds() - cpu
        if digits is not None:
            times.update({k: round(v, digits) for k, v in times.items()})


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> tuple[Any, float, float]:
    """``(result, wall seconds, CPU seconds)`` of one call of ``fn`` (see :func:`clock`)."""
    with clock(device) as times:
        result = fn()
    return result, times["wall_s"], times["cpu_s"]


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds one call of ``fn`` takes, with synchronisation before and after on CUDA."""
    return timed(fn, device)[1]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ----------------------------------------------------------------------------------------------- peak
def measure_peak(device: torch.device, n: int | None = None, warmup: int = 3, repeat: int = 10,
                 warmup_s: float = 2.0) -> dict[str, Any]:
    """GFLOP/s of an ``n x n`` by ``n x n`` matmul (``2 n^3`` FLOP), median of ``repeat`` runs after warm-up.

    Warm-up is at least ``warmup`` runs and at least ``warmup_s`` seconds: on the 2-core VM these figures were
    taken on, the first second of matmuls ran at about half speed. CPU: float32 on all of torch's threads,
    n = 2048 by default. CUDA: bfloat16 (the precision the models run in under autocast), n = 8192 by
    default, since a 2048 matmul is too short to fill a modern GPU.
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    start, runs = time.perf_counter(), 0
    while runs < warmup or time.perf_counter() - start < warmup_s:
        time_call(lambda: torch.mm(a, b, out=out), device)
        runs += 1
    times = [time_call(lambda: torch.mm(a, b, out=out), device) for _ in range(repeat)]
    seconds = median(times)
    return {"gflops": 2.0 * n ** 3 / seconds / 1e9, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "seconds": seconds, "repeat": repeat, "threads": torch.get_num_threads()}


def report_peak(reporter: Reporter, device: torch.device, quick: bool, figure: str = "peak") -> float:
    """Measure the matmul peak (small and short with ``quick``), emit it as ``figure``, return GFLOP/s.

    Scripts measure ``peak`` at the start (the MFU denominator) and ``peak_end`` after their timings: a gap
    between the two says the machine's speed drifted during the run (other load), and the figures with it.
    """
    peak = measure_peak(device, n=1024 if quick else None, warmup=1 if quick else 3, repeat=3 if quick else 10,
                        warmup_s=0.0 if quick else 2.0)
    reporter.emit(figure, peak["gflops"], "GFLOP/s", None, matmul_n=peak["n"], dtype=peak["dtype"],
                  threads=peak["threads"], repeat=peak["repeat"], median_s=peak["seconds"])
    return peak["gflops"]


# ----------------------------------------------------------------------------------------------- FLOP counting
def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """``2 * tokens * d_in * d_out``: a Linear layer applied to ``tokens`` rows (bias adds not counted)."""
    return 2 * tokens * d_in * d_out


def block_flops(tokens: int, dim: int, mlp_hidden: int) -> int:
    """FLOPs of one pre-norm transformer block on ``T = tokens`` tokens of width ``D = dim``, MLP width ``H``::

        2 * T * (3 D^2 + D^2 + D H + H D)   qkv, attention projection, fc1, fc2
      + 2 * 2 * T^2 * D                    Q K^T and A V, summed over heads (h heads of width D/h: h T^2 D/h)

    The number of heads does not enter. LayerNorm, softmax, GELU, biases and residual adds are not counted.
    """
    return linear_flops(tokens, dim, 4 * dim + 2 * mlp_hidden) + 4 * tokens * tokens * dim


def vit_flops(batch: int, num_patches: int, patch_pixels: int, dim: int, depth: int, mlp_hidden: int,
              tokens: int | None = None) -> int:
    """Forward FLOPs of a ViT encoder on ``batch`` images::

        batch * [ 2 * L * (p^2 C) * D  +  depth * block_flops(T, D, H) ]

    with ``L = num_patches`` patches of ``p^2 C = patch_pixels`` values embedded (the patch embedding runs on
    every patch, also before masking), and ``T = tokens`` tokens through the blocks (default ``L + 1``: all
    patches and CLS; an MAE encoder passes ``L_keep + 1``). The final LayerNorm is not counted.
    """
    tokens = num_patches + 1 if tokens is None else tokens
    return batch * (linear_flops(num_patches, patch_pixels, dim) + depth * block_flops(tokens, dim, mlp_hidden))


def encoder_flops(encoder: torch.nn.Module, batch: int, visible: int | None = None) -> int:
    """:func:`vit_flops` for a ``micromae.models.ViTEncoder`` (read off the module), ``visible`` patches kept
    (default: all)."""
    num_patches = encoder.num_patches
    tokens = (num_patches if visible is None else visible) + 1
    return vit_flops(batch, num_patches, encoder.patch_size ** 2 * encoder.in_chans, encoder.embed_dim,
                     encoder.depth, encoder.blocks[0].mlp.fc1.out_features, tokens)


def mae_flops(mae: torch.nn.Module, batch: int) -> int:
    """Forward FLOPs of a ``micromae.models.MaskedAutoencoder`` step at its ``mask_ratio``::

        encoder(visible: T_e = L_keep + 1 tokens)                        see vit_flops
      + 2 * T_e * D * D_d                                                decoder_embed (CLS and visible)
      + depth_d * block_flops(L + 1, D_d, H_d)                           decoder blocks on all tokens
      + 2 * (L + 1) * D_d * (p^2 C)                                      decoder_pred (CLS row dropped after)

    per image, with ``L_keep = int(L * (1 - mask_ratio))`` as in ``micromae.models.masking.num_kept``.
    Training (forward + backward) is counted as 3x this.
    """
    from micromae.models.masking import num_kept

    enc = mae.encoder
    length = enc.num_patches
    keep = num_kept(length, mae.mask_ratio)
    dec_dim = mae.decoder_embed.out_features
    dec_hidden = mae.decoder_blocks[0].mlp.fc1.out_features
    per_image = (linear_flops(keep + 1, enc.embed_dim, dec_dim)
                 + len(mae.decoder_blocks) * block_flops(length + 1, dec_dim, dec_hidden)
                 + linear_flops(length + 1, dec_dim, mae.decoder_pred.out_features))
    return encoder_flops(enc, batch, visible=keep) + batch * per_image


# ----------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """The ``model name`` of /proc/cpuinfo (Linux), else ``platform.processor()``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def busy_cpu_seconds() -> float | None:
    """CPU-seconds every process on the machine has used since boot (Linux ``/proc/stat``), else None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU-seconds this process and its finished children (data-loader workers) have used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """Average number of cores that *other* processes kept busy since construction: machine-wide busy time
    minus our own, per wall-clock second. Unlike the load average it does not count the benchmark itself;
    near 0 means the figures were taken on a quiet machine."""

    def __init__(self) -> None:
        self.wall, self.busy, self.own = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()

    def cores(self) -> float | None:
        busy = busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        wall = max(time.perf_counter() - self.wall, 1e-9)
        return max(0.0, (busy - self.busy) - (own_cpu_seconds() - self.own)) / wall


def environment(device: torch.device) -> dict[str, Any]:
    """Where a figure was measured: date, CPU, cores, torch threads, versions, device, 1-min load average
    (which includes the benchmark's own threads)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "device": device.type, "gpu": gpu, "load1": load1}


# ----------------------------------------------------------------------------------------------- output
class Reporter:
    """Prints one JSON line per figure and writes them all to ``<out>/<bench>.jsonl`` on :meth:`close`."""

    def __init__(self, bench: str, out_dir: Path, device: torch.device, quick: bool) -> None:
        self.bench, self.out_dir, self.device, self.quick = bench, Path(out_dir), device, quick
        self.lines: list[dict[str, Any]] = []
        self.other_load = OtherLoad()

    def emit(self, figure: str, value: float, unit: str, goal: float | None, **context: Any) -> dict[str, Any]:
        """Print and keep ``{"bench", "figure", "value", "unit", "goal", "met", **context, "quick", "env"}``;
        ``env["other_load"]`` is the cores other processes used on average since the script started."""
        env = {**environment(self.device), "other_load": self.other_load.cores()}
        record = {"bench": self.bench, "figure": figure, "value": float(value), "unit": unit, "goal": goal,
                  "met": None if goal is None else bool(value >= goal), **context, "quick": self.quick,
                  "env": env}
        print(json.dumps(record), flush=True)
        self.lines.append(record)
        return record

    def close(self) -> Path:
        """Write every emitted line to ``<out>/<bench>.jsonl`` (temp file + rename: never half-written)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.bench}.jsonl"
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{self.bench}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(json.dumps(line) + "\n" for line in self.lines)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        log(f"wrote {len(self.lines)} figures to {path}")
        return path
