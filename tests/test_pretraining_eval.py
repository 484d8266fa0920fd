"""`micromae evaluate pretraining`: a checkpoint against random-init encoders of its shape and hand-made features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from micromae.cli import main
from micromae.errors import MicromaeInputError
from micromae.evaluate.pretraining import (
    PretrainingEval,
    evaluate_pretraining,
    evaluation_pixels,
    handmade_features,
    n_handmade_channels,
    random_encoder_like,
    run_evaluate_pretraining,
)
from micromae.models.pretrained import encoder_fields, load_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(ks=(3,), n_random=2, planes=4, n_fit=2000, n_probe=1500, min_probe_pixels=50, ignore=0)


@pytest.fixture(scope="module")
def data(tiny_run):
    image = tifffile.imread(tiny_run / "data" / "image.tif").astype(np.float32) / 255.0
    labels = tifffile.imread(tiny_run / "data" / "labels.tif")
    encoder, _ = load_encoder(tiny_run / "run" / "checkpoints" / "last.pt")
    return encoder.eval(), image, labels


def test_random_encoder_has_the_shape_and_fresh_weights(data):
    encoder, _, _ = data
    before = torch.random.get_rng_state()
    a, b, a2 = random_encoder_like(encoder, 1), random_encoder_like(encoder, 2), random_encoder_like(encoder, 1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    assert encoder_fields(a) == encoder_fields(encoder)
    sd, sd_a, sd_b, sd_a2 = encoder.state_dict(), a.state_dict(), b.state_dict(), a2.state_dict()
    assert sd.keys() == sd_a.keys()
    assert all(sd[k].shape == sd_a[k].shape for k in sd)
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(sd[w], sd_a[w]) and not torch.equal(sd_a[w], sd_b[w])
    assert torch.equal(sd_a[w], sd_a2[w])  # one seed, one encoder


def test_same_pipeline_gives_zero_gain_to_a_random_encoder(data):
    """The checkpoint row and the control rows go through the same code on the same pixels: an encoder equal
    to the first control scores exactly what that control scores."""
    encoder, image, labels = data
    s = PretrainingEval(**{**SMALL, "n_random": 1, "handmade": False})
    twin = random_encoder_like(encoder, s.random_seed0)
    result = evaluate_pretraining(twin, image, labels, s, progress=False)
    assert result["gain"] == {"kmeans_k3": 0.0, "probe": 0.0}
    assert result["random"][0]["probe"] == result["pretrained"]["probe"]


def test_a_constant_encoder_loses_to_the_controls(data):
    """An encoder that outputs the same vector everywhere knows nothing: the probe falls to the majority class
    and the gain is negative, so the control measures what the features carry."""
    encoder, image, labels = data
    const = random_encoder_like(encoder, 7)
    with torch.no_grad():
        for p in const.parameters():
            p.zero_()
        const.pos_embed.zero_()
    s = PretrainingEval(**{**SMALL, "handmade": False})
    result = evaluate_pretraining(const, image, labels, s, progress=False)
    assert result["gain"]["probe"] < -0.05
    assert result["pretrained"]["probe"]["balanced_accuracy"] == pytest.approx(1 / len(result["pretrained"]["probe"]
                                                                                       ["dice"]), abs=1e-6)


def test_controls_are_reused_only_for_the_same_data(data):
    encoder, image, labels = data
    s = PretrainingEval(**SMALL)
    first = evaluate_pretraining(encoder, image, labels, s, progress=False)
    again = evaluate_pretraining(encoder, image, labels, s, progress=False, controls=first)
    assert again["random"] == first["random"] and again["gain"] == first["gain"]
    other = image.copy()
    other[0, 0, 0] = 1.0 - other[0, 0, 0]
    with pytest.raises(MicromaeInputError, match="controls"):
        evaluate_pretraining(encoder, other, labels, s, progress=False, controls=first)


@pytest.mark.parametrize("planes", [4, 1])
def test_probe_held_out_pixels_never_train(data, planes):
    _, image, labels = data
    s = PretrainingEval(**{**SMALL, "planes": planes})
    ref_planes = [labels[z].astype(np.int64) for z in ([0, 3, 5, 7] if planes == 4 else [2])]
    px = evaluation_pixels(ref_planes, None, s, [f"c{i}" for i in range(6)])
    train = set(zip(px["train"].plane.tolist(), px["train"].y.tolist(), px["train"].x.tolist()))
    test = set(zip(px["test"].plane.tolist(), px["test"].y.tolist(), px["test"].x.tolist()))
    assert train and test and not train & test
    if planes == 1:  # one image: left half trains, right half is held out
        assert px["train"].x.max() < labels.shape[2] // 2 <= px["test"].x.min()
    else:
        assert set(px["train"].plane.tolist()) == {0, 2} and set(px["test"].plane.tolist()) == {1, 3}
    assert (px["test"].cls != 0).all() and (px["train"].cls != 0).all()  # the ignore value is never a label


def test_handmade_stack_channels():
    plane = np.random.default_rng(0).random((32, 36)).astype(np.float32)
    feats = handmade_features(plane, 0.5, 8.0)
    assert feats.shape == (32, 36, n_handmade_channels(0.5, 8.0)) == (32, 36, 20)  # 5 scales x 4
    assert handmade_features(plane, 1.0, 4.0).shape[-1] == 12
    # the first channel is the finest Gaussian: it keeps most of the pixel noise, the coarsest does not
    assert np.corrcoef(feats[..., 0].ravel(), plane.ravel())[0, 1] > 0.8
    assert feats[..., 16].std() < feats[..., 0].std()


def test_bad_references_are_refused(data):
    encoder, image, labels = data
    s = PretrainingEval(**SMALL)
    with pytest.raises(MicromaeInputError, match="shape"):
        evaluate_pretraining(encoder, image, labels[:, :20], s, progress=False)
    with pytest.raises(MicromaeInputError, match="integer class labels"):
        evaluate_pretraining(encoder, image, image, s, progress=False)
    sparse = np.zeros_like(labels)
    sparse[:, :3, :3] = labels[:, :3, :3]
    with pytest.raises(MicromaeInputError, match="labelled pixels"):
        evaluate_pretraining(encoder, image, sparse, s, progress=False)
    missing = labels.copy()  # 8 planes: 0, 2, 4, 6 train the probe, 1, 3, 5, 7 are held out
    missing[0::2] = np.where(labels[0::2] == 3, 1, labels[0::2])  # no nucleus in the training planes
    assert (missing[1::2] == 3).any()
    s4 = PretrainingEval(**{**SMALL, "planes": 8})
    with pytest.raises(MicromaeInputError, match="missing from the training pixels"):
        evaluate_pretraining(encoder, image, missing, s4, progress=False)


def test_cli_writes_the_report_and_refuses_an_old_one(tiny_run, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["evaluate", "pretraining", str(tiny_run / "run" / "checkpoints" / "last.pt"),
            "--image", str(tiny_run / "data" / "image.tif"), "--reference", str(tiny_run / "data" / "labels.tif"),
            "--ignore", "0", "--k", "3", "4", "--random-encoders", "2", "--probe-pixels", "1500",
            "--fit-pixels", "2000", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["pretraining.json", "pretraining.md", "pretraining.png"]
    result = json.loads((out / "pretraining.json").read_text())
    assert set(result["gain"]) == {"kmeans_k3", "kmeans_k4", "probe"}
    assert len(result["random_summary"]["probe"]["values"]) == 2
    assert result["class_names"][3] == "nucleus"  # from classes.json beside the reference
    md = (out / "pretraining.md").read_text()
    assert "random-init encoder" in md and "gain over random init" in md
    assert (out / "pretraining.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "pretraining.json").read_bytes()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "pretraining.json").read_bytes() == before
    (out / "stale.txt").write_text("old")
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()  # replaced whole, never mixed
    assert not list(tmp_path.glob(".*partial*"))


def test_run_refuses_reference_of_another_shape(tiny_run, tmp_path):
    bad = tmp_path / "ref.tif"
    tifffile.imwrite(bad, np.arange(8 * 40 * 40).reshape(8, 40, 40).astype(np.uint8) % 6)
    with pytest.raises(MicromaeInputError, match="same size"):
        run_evaluate_pretraining(tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data" / "image.tif",
                                 bad, tmp_path / "out", PretrainingEval(**SMALL))
    assert not (tmp_path / "out").exists()


def test_random_init_checkpoint_runs_through_any_verb(tiny_run, tmp_path):
    from micromae.evaluate.pretraining import write_random_init_checkpoint

    src = tiny_run / "run" / "checkpoints" / "last.pt"
    path = write_random_init_checkpoint(src, 3, tmp_path / "random3.pt")
    enc, meta = load_encoder(path)
    trained, tmeta = load_encoder(src)
    assert meta.fields == tmeta.fields and meta.normalize == tmeta.normalize  # same shape, same scaling
    w = "blocks.0.attn.qkv.weight"
    assert torch.equal(enc.state_dict()[w], random_encoder_like(trained, 3).state_dict()[w])
    assert not torch.equal(enc.state_dict()[w], trained.state_dict()[w])
    out = tmp_path / "seg.zarr"
    assert main(["segment", "--checkpoint", str(path), "--input", str(tiny_run / "data" / "image.tif"),
                 "--output", str(out), "--k", "3", "--samples", "500", "--device", "cpu"]) == 0
