"""Mask R-CNN fine-tuning resumes exactly: a run stopped after 2 steps and resumed ends with the same weights
as one that ran 4 steps straight (batches are seeded per step, RNG states travel in the checkpoint)."""

from __future__ import annotations

import pytest
import torch

from micromae.train.checkpoint import load_checkpoint
from micromae.train.maskrcnn import run_maskrcnn_finetune
from test_maskrcnn import squares_config, write_squares


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_stopped_and_resumed_run_equals_a_straight_run(tmp_path):
    ann = write_squares(tmp_path / "data", 4, seed=3)
    straight = run_maskrcnn_finetune(squares_config(ann, 4), tmp_path / "straight")
    first = run_maskrcnn_finetune(squares_config(ann, 4), tmp_path / "split", stop_after=2)
    assert first.step == 2
    resumed = run_maskrcnn_finetune(squares_config(ann, 4), tmp_path / "split", resume="auto")
    assert resumed.step == 4
    a, b = load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, changed[:5]
    # and training did move the weights (the comparison is not vacuous)
    start = run_maskrcnn_finetune(squares_config(ann, 1), tmp_path / "one")
    assert any(not torch.equal(a[k], v) for k, v in load_checkpoint(start.checkpoint)["model"].items())


@pytest.mark.slow
def test_two_process_ddp_maskrcnn(tmp_path):
    """Mask R-CNN under torchrun with 2 processes (gloo on CPU): DDP finds a gradient for every parameter."""
    import os
    import subprocess
    import sys

    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "micromae", "finetune", "maskrcnn_tiny", "data.n_images=2", "data.synthetic_shape=[128,128]",
           "model.depth=1", "train.steps=2", "train.batch_size=2", "train.figure_every=0", "train.device=cpu",
           "--run-dir", str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
