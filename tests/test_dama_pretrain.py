"""DAMA, MAE and data2vec pre-training on multi-channel images through the one trainer; encoder export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from micromae.cli import main as cli_main
from micromae.config import PretrainConfig, apply_overrides
from micromae.errors import MicromaeInputError
from micromae.models.pretrained import load_encoder
from micromae.train.checkpoint import load_checkpoint
from micromae.train.export import export_encoder
from micromae.train.log import read_log
from micromae.train.pretrain import run_pretrain

TINY = ["objective=dama", "model.in_chans=7", "model.img_size=16", "model.patch_size=4", "model.embed_dim=16",
        "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
        "model.decoder_num_heads=2", "model.mask_ratio=0.75", "model.norm_pix_loss=true",
        "data.source=synthetic_mif", "data.synthetic_shape=[96,96]", "data.n_images=4", "dama.K=2",
        "train.batch_size=2", "train.log_every=1", "train.figure_every=0", "train.device=cpu"]


def cfg(*extra: str) -> PretrainConfig:
    return apply_overrides(PretrainConfig(), TINY + list(extra))


@pytest.mark.parametrize("extra, terms", [
    (["dama.config=student1-student2"], {"loss_p1", "loss_p2", "loss_f"}),
    (["dama.config=ema"], {"loss_p1", "loss_p2", "loss_f", "ema_momentum"}),
    (["dama.config=shared", "dama.masking=random_overlap"], {"loss_p1", "loss_p2", "loss_f"}),
    (["objective=data2vec"], {"loss_f"}),
    (["objective=mae"], {"mask_ratio"}),
])
def test_every_objective_trains_in_the_same_trainer(tmp_path, extra, terms):
    result = run_pretrain(cfg("train.steps=2", *extra), tmp_path / "r")
    assert result.step == 2
    log = read_log(tmp_path / "r")
    assert terms <= set(log[-1]) and all(np.isfinite(r["loss"]) for r in log)
    assert (tmp_path / "r" / "figures" / "loss.png").read_bytes()[:4] == b"\x89PNG"  # loss curves per term
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    if "dama.config=student1-student2" in extra:
        assert any(k.startswith("branch2.encoder.") for k in state["model"])  # both branches are saved


def test_dama_resume_gives_the_same_weights(tmp_path):
    c = cfg("train.steps=4", "dama.config=ema", "train.ckpt_every=100")
    run_pretrain(c, tmp_path / "straight")
    run_pretrain(c, tmp_path / "split", stop_after=2)
    run_pretrain(c, tmp_path / "split", resume="auto")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_channel_count_must_match(tmp_path):
    with pytest.raises(MicromaeInputError, match="model.in_chans=7"):
        run_pretrain(cfg("model.in_chans=3", "train.steps=1"), tmp_path / "r")


def test_export_either_branch_loads_into_timm(tmp_path):
    run_pretrain(cfg("train.steps=1"), tmp_path / "r")
    ckpt = tmp_path / "r" / "checkpoints" / "last.pt"
    x = torch.rand(2, 7, 16, 16)
    outs = []
    for branch in (1, 2):
        path = export_encoder(ckpt, tmp_path / f"enc{branch}.safetensors", branch=branch)
        meta = json.loads(path.with_suffix(".json").read_text())
        vit = timm.models.vision_transformer.VisionTransformer(**meta["timm_kwargs"]).eval()
        from safetensors.torch import load_file

        vit.load_state_dict(load_file(str(path)))
        ours = load_encoder(path)[0].eval()
        enc = load_encoder(ckpt, branch=branch)[0].eval()
        with torch.no_grad():
            assert torch.allclose(vit.forward_features(x), enc.forward_features(x), atol=1e-5)
            assert torch.allclose(ours.forward_features(x), enc.forward_features(x), atol=1e-6)
        outs.append(enc.forward_features(x).detach())
    assert not torch.allclose(outs[0], outs[1])  # two students: two different encoders


def test_cli_synth_mif_and_export(tmp_path):
    out = tmp_path / "mif"
    assert cli_main(["data", "synth-mif", "--out", str(out), "--n-images", "2", "--shape", "96", "96"]) == 0
    assert (out / "annotations.json").is_file() and len(list((out / "images").glob("*.tif"))) == 2
    run_pretrain(cfg("train.steps=1", "data.source=images", f"data.root={out / 'images'}"), tmp_path / "r")
    assert cli_main(["export-encoder", "--checkpoint", str(tmp_path / "r" / "checkpoints" / "last.pt"),
                     "--output", str(tmp_path / "e.safetensors"), "--branch", "2"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["branch"] == 2


@pytest.mark.slow
def test_two_process_ddp_dama(tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
           "-m", "micromae", "pretrain", "dama_tiny", *TINY, "train.steps=2", "--run-dir", str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    assert len(list((run / "synthetic_mif" / "images").glob("*.tif"))) == 4  # written once, by rank 0
