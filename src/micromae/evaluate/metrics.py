"""Scores of an unsupervised segmentation against reference classes (betaSeg convention; docs/METHODS.md).

Everything is computed from a contingency table ``table[i, j]`` = number of voxels in cluster (or predicted
class) ``i`` and reference class ``j``. The table is accumulated block by block, so volumes of any size are
scored without holding per-class masks of the whole volume. From the table:

- clusters are mapped to classes by (a) Hungarian matching on the Dice matrix, leftover clusters merged into
  the class they overlap most, and (b) many-to-one majority vote;
- per-class Dice and IoU, their means, pixel accuracy, confusion matrices normalised by row (recall) and by
  column (precision), the adjusted Rand index and normalised mutual information.

Confusion matrices follow scikit-learn's orientation: rows are reference classes, columns predicted classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from micromae.errors import input_error

UNASSIGNED = "unassigned"
_SLAB_VOXELS = 1 << 22  # voxels per slab when a whole volume is counted


def _as_labels(block: Any, what: str) -> np.ndarray:
    arr = np.asarray(block)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise input_error(what, "integer labels", f"dtype {arr.dtype}",
                          "Pass label arrays of an integer dtype (e.g. uint8), not probabilities or floats")
    return arr


class ContingencyAccumulator:
    """Counts (predicted label, reference label) pairs block by block.

    ``table``: (n_pred, n_ref) int64. With ``n_pred``/``n_ref`` left as None the table grows to the largest
    label seen; with them given, a label outside ``[0, n)`` is an error.
    """

    def __init__(self, n_pred: int | None = None, n_ref: int | None = None) -> None:
        self.fixed = (n_pred, n_ref)
        self.table = np.zeros((n_pred or 0, n_ref or 0), np.int64)

    def _fit(self, values: np.ndarray, axis: int, what: str) -> None:
        lo, hi = int(values.min()), int(values.max())
        fixed = self.fixed[axis]
        if lo < 0 or (fixed is not None and hi >= fixed):
            expected = f"labels in [0, {fixed})" if fixed is not None else "labels >= 0"
            raise input_error(what, expected, f"values from {lo} to {hi}",
                              "Check the label arrays, or pass the right number of clusters/classes")
        if hi >= self.table.shape[axis]:
            pad = [(0, 0), (0, 0)]
            pad[axis] = (0, hi + 1 - self.table.shape[axis])
            self.table = np.pad(self.table, pad)

    def update(self, pred_block: Any, ref_block: Any, mask_block: Any | None = None) -> None:
        """Add the voxels of one block. pred_block, ref_block: same shape, integer; mask_block: same shape, bool."""
        pred = _as_labels(pred_block, "predicted labels")
        ref = _as_labels(ref_block, "reference labels")
        if pred.shape != ref.shape:
            raise input_error("predicted and reference labels", "the same shape",
                              f"{pred.shape} and {ref.shape}", "Pass blocks cut from the same region")
        if mask_block is not None:
            mask = np.asarray(mask_block)
            if mask.shape != pred.shape:
                raise input_error("mask", f"shape {pred.shape} like the labels", f"shape {mask.shape}",
                                  "Pass the cell mask block of the same region")
            mask = mask.astype(bool, copy=False)
            pred, ref = pred[mask], ref[mask]
        else:
            pred, ref = pred.ravel(), ref.ravel()
        if pred.size == 0:
            return
        self._fit(pred, 0, "predicted labels")
        self._fit(ref, 1, "reference labels")
        n_pred, n_ref = self.table.shape
        codes = pred.astype(np.int64) * n_ref + ref.astype(np.int64)
        self.table += np.bincount(codes, minlength=n_pred * n_ref).reshape(n_pred, n_ref)


def contingency(pred: Any, ref: Any, n_pred: int | None = None, n_ref: int | None = None,
                mask: Any | None = None) -> np.ndarray:
    """(n_pred, n_ref) int64 voxel counts of each (pred, ref) pair inside ``mask``.

    pred, ref, mask: arrays (or lazy array-likes that slice, e.g. zarr/h5py) of one shape; counted in slabs
    along the first axis so no large temporaries are made.
    """
    pred = pred if hasattr(pred, "shape") else np.asarray(pred)
    ref = ref if hasattr(ref, "shape") else np.asarray(ref)
    if tuple(pred.shape) != tuple(ref.shape) or len(pred.shape) == 0:
        raise input_error("predicted and reference labels", "arrays of one shape (at least 1-D)",
                          f"{tuple(pred.shape)} and {tuple(ref.shape)}", "Segment and compare the same volume")
    if mask is not None and tuple(np.shape(mask)) != tuple(pred.shape):
        raise input_error("mask", f"shape {tuple(pred.shape)} like the labels", f"shape {tuple(np.shape(mask))}",
                          "Pass the cell mask of the same volume")
    acc = ContingencyAccumulator(n_pred, n_ref)
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(pred.shape[1:]))))
    for z in range(0, pred.shape[0], step):
        sl = slice(z, z + step)
        acc.update(pred[sl], ref[sl], None if mask is None else mask[sl])
    return acc.table


def _as_table(table: Any) -> np.ndarray:
    t = np.asarray(table)
    if t.ndim != 2 or t.size == 0 or (t < 0).any():
        raise input_error("contingency table", "a non-empty 2-D array of counts", f"shape {t.shape}",
                          "Build it with contingency() or ContingencyAccumulator")
    return t.astype(np.float64) if not np.issubdtype(t.dtype, np.integer) else t.astype(np.int64)


def dice_matrix(table: Any) -> np.ndarray:
    """(k, n) Dice between each cluster and each class: 2 |P_i ∩ R_j| / (|P_i| + |R_j|) (0 where both are empty)."""
    t = _as_table(table).astype(np.float64)
    denom = t.sum(1)[:, None] + t.sum(0)[None, :]
    return np.divide(2 * t, denom, out=np.zeros_like(t), where=denom > 0)


def _present_classes(t: np.ndarray) -> np.ndarray:
    present = np.flatnonzero(t.sum(0) > 0)
    if present.size == 0:
        raise input_error("contingency table", "some counted voxels", "only zeros",
                          "Check that the mask selects voxels and the label arrays are not empty")
    return present


def map_hungarian(table: Any, merge_leftovers: bool = True, warn: bool = True) -> np.ndarray:
    """(k,) cluster → class mapping maximising the summed Dice of one-to-one cluster/class pairs.

    Only reference classes and clusters that occur (non-zero column / row) take part. With k > n classes the
    unmatched clusters go to the class they overlap most (``merge_leftovers``; empty clusters to the first
    class present) or stay -1; with k < n some classes get no cluster (see :func:`classes_without_cluster`;
    a warning says so when ``warn``).
    """
    t = _as_table(table)
    present = _present_classes(t)
    used = np.flatnonzero(t.sum(1) > 0)  # empty clusters take no class in the matching
    rows, cols = linear_sum_assignment(dice_matrix(t)[used][:, present], maximize=True)
    mapping = np.full(t.shape[0], -1, np.int64)
    mapping[used[rows]] = present[cols]
    missing = classes_without_cluster(t, mapping)
    if missing and warn:
        warnings.warn(f"{used.size} clusters for {present.size} classes: classes {missing} get no cluster",
                      stacklevel=2)
    if merge_leftovers and (mapping < 0).any():
        left = np.flatnonzero(mapping < 0)
        mapping[left] = present[np.argmax(t[left][:, present], axis=1)]
    return mapping


def map_majority(table: Any) -> np.ndarray:
    """(k,) cluster → the class it overlaps most (many-to-one). Empty clusters go to the first present class."""
    t = _as_table(table)
    present = _present_classes(t)
    return present[np.argmax(t[:, present], axis=1)]


def classes_without_cluster(table: Any, mapping: Sequence[int]) -> list[int]:
    """Reference classes that occur in ``table`` but that no non-empty cluster is mapped to."""
    t = _as_table(table)
    covered = np.asarray(mapping)[t.sum(1) > 0]
    return sorted(set(_present_classes(t).tolist()) - set(covered.tolist()))


def relabel(pred: Any, mapping: Sequence[int]) -> np.ndarray:
    """Predicted classes ``mapping[pred]`` (same shape as pred; uint8 when they fit, else int32 with -1 unmapped)."""
    pred = _as_labels(pred, "cluster labels")
    mapping = np.asarray(mapping, np.int64)
    if pred.size and (pred.min() < 0 or pred.max() >= mapping.size):
        raise input_error("cluster labels", f"values in [0, {mapping.size}) (one per mapping entry)",
                          f"values from {pred.min()} to {pred.max()}", "Use the mapping made for this clustering")
    dtype = np.uint8 if mapping.min(initial=0) >= 0 and mapping.max(initial=0) < 256 else np.int32
    return mapping.astype(dtype)[pred]


def map_table(table: Any, mapping: Sequence[int]) -> np.ndarray:
    """(k, n) cluster table → (n [+1], n) predicted-class table; a last row holds unmapped (-1) clusters if any."""
    t = _as_table(table)
    mapping = np.asarray(mapping, np.int64)
    k, n = t.shape
    if mapping.shape != (k,) or mapping.min() < -1 or mapping.max() >= n:
        raise input_error("mapping", f"{k} class indices in [-1, {n})", f"{mapping.tolist()}",
                          "Build it with map_hungarian() or map_majority() from the same table")
    unassigned = bool((mapping < 0).any())
    out = np.zeros((n + unassigned, n), t.dtype)
    np.add.at(out, np.where(mapping < 0, n, mapping), t)
    return out


def adjusted_rand_from_table(table: Any) -> float:
    """Adjusted Rand index (Hubert & Arabie) from pair counts of a contingency table."""
    t = _as_table(table).astype(np.float64)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    n = t.sum()
    index, a, b, total = pairs(t), pairs(t.sum(1)), pairs(t.sum(0)), n * (n - 1) / 2
    expected = a * b / total if total > 0 else 0.0
    maximum = (a + b) / 2
    if maximum == expected:  # both partitions trivial (one set, or all singletons) and identical
        return 1.0
    return float((index - expected) / (maximum - expected))


def normalized_mutual_info_from_table(table: Any) -> float:
    """NMI = I(P; R) / mean(H(P), H(R)) (arithmetic mean, as scikit-learn's default)."""
    t = _as_table(table).astype(np.float64)
    t = t[t.sum(1) > 0][:, t.sum(0) > 0]
    if t.size == 0 or t.shape == (1, 1):
        return 1.0
    p = t / t.sum()
    pi, pj = p.sum(1), p.sum(0)
    nz = p > 0
    mi = max(float((p[nz] * np.log(p[nz] / np.outer(pi, pj)[nz])).sum()), 0.0)
    if mi == 0.0:
        return 0.0
    h = (-(pi * np.log(pi)).sum() - (pj * np.log(pj)).sum()) / 2
    return float(mi / max(h, np.finfo(np.float64).eps))


def _class_names(class_names: Sequence[str] | None, n: int) -> list[str]:
    if class_names is None:
        return [f"class {i}" for i in range(n)]
    if len(class_names) < n:
        raise input_error("class_names", f"at least {n} names (one per reference label)",
                          f"{len(class_names)}: {list(class_names)}", "Give a name for every label value")
    return [str(c) for c in class_names]


def _class_indices(classes: Sequence[str | int], names: list[str]) -> list[int]:
    out = []
    for c in classes:
        if isinstance(c, str) and c not in names:
            raise input_error("ignore_classes", f"names among {names} or indices", repr(c), "Fix the class name")
        out.append(names.index(c) if isinstance(c, str) else int(c))
    return out


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def _normalise(counts: np.ndarray, axis: int) -> np.ndarray:
    s = counts.sum(axis, keepdims=True).astype(np.float64)
    return np.divide(counts, s, out=np.zeros(counts.shape), where=s > 0)


def _confusion(t: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Reference classes present × predicted classes present (plus those rows), rows = reference."""
    n = t.shape[1]
    rows = np.flatnonzero(t.sum(0) > 0)
    cols = np.union1d(rows, np.flatnonzero(t[:n].sum(1) > 0))
    if t.shape[0] > n and t[n].sum() > 0:
        cols = np.append(cols, n)
    counts = t[cols][:, rows].T
    return {"ref_names": [names[i] for i in rows],
            "pred_names": [names[i] if i < n else UNASSIGNED for i in cols],
            "counts": counts.tolist(),
            "by_row": _normalise(counts, 1).tolist(),
            "by_col": _normalise(counts, 0).tolist()}


def segmentation_scores(table: Any = None, class_names: Sequence[str] | None = None,
                        ignore_classes: Sequence[str | int] = (), *, pred: Any = None, ref: Any = None,
                        mask: Any = None) -> dict[str, Any]:
    """Per-class Dice/IoU/precision/recall, means, pixel accuracy, confusion matrices, ARI and NMI.

    table: (n_rows, n) predicted class × reference class counts (rows ≥ n count as unassigned), or give
    pred/ref (and mask) arrays of class indices instead. Means run over reference classes present and not in
    ``ignore_classes`` (names or indices, e.g. "outside" when a cell mask is used). Undefined values are None.
    """
    if table is None:
        if pred is None or ref is None:
            raise input_error("segmentation_scores", "a table, or pred and ref arrays", "neither",
                              "Pass table=contingency(pred, ref) or pred=..., ref=...")
        table = contingency(pred, ref, mask=mask)
    t = _as_table(table)
    names = _class_names(class_names, t.shape[1])
    n = len(names)
    if t.shape[1] < n:
        t = np.pad(t, [(0, 0), (0, n - t.shape[1])])
    t = np.pad(t, [(0, max(0, n - t.shape[0])), (0, 0)])
    if t.shape[0] > n + 1:  # predicted labels beyond the classes: one "unassigned" row
        t = np.vstack([t[:n], t[n:].sum(0, keepdims=True)])
    ignored = set(_class_indices(ignore_classes, names))
    row, col, tp = t.sum(1), t.sum(0), np.diag(t[:n])
    per_class, means = {}, []
    for c, name in enumerate(names):
        union = row[c] + col[c] - tp[c]
        per_class[name] = {"dice": _ratio(2 * tp[c], row[c] + col[c]), "iou": _ratio(tp[c], union),
                           "precision": _ratio(tp[c], row[c]), "recall": _ratio(tp[c], col[c]),
                           "n_ref": int(col[c]), "n_pred": int(row[c])}
        if col[c] > 0 and c not in ignored:
            means.append(name)
    return {"per_class": per_class,
            "mean_dice": float(np.mean([per_class[m]["dice"] for m in means])) if means else None,
            "mean_iou": float(np.mean([per_class[m]["iou"] for m in means])) if means else None,
            "mean_over": means,
            "pixel_accuracy": _ratio(tp.sum(), t.sum()),
            "confusion": _confusion(t, names),
            "ari": adjusted_rand_from_table(t), "nmi": normalized_mutual_info_from_table(t)}


def evaluate_table(table: Any, class_names: Sequence[str] | None = None,
                   ignore_classes: Sequence[str | int] = ()) -> dict[str, Any]:
    """Both mappings (Hungarian with leftovers merged, majority vote), their scores, and raw-cluster ARI/NMI.

    table: (k, n) cluster × reference class counts. Returns a JSON-serialisable dict.
    """
    t = _as_table(table)
    names = _class_names(class_names, t.shape[1])
    if t.shape[1] < len(names):
        t = np.pad(t, [(0, 0), (0, len(names) - t.shape[1])])
    result: dict[str, Any] = {
        "class_names": names, "ignore_classes": [names[i] for i in _class_indices(ignore_classes, names)],
        "n_clusters": int(t.shape[0]), "n_voxels": int(t.sum()), "contingency": t.tolist(),
        "cluster_sizes": t.sum(1).tolist(),
        "clusters": {"ari": adjusted_rand_from_table(t), "nmi": normalized_mutual_info_from_table(t)},
    }
    for key, mapping in (("hungarian", map_hungarian(t, warn=False)), ("majority", map_majority(t))):
        result[key] = {"mapping": mapping.tolist(), "mapping_names": [names[m] for m in mapping],
                       "classes_without_cluster": [names[c] for c in classes_without_cluster(t, mapping)],
                       "scores": segmentation_scores(map_table(t, mapping), names, ignore_classes)}
    return result


def evaluate_segmentation(pred: Any, ref: Any, mask: Any = None, class_names: Sequence[str] | None = None,
                          ignore_classes: Sequence[str | int] = (), n_clusters: int | None = None) -> dict[str, Any]:
    """Score cluster labels ``pred`` against reference classes ``ref`` inside ``mask`` (see :func:`evaluate_table`).

    pred: cluster ids (Z, Y, X) or any shape; ref: class ids, same shape; mask: bool, same shape, or None.
    """
    n_ref = None if class_names is None else len(class_names)
    result = evaluate_table(contingency(pred, ref, n_clusters, n_ref, mask), class_names, ignore_classes)
    result["masked"] = mask is not None
    return result


def sweep_k_table(results_by_k: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per k (sorted) from :func:`evaluate_segmentation` results: mean Dice/IoU, accuracy, ARI, NMI."""
    rows = []
    for k in sorted(results_by_k):
        r = results_by_k[k]
        row: dict[str, Any] = {"k": int(k)}
        for key in ("hungarian", "majority"):
            s = r[key]["scores"]
            row.update({f"{key}_mean_dice": s["mean_dice"], f"{key}_mean_iou": s["mean_iou"],
                        f"{key}_pixel_accuracy": s["pixel_accuracy"]})
        row.update({"ari": r["clusters"]["ari"], "nmi": r["clusters"]["nmi"]})
        rows.append(row)
    return rows
