"""Command-line verbs for cell classification: `micromae probe`, `micromae evaluate classification`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    """Add this module's verbs to the top-level (``sub``) and ``micromae evaluate`` sub-parsers."""
