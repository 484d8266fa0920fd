"""Segmentation report: ``metrics.json`` (the full result of ``evaluate_segmentation``) and a Markdown ``report.md``.

Both files are written atomically, so an interrupted run never leaves half a report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from micromae.errors import input_error
from micromae.io import atomic_path

MAPPINGS = ("hungarian", "majority")


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any] | Sequence[Any]], headers: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table. rows: dicts (headers default to the first row's keys) or sequences."""
    rows = list(rows)
    if headers is None:
        if not rows or not isinstance(rows[0], Mapping):
            raise input_error("markdown_table headers", "headers, or rows given as dicts", "neither",
                              "Pass headers=[...]")
        headers = list(rows[0].keys())
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row.get(h) for h in headers] if isinstance(row, Mapping) else list(row)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _summary_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for key in MAPPINGS:
        s = result[key]["scores"]
        rows.append([key, s["mean_dice"], s["mean_iou"], s["pixel_accuracy"], s["ari"], s["nmi"]])
    rows.append(["raw clusters", None, None, None, result["clusters"]["ari"], result["clusters"]["nmi"]])
    return rows


def _per_class_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    ignored = set(result.get("ignore_classes", ()))
    rows = []
    for name in result["class_names"]:
        h = result["hungarian"]["scores"]["per_class"][name]
        m = result["majority"]["scores"]["per_class"][name]
        if h["n_ref"] == 0 and h["n_pred"] == 0 and m["n_pred"] == 0:
            continue
        label = f"{name} (ignored in means)" if name in ignored else name
        rows.append([label, h["n_ref"], h["dice"], h["iou"], m["dice"], m["iou"]])
    return rows


def _mapping_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    sizes = result.get("cluster_sizes", [None] * result["n_clusters"])
    return [[i, sizes[i], result["hungarian"]["mapping_names"][i], result["majority"]["mapping_names"][i]]
            for i in range(result["n_clusters"])]


def _figure_lines(figures: Mapping[str, str | os.PathLike] | None, out_dir: Path) -> list[str]:
    lines = []
    for name, fig in (figures or {}).items():
        rel = Path(os.path.relpath(Path(fig).resolve(), out_dir.resolve())).as_posix()
        lines += [f"### {name}", "", f"![{name}]({rel})", ""]
    return lines


def render_report(result: Mapping[str, Any], title: str, out_dir: Path,
                  figures: Mapping[str, str | os.PathLike] | None = None,
                  sweep_rows: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The Markdown text of :func:`write_segmentation_report`."""
    where = "inside the mask" if result.get("masked") else "over all voxels"
    lines = [f"# {title}", "",
             f"{result['n_clusters']} clusters scored against {len(result['class_names'])} reference classes "
             f"on {result['n_voxels']} voxels {where}. Means run over the reference classes present"
             + (f", without {', '.join(result['ignore_classes'])}." if result.get("ignore_classes") else "."), "",
             "## Summary", "",
             markdown_table(_summary_rows(result),
                            ["mapping", "mean Dice", "mean IoU", "pixel accuracy", "ARI", "NMI"]),
             "", "## Per class", "",
             markdown_table(_per_class_rows(result), ["class", "reference voxels", "Dice (Hungarian)",
                                                      "IoU (Hungarian)", "Dice (majority)", "IoU (majority)"]),
             "", "## Cluster → class mapping", "",
             "Hungarian: one-to-one matching on the Dice matrix, leftover clusters merged into the class they "
             "overlap most. Majority: each cluster to the class it overlaps most.", "",
             markdown_table(_mapping_rows(result), ["cluster", "voxels", "Hungarian", "majority"]), ""]
    for key in MAPPINGS:
        missing = result[key].get("classes_without_cluster") or []
        if missing:
            lines += [f"**{key}: no cluster for {', '.join(missing)}** (fewer clusters than classes, or "
                      "no cluster overlaps them most); their Dice is 0.", ""]
    if sweep_rows:
        lines += ["## k sweep", "", markdown_table(sweep_rows), ""]
    fig_lines = _figure_lines(figures, out_dir)
    if fig_lines:
        lines += ["## Figures", "", *fig_lines]
    return "\n".join(lines).rstrip() + "\n"


def write_segmentation_report(result: Mapping[str, Any], out_dir: str | os.PathLike,
                              title: str = "Segmentation evaluation",
                              figures: Mapping[str, str | os.PathLike] | None = None,
                              sweep_rows: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Path]:
    """Write ``out_dir/metrics.json`` and ``out_dir/report.md`` (figures linked by relative path).

    result: from :func:`micromae.evaluate.metrics.evaluate_segmentation`; figures: {caption: PNG path};
    sweep_rows: from ``sweep_k_table`` (adds a k-sweep table). Returns {"metrics": path, "report": path}.
    """
    missing = [k for k in ("class_names", "n_clusters", "clusters", *MAPPINGS) if k not in result]
    if missing:
        raise input_error("segmentation result", "the dict returned by evaluate_segmentation()",
                          f"a dict without {missing}", "Pass the evaluation result unchanged")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(result)
    if sweep_rows:
        payload["k_sweep"] = list(sweep_rows)
    metrics = _write_text(out_dir / "metrics.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    report = _write_text(out_dir / "report.md", render_report(result, title, out_dir, figures, sweep_rows))
    return {"metrics": metrics, "report": report}
