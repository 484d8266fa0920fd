"""Segmentation metrics: contingency counting, cluster→class mappings, Dice/IoU, ARI/NMI, JSON output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from micromae.data.synthetic_em import CLASS_NAMES, make_em_volume
from micromae.errors import MicromaeInputError
from micromae.evaluate import metrics
from micromae.evaluate.metrics import (
    ContingencyAccumulator,
    adjusted_rand_from_table,
    contingency,
    dice_matrix,
    evaluate_segmentation,
    map_hungarian,
    map_majority,
    map_table,
    normalized_mutual_info_from_table,
    relabel,
    segmentation_scores,
    sweep_k_table,
)


@pytest.fixture(scope="module")
def em():
    return make_em_volume((16, 48, 48), seed=3)


def _noisy(labels: np.ndarray, frac: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = labels.copy()
    flip = rng.random(labels.shape) < frac
    out[flip] = rng.integers(0, labels.max() + 1, flip.sum())
    return out


def test_contingency_counts_pairs_inside_mask():
    pred = np.array([0, 0, 1, 2, 2, 2])
    ref = np.array([1, 1, 0, 0, 1, 1])
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    t = contingency(pred, ref, mask=mask)
    expected = np.zeros((3, 2), np.int64)
    for p, r in zip(pred[mask], ref[mask]):
        expected[p, r] += 1
    assert t.dtype == np.int64
    np.testing.assert_array_equal(t, expected)
    assert contingency(pred, ref, n_pred=5, n_ref=4).shape == (5, 4)


def test_accumulator_in_blocks_equals_whole(em, monkeypatch):
    pred = _noisy(em.labels, 0.2, 0)
    whole = contingency(pred, em.labels, mask=em.cell_mask)
    monkeypatch.setattr(metrics, "_SLAB_VOXELS", 3 * 48 * 48)  # count the volume in 6 slabs
    np.testing.assert_array_equal(contingency(pred, em.labels, mask=em.cell_mask), whole)
    acc = ContingencyAccumulator()
    for z in range(0, 16, 5):  # uneven blocks, labels seen in growing order
        for y in (slice(0, 20), slice(20, 48)):
            acc.update(pred[z:z + 5, y], em.labels[z:z + 5, y], em.cell_mask[z:z + 5, y])
    np.testing.assert_array_equal(acc.table, whole)
    assert acc.table.sum() == em.cell_mask.sum()


def test_bad_inputs_raise_input_error():
    with pytest.raises(MicromaeInputError, match="same shape|one shape"):
        contingency(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(MicromaeInputError, match="integer"):
        contingency(np.zeros(4, float), np.zeros(4, int))
    with pytest.raises(MicromaeInputError, match="labels in"):
        ContingencyAccumulator(2, 2).update(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(MicromaeInputError, match="ignore_classes"):
        segmentation_scores(np.eye(3, dtype=int) * 5, ["a", "b", "c"], ignore_classes=["d"])


def test_permuted_labels_map_back_exactly_with_dice_one(em):
    perm = np.array([4, 2, 5, 0, 3, 1])
    pred = perm[em.labels]
    t = contingency(pred, em.labels)
    for mapping in (map_hungarian(t), map_majority(t)):
        assert mapping[perm].tolist() == list(range(6))
        np.testing.assert_array_equal(relabel(pred, mapping), em.labels)
        scores = segmentation_scores(map_table(t, mapping), CLASS_NAMES)
        assert scores["mean_dice"] == pytest.approx(1.0)
        assert scores["pixel_accuracy"] == pytest.approx(1.0)


def test_leftover_clusters_merge_into_the_class_they_overlap_most():
    # class 0 split into clusters 0 (60 voxels) and 2 (30 voxels); class 1 split into 1 (50) and 3 (5 + 2 of class 0)
    t = np.array([[60, 0], [0, 50], [30, 0], [2, 5]])
    np.testing.assert_array_equal(map_hungarian(t, merge_leftovers=False), [0, 1, -1, -1])
    np.testing.assert_array_equal(map_hungarian(t), [0, 1, 0, 1])
    mapped = map_table(t, [0, 1, -1, -1])
    assert mapped.shape == (3, 2) and mapped[2].tolist() == [32, 5]  # unassigned row keeps the voxels


def test_fewer_clusters_than_classes_says_which_class_is_missing():
    t = np.array([[40, 0, 3], [0, 30, 1]])
    with pytest.warns(UserWarning, match=r"classes \[2\]"):
        mapping = map_hungarian(t)
    assert mapping.tolist() == [0, 1]
    result = evaluate_segmentation(np.repeat([0, 0, 1, 1], 5), np.repeat([0, 2, 1, 1], 5), class_names=["a", "b", "c"])
    assert result["hungarian"]["classes_without_cluster"] == ["c"]
    assert result["hungarian"]["scores"]["per_class"]["c"]["dice"] == 0.0


def test_majority_vote_is_many_to_one():
    t = np.array([[10, 1, 0], [8, 2, 0], [0, 3, 9]])
    np.testing.assert_array_equal(map_majority(t), [0, 0, 2])
    np.testing.assert_array_equal(map_hungarian(t), [0, 1, 2])  # one-to-one gives cluster 1 to class 1


def test_dice_iou_match_direct_computation(em):
    pred = _noisy(em.labels, 0.3, 1)
    scores = segmentation_scores(pred=pred, ref=em.labels, class_names=CLASS_NAMES)
    dice = dice_matrix(contingency(pred, em.labels))
    for c, name in enumerate(CLASS_NAMES):
        p, r = pred == c, em.labels == c
        inter = np.logical_and(p, r).sum()
        assert scores["per_class"][name]["dice"] == pytest.approx(2 * inter / (p.sum() + r.sum()))
        assert scores["per_class"][name]["iou"] == pytest.approx(inter / np.logical_or(p, r).sum())
        assert dice[c, c] == pytest.approx(2 * inter / (p.sum() + r.sum()))
    assert scores["pixel_accuracy"] == pytest.approx((pred == em.labels).mean())
    conf = np.array(scores["confusion"]["counts"])
    np.testing.assert_allclose(np.array(scores["confusion"]["by_row"]).sum(1), 1.0)  # recall rows
    np.testing.assert_allclose(np.array(scores["confusion"]["by_col"]).sum(0), 1.0)  # precision columns
    assert conf[2, 2] == np.logical_and(pred == 2, em.labels == 2).sum()  # rows are reference classes


@pytest.mark.parametrize("seed", range(6))
def test_ari_nmi_from_table_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    a = rng.integers(0, int(rng.integers(1, 6)), n)
    b = a.copy() if seed == 0 else rng.integers(0, int(rng.integers(1, 6)), n)
    b[: n // 2] = a[: n // 2] if seed % 2 else b[: n // 2]
    t = contingency(a, b)
    assert adjusted_rand_from_table(t) == pytest.approx(adjusted_rand_score(b, a), abs=1e-10)
    assert normalized_mutual_info_from_table(t) == pytest.approx(normalized_mutual_info_score(b, a), abs=1e-10)


def test_mask_restricts_and_ignore_classes_leave_the_mean(em):
    pred = _noisy(em.labels, 0.25, 2)
    pred[~em.cell_mask] = 1  # errors outside the cells must not count when the mask is used
    masked = evaluate_segmentation(pred, em.labels, em.cell_mask, CLASS_NAMES, ignore_classes=["outside"])
    inside = evaluate_segmentation(pred[em.cell_mask], em.labels[em.cell_mask], class_names=CLASS_NAMES)
    assert masked["n_voxels"] == int(em.cell_mask.sum())
    assert masked["contingency"] == inside["contingency"]
    s = masked["hungarian"]["scores"]
    assert "outside" not in s["mean_over"] and len(s["mean_over"]) == 5
    assert s["mean_dice"] == pytest.approx(np.mean([s["per_class"][c]["dice"] for c in CLASS_NAMES[1:]]))
    whole = segmentation_scores(pred=pred, ref=em.labels, class_names=CLASS_NAMES, ignore_classes=[0])
    kept = segmentation_scores(pred=pred, ref=em.labels, class_names=CLASS_NAMES)
    assert whole["mean_over"] == list(CLASS_NAMES[1:]) and kept["mean_over"] == list(CLASS_NAMES)
    assert kept["per_class"]["outside"]["dice"] < 1.0


def test_evaluate_segmentation_is_json_serialisable_and_sweeps(em):
    rng = np.random.default_rng(4)
    split = rng.random(em.labels.shape) < 0.5
    clusterings = {4: np.minimum(em.labels, 3),  # inside cells: classes 3, 4, 5 share one cluster
                   6: _noisy(em.labels, 0.1, 6),
                   8: np.where(split & (em.labels == 1), 6, np.where(split & (em.labels == 3), 7, em.labels))}
    results = {k: evaluate_segmentation(c, em.labels, em.cell_mask, CLASS_NAMES, ["outside"], n_clusters=k)
               for k, c in clusterings.items()}
    back = json.loads(json.dumps(results[6], allow_nan=False))
    assert set(back) >= {"hungarian", "majority", "clusters", "contingency"}
    assert back["hungarian"]["scores"]["mean_dice"] == results[6]["hungarian"]["scores"]["mean_dice"]
    assert len(back["hungarian"]["mapping"]) == 6
    assert results[4]["hungarian"]["classes_without_cluster"] == ["mitochondria", "granules"]
    assert results[8]["hungarian"]["mapping"][6:] == [1, 3]  # split halves merged back
    assert results[8]["hungarian"]["scores"]["mean_dice"] == pytest.approx(1.0)
    rows = sweep_k_table(results)
    assert [r["k"] for r in rows] == [4, 6, 8]
    assert rows[1]["hungarian_mean_dice"] == results[6]["hungarian"]["scores"]["mean_dice"]
    assert rows[0]["hungarian_mean_dice"] < rows[1]["hungarian_mean_dice"]  # k=4 cannot cover 5 classes
    assert rows[2]["ari"] < 1.0 and rows[2]["majority_mean_dice"] == pytest.approx(1.0)
