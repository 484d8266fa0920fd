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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A folder with ``run/`` (a 2-step pre-training of a tiny MAE: 20-px FOV, 5-px tokens, 16 wide, one block;
    ``run/checkpoints/last.pt``) and ``data/`` (a synthetic EM volume 8 x 40 x 44: ``image.tif``, ``labels.tif``,
    ``cell_mask.tif``). Tests may write beside them, never into them."""
    from micromae.config import PretrainConfig, apply_overrides
    from micromae.data.synthetic_em import make_em_volume, write_em_volume
    from micromae.train.pretrain import run_pretrain

    root = tmp_path_factory.mktemp("tiny_run")
    cfg = apply_overrides(PretrainConfig(), [
        "model.img_size=20", "model.patch_size=5", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
        "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "data.synthetic_shape=[12,40,40]", "train.batch_size=8", "train.steps=2", "train.figure_every=0",
        "train.device=cpu"])
    run_pretrain(cfg, root / "run")
    write_em_volume(root / "data", make_em_volume(shape=(8, 40, 44), seed=5))
    return root
