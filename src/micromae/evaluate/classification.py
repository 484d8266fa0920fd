"""DAMA's cell-classification protocol (paper Tables 1, 3 and Fig. 4; docs/METHODS.md, DAMA fine-tuning) for
any set of encoders.

1. **Repeated random splits**: ``folds`` (default 10) stratified splits of the labelled crops into a train part
   and a held-out test part (default 60/40), drawn by scikit-learn's ``StratifiedShuffleSplit`` from ``seed``;
   every encoder and method sees the same splits.
2. **Data efficiency**: within each fold, a stratified share ``fraction`` (e.g. 0.1 .. 1.0) of the train part:
   the crops of each class in a fixed random order (from ``[seed, fold]``), the first
   ``max(1, round(fraction × n_class))`` of them, so smaller shares are subsets of larger ones.
3. **Methods** per (encoder, fold, fraction): ``finetune`` (the full recipe of
   :mod:`micromae.train.classify` from the encoder, or from random init), ``linear`` (linear probe) and
   ``knn`` (k-NN) on frozen features (:mod:`micromae.evaluate.probe`). Accuracy on the fold's test part.
4. **Seeds**: fold ``i`` runs with ``train.seed + i``: the fine-tuning runs of a fold (head init, data order,
   augmentation) and, for ``"random"``, the random-init encoder itself, so the random-init control is a
   different random network in every fold (its spread is over seeds as well as splits).

Outputs in ``out``: ``results.json`` (settings, per-fold records, summary), ``results.md`` (mean ± std accuracy
and error per encoder, method and fraction, with the per-fold numbers) and ``accuracy_vs_fraction.png`` (Fig.
4: accuracy against the share of training data, one line per encoder and method, error bars = std over folds).
``folds.jsonl`` records each finished fold, so an interrupted evaluation picks up where it stopped; fine-tuning
runs live in ``out/runs/<encoder>/<fold>_<fraction>/`` (checkpoints removed once scored, unless kept).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from micromae.config import apply_overrides, resolve_config
from micromae.errors import input_error
from micromae.evaluate.probe import checkpoint_normalize, extract_features, knn_probe, linear_probe
from micromae.evaluate.report import markdown_table
from micromae.figures import plt, save_figure
from micromae.io import atomic_path
from micromae.runtime import resolve_device, say
from micromae.train.classify import build_encoder, check_channels, load_classify_config, run_classify_finetune
from micromae.train.classify_data import load_labelled_crops

__all__ = ["METHODS", "stratified_splits", "fraction_subset", "summarize", "plot_data_efficiency",
           "run_evaluate_classification"]

METHODS = ("finetune", "linear", "knn")


def stratified_splits(labels: np.ndarray, folds: int = 10, test_size: float = 0.4,
                      seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``folds`` stratified (train, test) index pairs of ``labels (N,)``, sorted, disjoint, reproducible."""
    from sklearn.model_selection import StratifiedShuffleSplit

    labels = np.asarray(labels)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 1 or not 0 < test_size < 1:
        raise input_error("folds / test_size", "an integer >= 1 / a share in (0, 1)", f"{folds} / {test_size}",
                          "Use e.g. folds=10 test_size=0.4 (the paper's 60/40 splits)")
    classes, counts = np.unique(labels, return_counts=True)
    n_test = int(np.ceil(test_size * len(labels)))
    if counts.min() < 2 or n_test < len(classes) or len(labels) - n_test < len(classes):
        raise input_error("labelled crops", f"at least 2 crops per class and a test part of at least one per class "
                          f"({len(classes)} classes)", f"{dict(zip(classes.tolist(), counts.tolist()))} with "
                          f"{n_test} of {len(labels)} held out",
                          "Add crops (a split would leave a class without examples), or change test_size")
    splitter = StratifiedShuffleSplit(n_splits=int(folds), test_size=test_size, random_state=seed)
    splits = [(np.sort(tr), np.sort(te)) for tr, te in splitter.split(np.zeros(len(labels)), labels)]
    for tr, te in splits:
        if len(np.unique(labels[tr])) < len(classes) or len(np.unique(labels[te])) < len(classes):
            raise input_error("stratified split", "every class on both sides", "a class missing on one side",
                              "Add crops of the rare classes or change test_size")
    return splits


def fraction_subset(train: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 0,
                    fold: int = 0) -> np.ndarray:
    """The stratified, nested share ``fraction`` of the train indices ``train`` (module docstring, step 2)."""
    if not 0 < fraction <= 1:
        raise input_error("fraction of the training data", "a share in (0, 1]", repr(fraction), "Use e.g. 0.1 .. 1.0")
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, fold])
    keep = []
    for c in np.unique(labels[train]):
        members = train[labels[train] == c]
        members = members[rng.permutation(len(members))]
        keep.append(members[:max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(keep))


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean, std (over folds) of accuracy and error per (encoder, method, fraction), with per-fold values."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["encoder"], r["method"], r["fraction"]), []).append(r)
    rows = []
    for (encoder, method, fraction), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["fold"])
        acc = np.array([r["accuracy"] for r in rs])
        rows.append({"encoder": encoder, "method": method, "fraction": fraction,
                     "n_train": int(np.mean([r["n_train"] for r in rs])), "n_test": int(rs[0]["n_test"]),
                     "folds": len(rs), "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
                     "error_mean": float(1 - acc.mean()), "accuracy_per_fold": acc.round(4).tolist()})
    return rows


def plot_data_efficiency(summary: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy against the share of training data (%), one line per encoder and method, ± std error bars."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lines: dict[tuple[str, str], list] = {}
    for r in summary:
        lines.setdefault((r["encoder"], r["method"]), []).append(r)
    encoders = list(dict.fromkeys(e for e, _ in lines))
    styles = {"finetune": "-", "linear": "--", "knn": ":"}
    for (encoder, method), rs in lines.items():
        rs = sorted(rs, key=lambda r: r["fraction"])
        ax.errorbar([100 * r["fraction"] for r in rs], [r["accuracy_mean"] for r in rs],
                    yerr=[r["accuracy_std"] for r in rs], marker="o", capsize=3, label=f"{encoder} ({method})",
                    color=f"C{encoders.index(encoder)}", linestyle=styles.get(method, "-"))
    shares = sorted({100 * r["fraction"] for r in summary})
    if shares and shares[-1] / shares[0] >= 10:  # small shares would crowd the left edge
        ax.set_xscale("log")
        ax.set_xticks(shares, [f"{s:g}" for s in shares])
    ax.set_xlabel("training data used (% of the train part)")
    ax.set_ylabel("test accuracy (mean ± std over folds)")
    ax.set_title(title or "Classification accuracy vs amount of labelled data")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _markdown(summary: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    rows = [{"encoder": r["encoder"], "method": r["method"], "train share": f"{100 * r['fraction']:g}%",
             "train crops": r["n_train"], "folds": r["folds"],
             "accuracy": f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}", "error": f"{r['error_mean']:.3f}",
             "per fold": ", ".join(f"{a:.3f}" for a in r["accuracy_per_fold"])} for r in summary]
    s = settings
    return (f"# Cell classification\n\n{s['n_crops']} crops of {len(s['classes'])} classes from `{s['root']}`; "
            f"{s['folds']} stratified splits, {1 - s['test_size']:.0%} train / {s['test_size']:.0%} test "
            f"(seed {s['seed']}); chance {s['chance']:.3f}. Fine-tuning config: `{s['config']}` "
            f"{' '.join(s['overrides'])}; k-NN: k={s['k']}, {s['vote']} votes.\n\n"
            f"{markdown_table(rows)}\n\n![accuracy vs training data](accuracy_vs_fraction.png)\n")


def _write(path: Path, text: str) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)


class _Protocol:
    """State of one evaluation: config, crops per input side, finished records."""

    def __init__(self, config: str, overrides: Sequence[str], root: str | Path, out: Path, device: str) -> None:
        self.out, self.device = out, device
        self.base = load_classify_config(resolve_config(config), [*overrides, f"data.root={root}",
                                                                  f"train.device={device}"])
        self.crops: dict[int, Any] = {}
        self.log = out / "folds.jsonl"
        self.records = [json.loads(x) for x in self.log.read_text().splitlines() if x] if self.log.is_file() else []

    def cfg_for(self, init: str, branch: int, fold: int = 0):
        return apply_overrides(self.base, [f"init={init}", f"init_branch={branch}",
                                           f"train.seed={self.base.train.seed + fold}"])

    def encoder(self, init: str, branch: int, fold: int = 0):
        torch.manual_seed(self.base.train.seed + fold)
        return build_encoder(self.cfg_for(init, branch, fold))[0]

    def crops_at(self, size: int):
        if size not in self.crops:
            d = self.base.data
            self.crops[size] = load_labelled_crops(d.root, size, d.axes, d.channels, d.classes, d.normalize,
                                                   d.percentiles)
        return self.crops[size]

    def warn_normalize(self, name: str, init: str) -> None:
        """Say so when the crops are scaled otherwise than the encoder's pre-training images were."""
        d = self.base.data
        if init != "random" and checkpoint_normalize(init)[0] != d.normalize:
            say(f"warning: encoder '{name}' was trained with data.normalize={checkpoint_normalize(init)[0]}, the "
                f"crops are read with data.normalize={d.normalize} (set it with an override to match)")

    def done(self, key: tuple) -> bool:
        return any((r["encoder"], r["method"], r["fraction"], r["fold"]) == key for r in self.records)

    def add(self, record: dict) -> None:
        self.records.append(record)
        _write(self.log, "".join(json.dumps(r) + "\n" for r in self.records))

    def finetune(self, init: str, branch: int, fold: int, crops: Any, train: np.ndarray, test: np.ndarray,
                 run_dir: Path, keep_checkpoints: bool) -> float:
        cfg = self.cfg_for(init, branch, fold)
        batch = min(cfg.train.batch_size, len(train) - len(train) % 2)
        cfg = apply_overrides(cfg, [f"train.batch_size={batch}"])
        cfg.data.train_files = [crops.files[i] for i in train]
        cfg.data.test_files = [crops.files[i] for i in test]
        result = run_classify_finetune(cfg, run_dir, resume="auto", crops=crops)
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return float(result.test["accuracy"])


def run_evaluate_classification(checkpoints: Mapping[str, str], root: str | Path, out: str | Path,
                                config: str = "classify_tiny", overrides: Sequence[str] = (),
                                methods: Sequence[str] = ("finetune",), folds: int = 10, test_size: float = 0.4,
                                fractions: Sequence[float] = (1.0,), seed: int = 0, branch: int = 1, k: int = 20,
                                vote: str = "weighted", probe_epochs: int = 100, keep_checkpoints: bool = False,
                                device: str = "auto") -> dict[str, Any]:
    """Run the protocol (module docstring) for ``{name: checkpoint | .safetensors | "random"}`` on the crops of
    ``root/<class>/*.tif``; the fine-tuning recipe is ``config`` (path or preset) with ``overrides``.
    Returns ``{"settings", "summary", "records"}`` (also in ``out/results.json``)."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or not checkpoints:
        raise input_error("methods / checkpoints", f"methods among {METHODS} and at least one checkpoint",
                          f"{list(methods)} / {list(checkpoints)}", "e.g. methods=finetune,linear,knn")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    proto = _Protocol(config, overrides, root, out, device)
    settings = {"root": str(root), "config": str(config), "overrides": list(overrides), "folds": folds,
                "test_size": test_size, "fractions": sorted(fractions), "seed": seed, "branch": branch, "k": k,
                "vote": vote, "probe_epochs": probe_epochs, "checkpoints": dict(checkpoints), "methods": list(methods)}
    saved = out / "settings.json"
    if saved.is_file() and {k_: v for k_, v in json.loads(saved.read_text()).items() if k_ in settings} != settings:
        raise input_error(f"output folder '{out}'", "a new folder or one from the same evaluation settings",
                          "results of other settings", "Pass another --out, or delete the folder to start over")
    _write(saved, json.dumps(settings, indent=2))
    dev = resolve_device(device, option="--device")
    splits = None
    jobs = len(checkpoints) * len(methods) * folds * len(fractions)
    bar = tqdm(total=jobs, desc="classification protocol", unit="fold")
    for name, init in checkpoints.items():
        encoder = proto.encoder(init, branch)
        proto.warn_normalize(name, init)
        crops = proto.crops_at(encoder.img_size[0])
        check_channels(encoder, crops, init)
        if splits is None:  # the same files in the same order at every size: one set of splits for all
            splits = stratified_splits(crops.labels.numpy(), folds, test_size, seed)
        feats, feats_fold = None, None
        for method in methods:
            for fold, (train_all, test) in enumerate(splits):
                for fraction in sorted(fractions):
                    bar.update(1)
                    if proto.done((name, method, fraction, fold)):
                        continue
                    train = fraction_subset(train_all, crops.labels.numpy(), fraction, seed, fold)
                    if method == "finetune":
                        run_dir = out / "runs" / name.replace("/", "_") / f"fold{fold:02d}_frac{fraction:.3f}"
                        acc = proto.finetune(init, branch, fold, crops, train, test, run_dir, keep_checkpoints)
                    else:
                        if init == "random" and feats_fold != fold:  # a new random network per fold
                            encoder, feats = proto.encoder(init, branch, fold), None
                        if feats is None:
                            feats = extract_features(encoder, crops.images, device=dev).to(dev)
                            feats_fold = fold
                        y = crops.labels.to(dev)
                        tr, te = torch.as_tensor(train, device=dev), torch.as_tensor(test, device=dev)
                        if method == "linear":
                            pred = linear_probe(feats[tr], y[tr], feats[te], len(crops.classes), epochs=probe_epochs,
                                                seed=seed + fold)
                            acc = float((pred == y[te]).float().mean())
                        else:
                            acc = knn_probe(feats[tr], y[tr], feats[te], y[te], k=k, vote=vote,
                                            num_classes=len(crops.classes))
                    proto.add({"encoder": name, "method": method, "fraction": fraction, "fold": fold,
                               "accuracy": acc, "n_train": int(len(train)), "n_test": int(len(test))})
    bar.close()
    counts = np.bincount(crops.labels.numpy(), minlength=len(crops.classes))
    settings.update(n_crops=int(counts.sum()), classes=dict(zip(crops.classes, counts.tolist())),
                    chance=float(counts.max() / counts.sum()))
    _write(saved, json.dumps(settings, indent=2))
    keys = {(n, m, f, i) for n in checkpoints for m in methods for f in fractions for i in range(folds)}
    records = [r for r in proto.records if (r["encoder"], r["method"], r["fraction"], r["fold"]) in keys]
    summary = summarize(records)
    result = {"settings": settings, "summary": summary, "records": records}
    _write(out / "results.json", json.dumps(result, indent=2))
    _write(out / "results.md", _markdown(summary, settings))
    plot_data_efficiency(summary, out / "accuracy_vs_fraction.png")
    return result
