"""Command-line verbs for instance segmentation: `micromae evaluate instances`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    """Add this module's verbs to the top-level (``sub``) and ``micromae evaluate`` sub-parsers."""
