"""Shared test settings: one torch thread per xdist worker (2 workers on 2 cores), seeded randomness, and the
fixtures several test files use."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """Tiny models and detector ops: one CPU thread is far faster than two fighting over a shared 2-core machine
    (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cells(tmp_path_factory):
    """A tiny classification set (read only): the ``cells/<type>/*.tif`` crops of two synthetic 256×256
    multiplex images, 32-px crops."""
    from micromae.data.synthetic_mif import write_mif_dataset

    out = tmp_path_factory.mktemp("mif") / "synth"
    write_mif_dataset(out, n_images=2, shape=(256, 256), crop_size=32)
    return out / "cells"
