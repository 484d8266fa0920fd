"""Segmentation under torch.distributed: 2 gloo processes on CPU write exactly what 1 process writes (plain with a
k sweep through `torchrun -m micromae segment`, tri-planar, embed, cluster), a killed rank's run resumes with
another number of ranks, ranks that see different settings are refused, and a failing rank fails them all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
import zarr

import micromae
from micromae.segment import volume as volume_mod
from micromae.segment.distributed import DistInfo, share
from micromae.segment.pipeline import run_cluster, run_embed, run_segment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORKER = Path(__file__).with_name("dist_worker.py")
SRC = str(Path(micromae.__file__).resolve().parents[1])
COMMON = {"k": 3, "n_samples": 2000, "device": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", **extra}


def _launch(jobs: list[dict], tmp_path: Path, name: str, world: int = 2) -> list[subprocess.Popen]:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(jobs))
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world))
    return [subprocess.Popen([sys.executable, str(WORKER), str(path)],
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for r in range(world)]


def _wait(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(store=str(path), mode="r")
    return {name: g[name][:] for name in g.array_keys()}


def _same_output(one: Path, two: Path) -> None:
    a, b = _arrays(one), _arrays(two)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    for centres in one.parent.glob(f"{one.stem}_centres_k*.npz"):
        other = two.with_name(centres.name.replace(one.stem, two.stem, 1))
        assert np.array_equal(np.load(centres)["centers"], np.load(other)["centers"])
    assert not two.with_name(two.name + ".partial").exists() and not two.with_name(two.name + ".partial.done").exists()


@pytest.fixture(scope="module")
def data(tiny_run):
    return {"checkpoint": str(tiny_run / "run" / "checkpoints" / "last.pt"),
            "input_path": str(tiny_run / "data" / "image.tif")}


@pytest.fixture(scope="module")
def plain_one(data, tmp_path_factory):
    """One process, plain Z slicing with a k sweep and kept PCA features: the reference. One torch thread, like
    the ranks (OMP_NUM_THREADS=1): matrix products split over another number of threads round differently, and
    this module-scoped fixture runs before the function-scoped ``one_torch_thread``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_segment(**data, **COMMON, output=tmp_path_factory.mktemp("one") / "one.zarr", sweep=[2, 4],
                           keep_features="pca")
    finally:
        torch.set_num_threads(before)


def test_share_deals_planes_round_robin():
    assert share(list(range(7)), DistInfo(1, 3)) == [1, 4]
    assert sorted(sum((share(list(range(7)), DistInfo(r, 3)) for r in range(3)), [])) == list(range(7))


def test_torchrun_cli_two_processes_equal_one(data, plain_one, tmp_path):
    two = tmp_path / "two.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "micromae", "segment", "--checkpoint", data["checkpoint"],
           "--input", data["input_path"], "--k", "3", "--sweep", "2,4", "--samples", "2000", "--device", "cpu",
           "--keep-features", "pca", "--output", str(two)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr
    _same_output(plain_one, two)
    assert zarr.open_group(store=str(two), mode="r").attrs["done"] == {"0": list(range(8))}


def test_tri_planar_embed_cluster_and_mismatch_under_two_ranks(data, tmp_path):
    settings = {"axes": [0, 1, 2]}
    jobs = [
        {"verb": "segment", "kwargs": {**data, **COMMON, "output": str(tmp_path / "tri2.zarr"), "settings": settings,
                                       "keep_features": "pca", "pca_dim": 3}},
        {"verb": "embed", "kwargs": {"checkpoint": data["checkpoint"], "input_path": data["input_path"],
                                     "output": str(tmp_path / "emb2.npy"), "slices": [0, 3, 5], "device": "cpu"}},
        {"verb": "cluster", "kwargs": {**data, **COMMON, "output": str(tmp_path / "c2.npz")}},
        {"verb": "segment", "kwargs": {**data, **COMMON, "output": str(tmp_path / "ome2.ome.zarr"), "sweep": [2],
                                       "voxel_size": [0.04, 0.01, 0.01], "pyramid_min_side": 16}},
        {"verb": "segment", "kwargs": {**data, **COMMON, "output": str(tmp_path / "bad.zarr")},
         "rank_kwargs": {"1": {"seed": 1}}, "error_to": str(tmp_path / "mismatch")},
        {"verb": "segment", "kwargs": {**data, **COMMON, "output": str(tmp_path / "fail.zarr")},
         "fail_in_plane": [1, 2], "error_to": str(tmp_path / "fail")},
    ]
    procs = _launch(jobs, tmp_path, "tri")
    from micromae.segment.volume import SegmentSettings

    tri1 = run_segment(**data, **COMMON, output=tmp_path / "tri1.zarr", settings=SegmentSettings(axes=(0, 1, 2)),
                       keep_features="pca", pca_dim=3)
    emb1 = run_embed(data["checkpoint"], data["input_path"], tmp_path / "emb1.npy", [0, 3, 5], device="cpu")
    c1 = run_cluster(**data, **COMMON, output=tmp_path / "c1.npz")
    ome1 = run_segment(**data, **COMMON, output=tmp_path / "ome1.ome.zarr", sweep=[2], voxel_size=(0.04, 0.01, 0.01),
                       pyramid_min_side=16)
    results = _wait(procs)
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    _same_output(tri1, tmp_path / "tri2.zarr")
    assert {"features_pca_axis0", "features_pca_axis1", "features_pca_axis2"} <= set(_arrays(tri1))
    assert np.array_equal(np.load(emb1), np.load(tmp_path / "emb2.npy"))
    assert np.array_equal(np.load(c1)["centers"], np.load(tmp_path / "c2.npz")["centers"])
    # OME-Zarr output: every array of the store (label images with their pyramids, the image copy) identical
    one_ome = {n: a for n, a in zarr.open_group(store=str(ome1), mode="r").members(max_depth=None)
               if isinstance(a, zarr.Array)}
    two_ome = {n: a for n, a in zarr.open_group(store=str(tmp_path / "ome2.ome.zarr"), mode="r").members(max_depth=None)
               if isinstance(a, zarr.Array)}
    assert sorted(one_ome) == sorted(two_ome) and {"labels/clusters/1", "labels/clusters_k2/0", "0"} <= set(one_ome)
    for name, arr in one_ome.items():
        assert np.array_equal(arr[:], two_ome[name][:]), name
    from micromae.io import omezarr

    omezarr.validate(tmp_path / "ome2.ome.zarr")
    for rank in (0, 1):  # every rank refuses, naming what differs; nothing written
        message = (tmp_path / f"mismatch.rank{rank}").read_text()
        assert message.startswith("MicromaeInputError: ")
        assert "rank 1 differs from rank 0 in" in message and "seed" in message and "same inputs" in message
    assert not list(tmp_path.glob("bad*"))
    # a rank that fails mid-run fails every rank with its message; the output is left as .partial to resume
    assert (tmp_path / "fail.rank1").read_text() == "RuntimeError: boom"
    assert (tmp_path / "fail.rank0").read_text() == "RankFailed: rank 1 of 2 failed: RuntimeError: boom"
    assert not (tmp_path / "fail.zarr").exists() and (tmp_path / "fail.zarr.partial").exists()


def test_killed_rank_resumes_with_another_world_size(data, plain_one, tmp_path, monkeypatch):
    target = tmp_path / "resume.zarr"
    job = {"verb": "segment", "kwargs": {**data, **COMMON, "output": str(target), "sweep": [2, 4],
                                         "keep_features": "pca"}, "die_in_plane": [1, 2]}
    (r0, out0), (r1, out1) = _wait(_launch([job], tmp_path, "kill"), timeout=180)
    assert r1 == -9 and r0 != 0  # rank 1 killed in its 2nd plane; rank 0 fails at the next shared step
    partial = target.with_name(target.name + ".partial")
    assert not target.exists() and partial.exists()
    records = {p.name: json.loads(p.read_text())["done"] for p in partial.with_name(partial.name + ".done").glob("*")}
    assert records == {"rank0.json": {"0": [0, 2, 4, 6]}, "rank1.json": {"0": [1]}}
    real, calls = volume_mod.embed_region, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(volume_mod, "embed_region", counting)
    run_segment(**data, **COMMON, output=target, sweep=[2, 4], keep_features="pca")  # now one process
    assert len(calls) == 3  # planes 3, 5, 7 only (one tile per plane)
    _same_output(plain_one, target)
