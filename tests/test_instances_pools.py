"""Tests of ``benchmarks/instances_pools.py`` (Mask R-CNN at a share of the labelled pool's images, random init vs
pre-trained encoders, over seeds): the quick mode end to end in a subprocess (every arm × seed scored, random
init present, disjoint splits of the right size, the table), the split by image on a hand-made COCO file, the
pyramid strides of a patch size, and bad input refused with exit status 2 before anything is written."""

from __future__ import annotations

import json
import math

import pytest

from test_dama_benchmarks import load_module, run_quick

METRIC_NAMES = [f"{kind}_{key}" for kind in ("box", "mask") for key in ("mAP", "mAP50", "mAP75")]


@pytest.fixture(scope="module")
def bench():
    return load_module("instances_pools")


def test_instances_pools_quick(tmp_path, bench):
    lines = run_quick("instances_pools", tmp_path)
    scored = [line for line in lines if line["figure"] in METRIC_NAMES]
    arms = {line["arm"] for line in scored}
    assert bench.RANDOM in arms and len(arms) == 2  # random init and the quick run's 2-step MAE
    seeds = {line["seed"] for line in scored}
    for arm in arms:
        for seed in seeds:
            got = {line["figure"]: line["value"] for line in scored if line["arm"] == arm and line["seed"] == seed}
            assert set(got) == set(METRIC_NAMES), (arm, seed)
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in got.values()), got
    splits = {line["split"]: line for line in lines if line["figure"] == "split_images"}
    train, test = set(splits["train"]["files"]), set(splits["test"]["files"])
    assert train and test and not train & test
    # quick pools: 3 labelled images, the last one tests, round(0.1 × 2) -> at least 1 trains
    assert len(test) == 1 and len(train) == max(1, round(0.1 * 2)) == splits["train"]["value"]
    gains = [line for line in lines if line["figure"] == "gain_box_mAP"]
    assert [g["arm"] for g in gains] == [a for a in arms if a != bench.RANDOM] and gains[0]["pairs"] == len(seeds)
    per_run = [line for line in lines if line["figure"] == "cpu_s" and line["stage"] == "finetune"]
    assert len(per_run) == len(arms) * len(seeds) and all(line["value"] > 0 for line in per_run)
    table = (tmp_path / "instances_pools.md").read_text().splitlines()
    assert table[0].startswith("| encoder | seeds | box mAP")
    assert sorted(row.split("|")[1].strip() for row in table[2:]) == sorted(arms)


def write_coco(path, n_images):
    """A COCO file of ``n_images`` images, two annotations each (the split reads only the JSON)."""
    data = {"images": [{"id": i + 1, "file_name": f"images/img_{i:03d}.tif", "height": 8, "width": 8}
                       for i in range(n_images)],
            "annotations": [{"id": 2 * i + k + 1, "image_id": i + 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                             "area": 4, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}
                            for i in range(n_images) for k in range(2)],
            "categories": [{"id": 1, "name": "cell"}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("n_images, test_images, fraction, n_train", [
    (13, 3, 0.1, 1),   # the benchmark's defaults on 13 labelled images
    (13, 3, 0.25, 3),  # 2.5 rounds up
    (13, 3, 0.01, 1),  # at least one image trains
    (13, 3, 1.0, 10),
    (5, 1, 0.5, 2),
])
def test_write_splits_by_image(tmp_path, bench, n_images, test_images, fraction, n_train):
    coco = write_coco(tmp_path / "labelled" / "annotations.json", n_images)
    paths = bench.write_splits(coco, test_images, fraction, tmp_path / "splits")
    train, test = (json.loads(paths[k].read_text()) for k in ("train", "test"))
    names = [f"img_{i:03d}.tif" for i in range(n_images)]
    # the first n_train images train, the last test_images test; files referenced by absolute path
    assert [im["file_name"] for im in train["images"]] == [str(coco.parent / "images" / n) for n in names[:n_train]]
    assert [im["file_name"] for im in test["images"]] == [str(coco.parent / "images" / n)
                                                          for n in names[n_images - test_images:]]
    for split in (train, test):
        ids = {im["id"] for im in split["images"]}
        assert {a["image_id"] for a in split["annotations"]} == ids and len(split["annotations"]) == 2 * len(ids)
        assert split["categories"] == [{"id": 1, "name": "cell"}]
    assert not {im["id"] for im in train["images"]} & {im["id"] for im in test["images"]}


def test_pyramid_strides(bench):
    assert bench.pyramid_strides(8) == [8, 16, 32, 64]
    assert bench.pyramid_strides(4) == [4, 8, 16, 32]  # maskrcnn_tiny's own


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "no-equals-sign"], "NAME=PATH"),
    (["--checkpoint", "DAMA=/no/such/last.pt"], "no such file"),
    (["--checkpoint", "random"], "NAME=PATH"),
    (["--checkpoint", "random init=/no/such/last.pt"], "other than 'random init'"),
    ([], "--pools"),
    (["--pools", "{tmp}"], "labelled/annotations.json"),
    (["--pools", "{tmp}", "--test-images", "13"], "--test-images"),
    (["--pools", "{tmp}", "--label-fraction", "0"], "--label-fraction"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, bench, capsys, argv, message):
    if "--test-images" in argv or "--label-fraction" in argv:
        write_coco(tmp_path / "labelled" / "annotations.json", 13)
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert bench.main(argv + ["--device", "cpu", "--out", str(out), "--keep-runs", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not (tmp_path / "runs" / "splits").exists()
