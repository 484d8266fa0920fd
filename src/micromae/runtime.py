"""Small run-time helpers every layer may use: console messages, device choice, eval mode, DDP unwrapping.

This module sits just above :mod:`micromae.errors` in the import order, so ``io``, ``data``, ``models``,
``train``, ``segment`` and ``evaluate`` all take these from here instead of from each other.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from micromae.errors import input_error


def say(msg: str) -> None:
    """A one-line status message for the person at the terminal (stderr, so stdout stays parseable)."""
    print(f"micromae: {msg}", file=sys.stderr, flush=True)


def resolve_device(spec: str = "auto", local_rank: int = 0, option: str = "train.device") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU. Explicit ``cuda`` / ``cuda:N`` / ``mps`` / ``cpu`` are checked;
    ``option`` is what the user set it with (``train.device`` in a config, ``--device`` on a verb), named in
    the error."""
    fix = f"Use {option}=auto or cpu" if "." in option else f"Use {option} auto or cpu"
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise input_error(option, "auto, cpu, cuda, cuda:N or mps", repr(spec), f"Fix {option}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise input_error(option, "a machine with CUDA", "no CUDA device", fix)
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise input_error(option, f"a CUDA device index below {torch.cuda.device_count()}", repr(spec), fix)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise input_error(option, "a machine with MPS", "no MPS device", fix)
    return device


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode (no dropout, no stochastic depth) and restore its mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper; the model itself otherwise."""
    return module.module if hasattr(module, "module") else module
