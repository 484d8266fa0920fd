"""Reliability: every verb refuses bad input with a clear message, exit 2 and nothing at its output path; the
CLI turns user-caused OSErrors into messages; segment resumes after a kill at every stage; the NaN guard and
resume keep to finite, intact checkpoints; read-only and full disks are reported before or while writing.

The bad-input table (``CASES``) runs each verb in process on tiny inputs (the session's ``tiny_run``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from micromae.cli import main as cli_main
from micromae.models.vit import ViTEncoder
from micromae.segment.cluster import ClusterModel
from micromae.segment.distributed import done_planes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------------
# inputs the bad-input cases point at, made once per session


@pytest.fixture(scope="session")
def bad(tiny_run, tmp_path_factory):
    """Paths of inputs that are wrong in one way each (read only), beside the tiny run's good ones."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = tiny_run / "run" / "checkpoints" / "last.pt"
    state = torch.load(good, weights_only=False)
    # a DAMA checkpoint of 7-channel images: two branches, no MAE decoder
    fields = {**state["config"]["model"], "in_chans": 7}
    enc = ViTEncoder(**{k: fields[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                                 "num_heads", "mlp_ratio", "qkv_bias", "pos_embed_weight")})
    weights = {f"{b}.encoder.{k}": v for b in ("branch1", "branch2") for k, v in enc.state_dict().items()}
    torch.save({"model": weights, "step": 3, "config": {"objective": "dama", "model": fields}}, root / "dama.pt")
    # the tiny run's checkpoint with one weight NaN
    nan_state = {**state, "model": {k: v.clone() for k, v in state["model"].items()}}
    next(v for k, v in nan_state["model"].items() if k.startswith("encoder.blocks")).view(-1)[0] = float("nan")
    torch.save(nan_state, root / "nan.pt")
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    (root / "a_file").write_text("in the way")
    (root / "file.zarr").write_text("a file named like a store")
    ClusterModel(np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)).save(root / "centres_k4.npz")
    np.save(root / "mask_small.npy", np.ones((2, 10, 10), np.uint8))
    (root / "existing.zarr").mkdir()
    (root / "existing.zarr" / "keep.txt").write_text("old")
    (root / "existing.npz").write_bytes(b"old")
    (root / "existing.safetensors").write_bytes(b"old")
    (root / "existing_dir").mkdir()
    (root / "existing_dir" / "keep.txt").write_text("old")
    (root / "not_json.json").write_text("{this is not json")
    (root / "coco.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "img.tif", "height": 16, "width": 16}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 16.0,
                         "bbox": [2, 2, 4, 4], "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}],
        "categories": [{"id": 1, "name": "cell"}]}))
    return root


@dataclass(frozen=True)
class Case:
    """argv (paths by key: ``{ckpt}``, ``{image}``, ``{mask}``, ``{labels}``, ``{bad}``, ``{out}``), the exit
    code, text the message must hold (and must not), and whether ``{out}`` pre-exists (then it must be left
    as it was) or must still not exist."""

    argv: str
    needles: tuple[str, ...]
    code: int = 2
    absent: tuple[str, ...] = ()
    keeps: str | None = None  # a pre-existing output, relative to {bad}, that must be left untouched


SEG = "segment --checkpoint {ckpt} --input {image} --device cpu --samples 300 --output {out}/seg.zarr "
CLU = "cluster --checkpoint {ckpt} --input {image} --device cpu --samples 300 "
EMB = "embed --checkpoint {ckpt} --input {image} --device cpu "
PRE = ("pretrain maester_tiny model.img_size=20 model.patch_size=5 model.embed_dim=16 model.depth=1 "
       "model.num_heads=2 model.decoder_embed_dim=16 model.decoder_depth=1 model.decoder_num_heads=2 "
       "data.synthetic_shape=[12,40,40] train.batch_size=4 train.figure_every=0 train.device=cpu "
       "--run-dir {out}/run ")

CASES: dict[str, Case] = {
    # segment
    "segment batch size -1": Case(SEG + "--batch-size -1", ("--batch-size", "at least 0")),  # 0 is auto
    "segment k 1": Case(SEG + "--k 1", ("--k", "at least 2")),
    "segment k above the pixels": Case(SEG + "--k 400", ("--k", "sampled pixels (300)")),
    "segment descending sweep": Case(SEG + "--sweep 10..4", ("--sweep", "ascending")),
    "segment sweep k 1": Case(SEG + "--sweep 1..3", ("--sweep", "at least 2")),
    "segment samples 0": Case(SEG + "--samples 0", ("--samples", "at least 1"), absent=("mask",)),
    "segment pca -1": Case(SEG + "--pca -1", ("--pca",)),
    "segment pca above width": Case(SEG + "--pca 99", ("--pca", "encoder's width")),
    "segment tif output": Case("segment --checkpoint {ckpt} --input {image} --device cpu --output {out}/x.tif",
                               (".zarr", "x.tif")),
    "segment existing output": Case("segment --checkpoint {ckpt} --input {image} --device cpu "
                                    "--output {bad}/existing.zarr", ("an existing", "--overwrite"),
                                    keeps="existing.zarr"),
    "segment output below a file": Case("segment --checkpoint {ckpt} --input {image} --device cpu "
                                        "--output {bad}/a_file/seg.zarr", ("is a file, not a folder",)),
    "segment DAMA checkpoint": Case(SEG.replace("{ckpt}", "{bad}/dama.pt"),
                                    ("7 input channels", "dama", "single-channel"), absent=("img_size", "resize")),
    "segment NaN checkpoint": Case(SEG.replace("{ckpt}", "{bad}/nan.pt"), ("NaN or infinite", "lower train.lr")),
    "segment garbage checkpoint": Case(SEG.replace("{ckpt}", "{bad}/garbage.pt"), ("unreadable",)),
    "segment missing checkpoint": Case(SEG.replace("{ckpt}", "{bad}/none.pt"), ("no such file",)),
    "segment device cuda:99": Case(SEG.replace("--device cpu", "--device cuda:99"), ("--device",),
                                   absent=("train.device",)),
    "segment centres with another --k": Case("segment --checkpoint {ckpt} --input {image} --device cpu "
                                             "--centres {bad}/centres_k4.npz --k 3 --output {out}/seg.zarr",
                                             ("--k", "(4)")),
    "segment centres with a sweep": Case("segment --checkpoint {ckpt} --input {image} --device cpu "
                                         "--centres {bad}/centres_k4.npz --sweep 2..3 --output {out}/seg.zarr",
                                         ("--sweep", "--centres")),
    "segment zarr that is a file": Case(SEG.replace("{image}", "{bad}/file.zarr"), ("folder", "a file"),
                                        absent=("extension",)),
    "segment missing input": Case(SEG.replace("{image}", "{bad}/none.tif"), ("nothing at that path",)),
    "segment mask of another shape": Case(SEG + "--mask {bad}/mask_small.npy", ("--mask", "shape")),
    "segment bad axis": Case(SEG + "--axis W", ("slicing axis",)),
    "segment central tokens 3": Case(SEG + "--central-tokens 3", ("central_tokens",)),
    # cluster
    "cluster samples 0": Case(CLU + "--output {out}/c.npz --samples 0", ("--samples", "at least 1"),
                              absent=("mask",)),
    "cluster k 1": Case(CLU + "--output {out}/c.npz --k 1", ("--k", "at least 2")),
    "cluster existing output": Case(CLU + "--output {bad}/existing.npz", ("an existing", "--overwrite"),
                                    keeps="existing.npz"),
    "cluster txt output": Case(CLU + "--output {out}/c.txt", (".npz",)),
    "cluster DAMA checkpoint": Case(CLU.replace("{ckpt}", "{bad}/dama.pt") + "--output {out}/c.npz",
                                    ("7 input channels",)),
    # embed
    "embed slices x": Case(EMB + "--output {out}/e.npy --slices x", ("--slices",), absent=("--sweep",)),
    "embed slice out of range": Case(EMB + "--output {out}/e.npy --slices 5..99", ("--slices", "0..7")),
    "embed png output": Case(EMB + "--output {out}/e.png", (".npy",)),
    "embed existing output": Case(EMB + "--output {bad}/existing.zarr", ("an existing",), keeps="existing.zarr"),
    "embed batch size -1": Case(EMB + "--output {out}/e.npy --batch-size -1", ("--batch-size",)),
    # pretrain
    "pretrain steps 0": Case(PRE + "train.steps=0", ("train.steps", "at least 1")),
    "pretrain steps -5": Case(PRE + "train.steps=-5", ("train.steps",)),
    "pretrain batch size 0": Case(PRE + "train.batch_size=0", ("train.batch_size",)),
    "pretrain stop-after -1": Case(PRE + "train.steps=2 --stop-after -1", ("--stop-after",)),
    "pretrain run-dir is a file": Case(PRE.replace("{out}/run", "{bad}/a_file") + "train.steps=2",
                                       ("--run-dir", "a file")),
    "pretrain resume DAMA checkpoint": Case(PRE + "train.steps=2 --resume {bad}/dama.pt",
                                            ("--resume", "does not fit", "dama"), absent=("Missing key",)),
    "pretrain resume NaN checkpoint": Case(PRE + "train.steps=2 --resume {bad}/nan.pt", ("--resume", "NaN")),
    "pretrain resume missing file": Case(PRE + "train.steps=2 --resume {bad}/none.pt", ("--resume",)),
    "pretrain unknown key": Case(PRE + "train.stepz=2", ("train.stepz",)),
    # finetune
    "finetune stop-after 0": Case("finetune segmenter_tiny --run-dir {out}/run --stop-after 0", ("--stop-after",)),
    # data
    "synth-em seed -1": Case("data synth-em --out {out}/s --shape 4 16 16 --seed -1", ("--seed", "at least 0")),
    "synth-em existing out": Case("data synth-em --out {bad}/existing_dir --shape 4 16 16",
                                  ("an existing", "--overwrite"), keeps="existing_dir"),
    "synth-em out is a file": Case("data synth-em --out {bad}/a_file --shape 4 16 16 --overwrite",
                                   ("a folder", "a file")),
    "synth-em zero shape": Case("data synth-em --out {out}/s --shape 0 16 16", ("--shape",)),
    "synth-mif seed -1": Case("data synth-mif --out {out}/m --seed -1", ("--seed",)),
    "synth-mif n-images 0": Case("data synth-mif --out {out}/m --n-images 0", ("--n-images",)),
    "synth-mif existing out": Case("data synth-mif --out {bad}/existing_dir", ("an existing",), keeps="existing_dir"),
    "betaseg-labels existing out": Case("data betaseg-labels --root {bad} --cell c --out {bad}/existing_dir",
                                        ("an existing",), keeps="existing_dir"),
    # evaluate
    "evaluate segmentation existing out": Case("evaluate segmentation --pred {labels} --reference {labels} "
                                               "--out {bad}/existing_dir", ("an existing", "--overwrite"),
                                               keeps="existing_dir"),
    "evaluate segmentation image as reference": Case("evaluate segmentation --pred {labels} --reference {image} "
                                                     "--out {out}/r", ("--reference", "not the image")),
    "evaluate segmentation checkpoint as reference": Case("evaluate segmentation --pred {labels} --reference "
                                                          "{ckpt} --out {out}/r", ("extension",)),
    "evaluate instances predictions not JSON": Case("evaluate instances --coco {bad}/coco.json --predictions "
                                                    "{bad}/not_json.json --out {out}/e", ("not JSON",)),
    "evaluate instances max-dets 0": Case("evaluate instances --coco {bad}/coco.json --predictions "
                                          "{bad}/not_json.json --max-dets 0 --out {out}/e", ("--max-dets",)),
    "evaluate instances existing out": Case("evaluate instances --coco {bad}/coco.json --predictions "
                                            "{bad}/not_json.json --out {bad}/existing_dir", ("an existing",),
                                            keeps="existing_dir"),
    # probe
    "probe existing out": Case("probe --checkpoint random --data {bad} --out {bad}/existing_dir",
                               ("an existing", "--overwrite"), keeps="existing_dir"),
    "probe folds 0": Case("probe --checkpoint random --data {bad} --folds 0 --out {out}/p", ("--folds",)),
    "probe test-size 1.5": Case("probe --checkpoint random --data {bad} --test-size 1.5 --out {out}/p",
                                ("--test-size",)),
    # export
    "export-encoder pt output": Case("export-encoder --checkpoint {ckpt} --output {out}/enc.pt", (".safetensors",)),
    "export-encoder existing output": Case("export-encoder --checkpoint {ckpt} --output "
                                           "{bad}/existing.safetensors", ("an existing", "--overwrite"),
                                           keeps="existing.safetensors"),
}


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_cleanly(name, tiny_run, bad, tmp_path, capsys):
    case = CASES[name]
    data = tiny_run / "data"
    paths = {"ckpt": tiny_run / "run" / "checkpoints" / "last.pt", "image": data / "image.tif",
             "mask": data / "cell_mask.tif", "labels": data / "labels.tif", "bad": bad, "out": tmp_path / "out"}
    argv = [word.format(**paths) for word in case.argv.split()]
    before = _snapshot(bad / case.keeps) if case.keeps else None
    assert cli_main(argv) == case.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "micromae: error:" in err
    for needle in case.needles:
        assert needle in err, (needle, err)
    for needle in case.absent:
        assert needle not in err, (needle, err)
    assert not paths["out"].exists() or not any(paths["out"].iterdir()), sorted(paths["out"].rglob("*"))
    if case.keeps:
        assert _snapshot(bad / case.keeps) == before
    assert not list(bad.glob(".*.partial.*")) and not list(bad.glob("*.partial"))


def test_the_table_covers_every_writing_verb():
    verbs = {" ".join(c.argv.split()[:2]) if c.argv.startswith(("data", "evaluate")) else c.argv.split()[0]
             for c in CASES.values()}
    assert {"segment", "cluster", "embed", "pretrain", "finetune", "data synth-em", "data synth-mif",
            "data betaseg-labels", "evaluate segmentation", "evaluate instances", "export-encoder", "probe"} <= verbs
    assert len(CASES) >= 50


# ----------------------------------------------------------------------------------------------------------
# the one place in the CLI that turns OSErrors into messages


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
    (errno.ENOTDIR, "not a folder"), (errno.EISDIR, "a folder where a file"),
])
def test_user_caused_oserrors_become_messages(code, words, monkeypatch, capsys):
    import micromae.cli as cli

    def fail(args):
        raise OSError(code, os.strerror(code), "/some/where/out.zarr")

    monkeypatch.setattr(cli, "cmd_config_keys", fail)
    assert cli_main(["config-keys"]) == 2
    err = capsys.readouterr().err
    assert words in err and "/some/where/out.zarr" in err and errno.errorcode[code] in err


def test_internal_errors_keep_their_traceback(monkeypatch):
    import micromae.cli as cli

    def fail(args):
        raise OSError("something internal")  # no errno: not the user's doing

    monkeypatch.setattr(cli, "cmd_config_keys", fail)
    with pytest.raises(OSError, match="something internal"):
        cli_main(["config-keys"])
    monkeypatch.setattr(cli, "cmd_config_keys", lambda args: 1 // 0)
    with pytest.raises(ZeroDivisionError):
        cli_main(["config-keys"])


# ----------------------------------------------------------------------------------------------------------
# read-only and full disks


@contextmanager
def _tmpfs(where: Path, size: str, read_only: bool = False):
    """A small tmpfs mounted at ``where``, or a skip saying why there is none."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount: {done.stderr.strip() or done.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@contextmanager
def _read_only_folder(where: Path):
    """A folder no one can write to: chmod for a normal user; for root (whom chmod does not stop) a read-only
    tmpfs, or a skip where mounting is not allowed."""
    if os.geteuid() != 0:
        where.mkdir(parents=True)
        where.chmod(0o555)
        try:
            yield where
        finally:
            where.chmod(0o755)
        return
    with _tmpfs(where, "1m", read_only=True) as mounted:
        yield mounted


RO_VERBS = {
    "segment": "segment --checkpoint {ckpt} --input {image} --device cpu --output {ro}/seg.zarr",
    "cluster": "cluster --checkpoint {ckpt} --input {image} --device cpu --output {ro}/c.npz",
    "embed": "embed --checkpoint {ckpt} --input {image} --device cpu --output {ro}/e.npy",
    "pretrain": PRE.replace("{out}/run", "{ro}/run") + "train.steps=2",
    "synth-em": "data synth-em --out {ro}/s --shape 4 16 16",
    "evaluate segmentation": "evaluate segmentation --pred {labels} --reference {labels} --out {ro}/r",
    "export-encoder": "export-encoder --checkpoint {ckpt} --output {ro}/enc.safetensors",
}


def test_read_only_folder_is_refused_before_any_work(tiny_run, tmp_path, capsys):
    data = tiny_run / "data"
    with _read_only_folder(tmp_path / "ro") as ro:
        for verb, argv in RO_VERBS.items():
            words = argv.format(ckpt=tiny_run / "run" / "checkpoints" / "last.pt", image=data / "image.tif",
                                labels=data / "labels.tif", ro=ro).split()
            assert cli_main(words) == 2, verb
            err = capsys.readouterr().err
            assert "can write to" in err and str(ro) in err and "Traceback" not in err, (verb, err)
            assert not any(ro.iterdir()), verb


def _fill(folder: Path, leave: int) -> None:
    """Fill the disk holding ``folder`` up to ``leave`` free bytes."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler.bin", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_full_disk_pretrain_refused_up_front(tmp_path, capsys):
    with _tmpfs(tmp_path / "full", "1m") as disk:
        _fill(disk, 64 << 10)
        assert cli_main((PRE.replace("{out}/run", str(disk / "run")) + "train.steps=1").split()) == 2
        err = capsys.readouterr().err
        assert "free disk space" in err and "--run-dir" in err and "Traceback" not in err
        assert not (disk / "run").exists()


def test_full_disk_pretrain_checkpoint_is_reported(tiny_run, tmp_path, capsys, monkeypatch):
    """Checkpoints larger than the space left: torch's writer fails ("unexpected pos"); the user reads that the
    disk is full, no temporary file is left, and what checkpoint was written before the disk filled is whole."""
    import micromae.train.engine as engine
    from micromae.train.checkpoint import find_resume_checkpoint, load_checkpoint

    monkeypatch.setattr(engine, "check_free_space", lambda *a, **k: None)  # the up-front estimate bypassed

    with _tmpfs(tmp_path / "full", "160k") as disk:
        argv = (PRE.replace("{out}/run", str(disk / "run")) + "train.steps=1").split()
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "disk is full" in err and "ENOSPC" in err and "Traceback" not in err
        assert not list((disk / "run" / "checkpoints").glob(".*partial*"))
        for path in (disk / "run" / "checkpoints").glob("*.pt"):  # a step file may fit where last.pt did not
            assert load_checkpoint(path)["step"] == 1
            assert find_resume_checkpoint(disk / "run") == path


def test_full_disk_segment_refused_up_front(tiny_run, tmp_path, capsys):
    data = tiny_run / "data"
    with _tmpfs(tmp_path / "full", "1m") as disk:
        _fill(disk, 8 << 10)
        argv = ["segment", "--checkpoint", str(tiny_run / "run" / "checkpoints" / "last.pt"), "--input",
                str(data / "image.tif"), "--device", "cpu", "--samples", "300", "--output", str(disk / "seg.zarr")]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "free disk space" in err and "Traceback" not in err
        assert not (disk / "seg.zarr").exists() and not (disk / "seg.zarr.partial").exists()


def test_full_disk_while_segment_writes_leaves_no_output(tiny_run, tmp_path, capsys, monkeypatch):
    """The disk fills while labels are written (the up-front estimate bypassed): exit 2, the disk named, and
    no final output."""
    import micromae.segment.pipeline as pipeline

    monkeypatch.setattr(pipeline, "check_free_space", lambda *a, **k: None)
    data = tiny_run / "data"
    with _tmpfs(tmp_path / "full", "1m") as disk:
        _fill(disk, 12 << 10)
        argv = ["segment", "--checkpoint", str(tiny_run / "run" / "checkpoints" / "last.pt"), "--input",
                str(data / "image.tif"), "--device", "cpu", "--samples", "300", "--pca", "8",
                "--output", str(disk / "seg.zarr")]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "disk is full" in err and "Traceback" not in err
        assert not (disk / "seg.zarr").exists()


# ----------------------------------------------------------------------------------------------------------
# kill -9 of segment at each stage, then the same command again


KILLER = """
import os, pathlib, signal, sys
import torch
torch.set_num_threads(1)
stage, when = sys.argv[1], int(sys.argv[2])
calls = [0]
def count_then_die(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= when:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapped
import micromae.segment.cluster as cluster, micromae.segment.fit as fit, micromae.segment.volume as volume
if stage == "sampling":
    fit.encode_windows = count_then_die(fit.encode_windows)
elif stage == "planes":
    volume.embed_region = count_then_die(volume.embed_region)
elif stage == "after the last plane":
    cluster.ClusterModel.save = count_then_die(cluster.ClusterModel.save)
elif stage == "before the rename":
    real = pathlib.Path.rename
    def rename(self, target):
        if str(target).endswith("seg.zarr"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, target)
    pathlib.Path.rename = rename
from micromae.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_ref") / "seg.zarr"
    assert cli_main(_seg_argv(tiny_run, out)) == 0
    group = zarr.open_group(store=str(out), mode="r")
    return {"labels": group["labels"][:], "labels_k2": group["labels_k2"][:], "coords": group["sample/coords"][:]}


def _seg_argv(tiny_run, out: Path) -> list[str]:
    data = tiny_run / "data"
    return ["segment", "--checkpoint", str(tiny_run / "run" / "checkpoints" / "last.pt"), "--input",
            str(data / "image.tif"), "--device", "cpu", "--samples", "300", "--k", "3", "--sweep", "2..3",
            "--batch-size", "16", "--output", str(out)]


@pytest.mark.parametrize("stage, when", [("sampling", 2), ("planes", 4), ("after the last plane", 1),
                                         ("before the rename", 0)])
def test_segment_killed_at_each_stage_resumes_to_the_same_labels(stage, when, tiny_run, tmp_path, uninterrupted):
    out = tmp_path / "seg.zarr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    killed = subprocess.run([sys.executable, "-c", KILLER, stage, str(when), *_seg_argv(tiny_run, out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()  # nothing under the final name after a kill at any stage
    partial = out.with_name("seg.zarr.partial")
    if stage == "planes":
        assert 0 < len(done_planes(partial)["0"]) < 8
    if stage in ("after the last plane", "before the rename"):
        assert len(done_planes(partial)["0"]) == 8
    assert cli_main(_seg_argv(tiny_run, out)) == 0  # the same command again: resumes, no "--output exists"
    group = zarr.open_group(store=str(out), mode="r")
    for name in ("labels", "labels_k2"):
        assert np.array_equal(group[name][:], uninterrupted[name]), name
    assert np.array_equal(group["sample/coords"][:], uninterrupted["coords"])
    assert group["sample/features"].shape[0] == len(uninterrupted["coords"])
    for k in (2, 3):
        assert ClusterModel.load(tmp_path / f"seg_centres_k{k}.npz").k == k
    assert not partial.exists()


# ----------------------------------------------------------------------------------------------------------
# the sample is capped by the pixels there are


def test_sample_of_a_tiny_image_holds_each_pixel_once(tiny_run, tmp_path, capsys):
    image = tmp_path / "small.npy"
    np.save(image, np.random.default_rng(1).integers(0, 255, (10, 10), dtype=np.uint8))
    out = tmp_path / "small.zarr"
    assert cli_main(["segment", "--checkpoint", str(tiny_run / "run" / "checkpoints" / "last.pt"), "--input",
                     str(image), "--device", "cpu", "--k", "3", "--output", str(out)]) == 0  # --samples 200000
    assert "all 100 pixels" in capsys.readouterr().err
    coords = zarr.open_group(store=str(out), mode="r")["sample/coords"][:]
    assert coords.shape == (100, 3) and len({tuple(c) for c in coords}) == 100


def test_k_above_the_pixels_of_a_tiny_image_is_refused_before_sampling(tiny_run, tmp_path, capsys, monkeypatch):
    import micromae.segment.pipeline as pipeline

    def no_encoder_pass(*args, **kwargs):
        raise AssertionError("the encoder ran before the check")

    monkeypatch.setattr(pipeline, "sample_pixel_embeddings", no_encoder_pass)
    image = tmp_path / "small.npy"
    np.save(image, np.random.default_rng(2).integers(0, 255, (4, 4), dtype=np.uint8))
    assert cli_main(["segment", "--checkpoint", str(tiny_run / "run" / "checkpoints" / "last.pt"), "--input",
                     str(image), "--device", "cpu", "--k", "20", "--output", str(tmp_path / "s.zarr")]) == 2
    assert "sampled pixels (16)" in capsys.readouterr().err


def test_segment_overwrite_replaces_the_output_whole(tiny_run, tmp_path):
    out = tmp_path / "seg.zarr"
    argv = _seg_argv(tiny_run, out)
    assert cli_main(argv) == 0
    (out / "stale.txt").write_text("from before")
    no_sweep = [w for i, w in enumerate(argv) if "--sweep" not in (w, argv[i - 1])]
    assert cli_main([*no_sweep, "--overwrite"]) == 0  # k 3, no sweep this time
    assert not (out / "stale.txt").exists() and "labels_k2" not in zarr.open_group(store=str(out), mode="r")
    assert not (tmp_path / "seg_centres_k2.npz").exists() and (tmp_path / "seg_centres_k3.npz").is_file()


# ----------------------------------------------------------------------------------------------------------
# pre-training: the NaN guard checks the weights, resume picks the newest intact finite checkpoint


def _tiny_cfg(*extra: str):
    """The config of ``PRE`` (maester_tiny with its overrides) plus ``extra``."""
    from micromae.config import PretrainConfig, load_config, resolve_config

    words = PRE.split()[2:-2]  # the key=value words of PRE
    return load_config(resolve_config("maester_tiny"), PretrainConfig, [*words, *extra])


def test_nan_weights_are_never_saved(tmp_path, monkeypatch):
    from micromae.train import objectives
    from micromae.train.checkpoint import load_checkpoint, non_finite_entries
    from micromae.train.engine import TrainingDiverged
    from micromae.train.pretrain import run_pretrain

    def poison(self, step):  # the loss stays finite at this step; only the weights go bad
        if step == 2:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(objectives.MAEObjective, "after_step", poison)
    with pytest.raises(TrainingDiverged, match="at step 3") as err:
        run_pretrain(_tiny_cfg("train.steps=5", "train.ckpt_every=1"), tmp_path / "r")
    assert "step_0000002.pt" in str(err.value) and "train.lr" in str(err.value)
    ckpts = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["last.pt", "step_0000001.pt", "step_0000002.pt"]
    for path in ckpts.glob("*.pt"):
        assert non_finite_entries(load_checkpoint(path)["model"]) == 0


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    from micromae.train.pretrain import run_pretrain

    run = tmp_path_factory.mktemp("ckpts") / "r"
    run_pretrain(_tiny_cfg("train.steps=3", "train.ckpt_every=1", "train.keep_checkpoints=3"), run)
    return run


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, expected", [
    ("none", "last.pt"),
    ("last.pt NaN", "step_0000003.pt"),
    ("last.pt and step 3 NaN", "step_0000002.pt"),
    ("last.pt truncated", "step_0000003.pt"),
    ("killed between step file and last.pt", "step_0000003.pt"),
])
def test_resume_auto_picks_the_newest_intact_finite_checkpoint(damage, expected, three_checkpoints, tmp_path):
    from micromae.train.checkpoint import find_resume_checkpoint

    run = _copy_run(three_checkpoints, tmp_path / "r")
    ckpts = run / "checkpoints"

    def nan(path: Path) -> None:
        state = torch.load(path, weights_only=False)
        next(iter(state["model"].values())).view(-1)[0] = float("nan")
        torch.save(state, path)

    if damage.startswith("last.pt") and "NaN" in damage:
        nan(ckpts / "last.pt")
    if "step 3" in damage:
        nan(ckpts / "step_0000003.pt")
    if damage == "last.pt truncated":
        data = (ckpts / "last.pt").read_bytes()
        (ckpts / "last.pt").write_bytes(data[: len(data) // 2])
    if damage.startswith("killed"):
        shutil.copy(ckpts / "step_0000002.pt", ckpts / "last.pt")  # last.pt one step behind
    found = find_resume_checkpoint(run)
    assert found is not None and found.name == expected
    assert torch.load(found, weights_only=False)["step"] == (2 if expected == "step_0000002.pt" else 3)


def test_resume_auto_cleans_orphans_and_continues_from_the_newest(three_checkpoints, tmp_path, capsys):
    run = _copy_run(three_checkpoints, tmp_path / "r")
    ckpts = run / "checkpoints"
    orphan = ckpts / f".{uuid.uuid4().hex[:8]}.partial.last.pt"
    orphan.write_bytes(b"half a checkpoint")
    shutil.copy(ckpts / "step_0000002.pt", ckpts / "last.pt")  # killed between step_3 and last.pt
    argv = (PRE.replace("{out}/run", str(run)) + "train.steps=4 train.ckpt_every=1 train.keep_checkpoints=3 "
            "--resume auto").split()
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert not orphan.exists() and "removed" in err
    assert "step_0000003.pt at step 3" in err


def test_refused_start_leaves_no_run_folder(tiny_run, tmp_path, capsys):
    run = tmp_path / "fresh"
    other = tiny_run / "run" / "checkpoints" / "last.pt"
    state = torch.load(other, weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("decoder")}  # foreign shape
    torch.save(state, tmp_path / "foreign.pt")
    argv = (PRE.replace("{out}/run", str(run)) + f"train.steps=2 --resume {tmp_path / 'foreign.pt'}").split()
    assert cli_main(argv) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not run.exists()

