"""Run logging: ``log.jsonl`` (one JSON object per logged step) and tensorboard scalars.

Console messages are :func:`micromae.runtime.say`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RunLogger:
    """Appends metrics to ``run_dir/log.jsonl`` and to tensorboard (``run_dir/tb``) on the main process only."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is a declared dependency; stay usable without it
                self._tb = None
        self._t0 = time.time()

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._t0, 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``log.jsonl`` (an empty list when there is none)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
