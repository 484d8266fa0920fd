"""The classification protocol: stratified, disjoint, reproducible splits; nested data-efficiency shares;
`micromae evaluate classification` end to end, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from micromae.cli import main
from micromae.errors import MicromaeInputError
from micromae.evaluate import classification
from micromae.evaluate.classification import fraction_subset, run_evaluate_classification, stratified_splits
from micromae.models import ViTEncoder
from micromae.models.pretrained import encoder_fields
from micromae.train.checkpoint import save_checkpoint

TINY = ["data.size=16", "model.img_size=16", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "train.epochs=null", "train.steps=3", "train.batch_size=8", "train.log_every=1", "train.ckpt_every=0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    enc = ViTEncoder(img_size=16, patch_size=4, in_chans=7, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                     pos_embed_weight=1.0)
    state = {"model": {f"branch1.encoder.{k}": v for k, v in enc.state_dict().items()}, "step": 1,
             "config": {"objective": "dama", "model": encoder_fields(enc)}}
    return save_checkpoint(tmp_path_factory.mktemp("dama") / "checkpoints", state)


LABELS = np.repeat(np.arange(4), [30, 20, 10, 5])  # unbalanced classes


def test_splits_are_stratified_disjoint_and_reproducible():
    splits = stratified_splits(LABELS, folds=10, test_size=0.4, seed=0)
    assert len(splits) == 10
    for train, test in splits:
        assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == len(LABELS)
        for k, n in enumerate([30, 20, 10, 5]):
            assert abs((LABELS[test] == k).sum() - 0.4 * n) <= 1  # each class held out in proportion
    again = stratified_splits(LABELS, folds=10, test_size=0.4, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again))
    other = stratified_splits(LABELS, folds=10, test_size=0.4, seed=1)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(splits, other))
    assert len({tuple(te) for _, te in splits}) == 10  # folds differ


def test_fraction_subsets_are_stratified_nested_and_keep_every_class():
    train, _ = stratified_splits(LABELS, folds=1, seed=0)[0]
    small, large = (fraction_subset(train, LABELS, f, seed=0, fold=0) for f in (0.1, 0.5))
    assert set(small) <= set(large) <= set(train)
    assert set(LABELS[small]) == set(range(4))  # at least one crop per class
    assert (LABELS[large] == 0).sum() == round(0.5 * (LABELS[train] == 0).sum())
    assert np.array_equal(fraction_subset(train, LABELS, 1.0), train)
    with pytest.raises(MicromaeInputError, match="share"):
        fraction_subset(train, LABELS, 0.0)


def test_splits_that_would_leave_a_class_empty_are_refused():
    with pytest.raises(MicromaeInputError, match="without examples"):
        stratified_splits(np.array([0, 0, 0, 1, 1, 1, 2]))
    with pytest.raises(MicromaeInputError, match="folds"):
        stratified_splits(LABELS, folds=0)


def test_protocol_end_to_end_and_resume(cells, checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    kwargs = dict(config="classify_tiny", overrides=TINY, methods=("finetune", "linear", "knn"), folds=2,
                  fractions=(0.5, 1.0), probe_epochs=20, device="cpu")
    encoders = {"DAMA": str(checkpoint), "random init": "random"}
    result = run_evaluate_classification(encoders, cells, out, **kwargs)
    assert len(result["records"]) == 2 * 3 * 2 * 2
    rows = {(r["encoder"], r["method"], r["fraction"]): r for r in result["summary"]}
    assert len(rows) == 12 and all(r["folds"] == 2 and 0 <= r["accuracy_mean"] <= 1 for r in rows.values())
    assert rows[("DAMA", "knn", 0.5)]["n_train"] < rows[("DAMA", "knn", 1.0)]["n_train"]
    for name in ("results.json", "results.md", "accuracy_vs_fraction.png", "folds.jsonl"):
        assert (out / name).is_file()
    assert "| DAMA | finetune | 50% |" in (out / "results.md").read_text()
    assert not list(out.glob("runs/*/*/checkpoints"))  # fine-tuned networks dropped once scored
    assert json.loads((out / "runs/DAMA/fold00_frac1.000/eval.json").read_text())["n"] > 0

    def no_training(*args, **kw):
        raise AssertionError("finished folds must not be trained again")

    monkeypatch.setattr("micromae.train.classify.run_classify_finetune", no_training)
    monkeypatch.setattr(classification, "fraction_subset", no_training)
    again = run_evaluate_classification(encoders, cells, out, **kwargs)
    assert again["summary"] == result["summary"]
    with pytest.raises(MicromaeInputError, match="other settings"):
        run_evaluate_classification(encoders, cells, out, **{**kwargs, "folds": 3})


def test_evaluate_classification_cli(cells, checkpoint, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["evaluate", "classification", "--checkpoint", f"DAMA={checkpoint}", "--checkpoint", "random",
               "--data", str(cells), "--folds", "2", "--fractions", "0.5,1", "--methods", "knn,finetune",
               "--device", "cpu", "--out", str(out), *TINY])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert {r["encoder"] for r in result["summary"]} == {"DAMA", "random init"}
    assert result["settings"]["vote"] == "weighted" and result["settings"]["k"] == 20
    assert "accuracy" in capsys.readouterr().out
    assert main(["evaluate", "classification", "--checkpoint", "random", "--data", str(cells), "--methods",
                 "svm", "--out", str(tmp_path / "bad")]) == 2
