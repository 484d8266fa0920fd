"""CLI verbs: info, data synth-em, config-keys, demo, --help, and the error exit path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from micromae.cli import build_parser, main
from micromae.errors import MicromaeInputError
from micromae.data.synthetic_em import make_em_volume


def test_info_lists_versions_presets_and_samples(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("micromae", "torch", "timm", "device", "maester_tiny", "nuclei"):
        assert needle in out


def test_synth_em_writes_the_generators_volume(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth-em", "--out", str(out), "--shape", "12", "40", "48", "--seed", "3"]) == 0
    image = tifffile.imread(out / "image.tif")
    labels = tifffile.imread(out / "labels.tif")
    ref = make_em_volume(shape=(12, 40, 48), seed=3)
    assert np.array_equal(image, ref.image) and np.array_equal(labels, ref.labels)
    assert json.loads((out / "classes.json").read_text())  # class names are written next to the labels


def test_synth_em_betaseg_layout_loads_with_the_betaseg_loader(tmp_path):
    from micromae.data.betaseg import list_betaseg_cells, load_betaseg_cell

    out = tmp_path / "bs"
    assert main(["data", "synth-em", "--out", str(out), "--shape", "12", "40", "48", "--betaseg-layout"]) == 0
    (cell,) = list_betaseg_cells(out)
    loaded = load_betaseg_cell(out, cell)
    assert np.array_equal(loaded.image, make_em_volume(shape=(12, 40, 48), seed=0).image)


def test_synth_em_rejects_bad_shape(capsys):
    assert main(["data", "synth-em", "--out", "x", "--shape", "0", "40", "48"]) == 2
    assert "expected" in capsys.readouterr().err


def test_config_keys_prints_defaults(capsys):
    assert main(["config-keys"]) == 0
    out = capsys.readouterr().out
    assert "model.pos_embed_weight = 0.08" in out and "train.steps = " in out


def _verbs(parser, prefix=()):
    """Every verb of ``parser`` as an argv prefix, sub-parsers of sub-parsers included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [*prefix, name]
                yield from _verbs(sub, (*prefix, name))


def test_help_walk_finds_every_verb():
    verbs = {" ".join(v) for v in _verbs(build_parser())}
    assert {"info", "pretrain", "finetune", "segment", "cluster", "embed", "probe", "config-keys",
            "data synth-em", "evaluate segmentation", "evaluate classification", "evaluate instances"} <= verbs


@pytest.mark.parametrize("verb", list(_verbs(build_parser())), ids=" ".join)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*verb, "--help"])
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("before, after", [
    (["pretrain", "maester_tiny", "train.steps=100", "model.depth=2", "--run-dir", "runs/x", "--stop-after", "3"],
     ["pretrain", "maester_tiny", "--run-dir", "runs/x", "train.steps=100", "--stop-after", "3", "model.depth=2"]),
    (["finetune", "segmenter_tiny", "train.steps=2", "--run-dir", "r", "--resume", "auto"],
     ["finetune", "--run-dir", "r", "segmenter_tiny", "--resume", "auto", "train.steps=2"]),
    (["evaluate", "classification", "train.epochs=5", "train.batch_size=4", "--checkpoint", "random", "--data",
      "cells", "--out", "o"],
     ["evaluate", "classification", "--checkpoint", "random", "train.epochs=5", "--data", "cells", "--out", "o",
      "train.batch_size=4"]),
])
def test_overrides_and_options_mix_in_any_order(before, after):
    from micromae.cli import parse_args

    parser = build_parser()
    first, second = parse_args(parser, before), parse_args(parser, after)
    assert vars(first) == vars(second)
    assert first.overrides == [w for w in before if "=" in w]


def test_words_left_over_keep_argparses_message(capsys):
    from micromae.cli import parse_args

    for argv in (["pretrain", "maester_tiny", "--run-dir", "x", "--bogus"], ["info", "train.steps=3"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(build_parser(), argv)
        assert exit_.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("task, needle", [("segmentation", "labels.partial = "), ("classification", "init = "),
                                          ("instances", "task = 'instances'"), ("pretrain", "dama.K = ")])
def test_config_keys_of_every_task(task, needle, capsys):
    assert main(["config-keys", task]) == 0
    assert needle in capsys.readouterr().out


def test_embed_writes_pixel_embeddings(tiny_run, tmp_path, capsys):
    ckpt, image = tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data" / "image.tif"
    out = tmp_path / "emb.npy"
    assert main(["embed", "--checkpoint", str(ckpt), "--input", str(image), "--output", str(out),
                 "--slices", "0,2", "--mode", "fast", "--device", "cpu"]) == 0
    emb = np.load(out)
    assert emb.shape == (16, 2, 40, 44) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert "wrote pixel embeddings" in capsys.readouterr().out


def test_cluster_saves_centres_of_the_checkpoints_embeddings(tiny_run, tmp_path, capsys):
    import hashlib

    from micromae.segment.cluster import ClusterModel

    ckpt, image = tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data" / "image.tif"
    out = tmp_path / "centres.npz"
    assert main(["cluster", "--checkpoint", str(ckpt), "--input", str(image), "--output", str(out),
                 "--k", "3", "--samples", "400", "--mode", "fast", "--device", "cpu"]) == 0
    assert "wrote 3 centres" in capsys.readouterr().out
    model = ClusterModel.load(out)
    assert model.centers.shape == (3, 16) and np.isfinite(model.centers).all()
    assert model.meta["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert model.meta["mode"] == "fast"


def test_missing_preset_names_the_presets(capsys):
    assert main(["pretrain", "no_such_preset"]) == 2
    assert "maester_tiny" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path):
    from micromae.demo import run_demo

    small = ["data.synthetic_shape=[10,64,64]", "data.planes=[YX]", "model.embed_dim=32", "model.depth=2",
             "train.batch_size=16"]
    outputs = run_demo(tmp_path / "demo", steps=20, samples=2000, sweep=(4,), overrides=small,
                       heldout_shape=(8, 48, 48))
    for key in ("loss_curve", "reconstruction", "checkpoint", "report", "metrics", "pretraining"):
        assert outputs[key].is_file(), key
    assert (tmp_path / "demo" / "data" / "image.tif").is_file()
    metrics = json.loads(outputs["metrics"].read_text())
    assert metrics["masked"] and metrics["n_clusters"] == 6 and [r["k"] for r in metrics["k_sweep"]] == [4, 6]
    assert (tmp_path / "demo" / "report" / "overlays.png").is_file()
    report = outputs["report"].read_text()
    assert "## What pre-training bought" in report and "random-init encoder" in report and "gain over" in report
    again = run_demo(tmp_path / "demo", steps=20, samples=2000, sweep=(4,), overrides=small,
                     heldout_shape=(8, 48, 48))  # resumes: no new work
    assert again["report"].read_text().count("## What pre-training bought") == 1
    assert again["checkpoint"].stat().st_mtime == outputs["checkpoint"].stat().st_mtime


def test_cli_finetune_segmenter_runs(tmp_path):
    run = tmp_path / "ft"
    rc = main(["finetune", "segmenter_tiny", "model.img_size=20", "model.patch_size=5", "model.embed_dim=16",
               "model.depth=1",
               "model.decoder_embed_dim=16", "model.decoder_depth=1", "data.synthetic_shape=[12,40,40]",
               "train.steps=2", "train.batch_size=4", "train.figure_every=2", "train.device=cpu",
               "--run-dir", str(run)])
    assert rc == 0
    assert (run / "checkpoints" / "last.pt").is_file()
    assert list((run / "figures").glob("segmentation_step*.png"))


def test_betaseg_labels_feed_the_evaluation(tmp_path):
    bs, out = tmp_path / "bs", tmp_path / "labels"
    assert main(["data", "synth-em", "--out", str(bs), "--shape", "8", "40", "40", "--betaseg-layout"]) == 0
    assert main(["data", "betaseg-labels", "--root", str(bs), "--cell", "synthetic_c1", "--out", str(out)]) == 0
    labels = tifffile.imread(out / "labels.tif")
    names = json.loads((out / "classes.json").read_text())["class_names"]
    ref = make_em_volume(shape=(8, 40, 40), seed=0)
    assert np.array_equal(labels == names.index("nucleus"), ref.labels == 3)
    assert np.array_equal(tifffile.imread(out / "cell_mask.tif") > 0, ref.cell_mask)


def test_finetune_dispatches_on_task_and_rejects_unknown_tasks(tmp_path):
    from micromae.config import finetune_task

    good, bad, plain = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    good.write_text("task: classification\nname: x\n")
    bad.write_text("task: detection\n")
    plain.write_text("name: seg\nhead: segmenter\n")
    assert finetune_task(good) == "classification"
    assert finetune_task(plain) == "segmentation"
    with pytest.raises(MicromaeInputError, match="instances"):
        finetune_task(bad)
