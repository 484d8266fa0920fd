"""What the napari widgets run, without Qt: each job is a plain function of arrays and paths, with a
``report`` callback for progress, so the widgets only collect inputs, start :func:`stepped` in a napari
thread worker and show the result.

- :func:`segment_image`: ``micromae segment`` on an Image layer's array (the same :func:`run_segment`), the
  labels read back; written to ``output`` when given (with the image and its scale, so the reader shows
  both), else to a temporary folder that is removed.
- :func:`name_clusters` / :func:`save_classes`: clusters → named classes, saved back into the group.
- :func:`pretrain_image`: a short pre-training on an Image layer's array, reporting step and loss.
- :func:`evaluate_labels`: Dice per class of a Labels layer against a reference Labels layer.

Cancelling: :func:`stepped` runs the job in a thread; setting its ``cancel`` event (or closing the
generator) makes the next ``report`` call raise :class:`JobCancelled` inside the job, which stops it where
the code below can leave things clean (a segmentation keeps only its ``.partial`` folder, to resume; a pre-training
keeps its last checkpoint).
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Sequence

import numpy as np
import zarr

from micromae.config import PretrainConfig, apply_overrides, load_config, resolve_config
from micromae.errors import input_error
from micromae.evaluate.classes import run_label_clusters
from micromae.evaluate.metrics import contingency, evaluate_table
from micromae.io import omezarr, write_array
from micromae.models.pretrained import read_encoder_weights
from micromae.segment.pipeline import run_segment
from micromae.segment.volume import SegmentSettings
from micromae.train.pretrain import build_pretrain_run, check_pretrain_config
from micromae.train.run import run_training

Report = Callable[..., None]


class JobCancelled(Exception):
    """Raised inside a job by its ``report`` callback once the user cancelled it."""


@dataclass
class Progress:
    """One progress event of a job: ``done`` of ``total`` (0 when unknown) and a line to show."""

    done: int
    total: int
    message: str = ""
    values: dict[str, float] = field(default_factory=dict)


def stepped(job: Callable[[Report], Any], cancel: threading.Event | None = None,
            poll_s: float = 0.05) -> Generator[Progress, None, Any]:
    """Run ``job(report)`` in a thread and yield each :class:`Progress` it reports; return its value.

    ``report(done, total, message="", **values)`` queues an event. Once ``cancel`` is set (the widget's
    Cancel button), or the generator is closed before the job ends, the job's next ``report`` raises
    :class:`JobCancelled`, which this generator raises in turn once the thread has ended. An exception in
    the job is raised again here, in the consumer's thread.
    """
    events: queue.Queue[Progress] = queue.Queue()
    cancel = cancel if cancel is not None else threading.Event()
    outcome: dict[str, Any] = {}

    def report(done: int, total: int, message: str = "", **values: float) -> None:
        if cancel.is_set():
            raise JobCancelled("cancelled")
        events.put(Progress(int(done), int(total), message, {k: float(v) for k, v in values.items()}))

    def target() -> None:
        try:
            outcome["value"] = job(report)
        except BaseException as exc:  # noqa: B036 - handed to the consumer's thread, raised there
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="micromae-job", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not events.empty():
            try:
                yield events.get(timeout=poll_s)
            except queue.Empty:
                continue
    finally:
        cancel.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# ------------------------------------------------------------------------------------------------------------
# Segment


def image_channels(data: Any, rgb: bool = False) -> int:
    """Channels of an Image layer's data: the last axis of an RGB(A) layer, else 1 (napari keeps channels
    of other images in separate layers)."""
    return int(np.shape(data)[-1]) if rgb else 1


def check_image(data: Any, rgb: bool, checkpoint: str | Path) -> int:
    """Raise a clear error unless the Image layer fits the checkpoint's encoder; returns ``in_chans``.

    A MAESTER encoder reads one channel: a 2-D image (Y, X) or a volume (Z, Y, X).
    """
    _, meta = read_encoder_weights(checkpoint)
    in_chans = int(meta.fields["in_chans"])
    found = image_channels(data, rgb)
    if found != in_chans:
        raise input_error("Image layer", f"{in_chans} channel(s), as the checkpoint's encoder was trained on",
                          f"{found} channels (shape {tuple(np.shape(data))}{', RGB' if rgb else ''})",
                          "Pick a one-channel layer (split channels with right click > Split RGB)")
    ndim = len(np.shape(data)) - (1 if rgb else 0)
    if ndim not in (2, 3):
        raise input_error("Image layer", "a 2-D image (Y, X) or a volume (Z, Y, X)",
                          f"{ndim} dimensions (shape {tuple(np.shape(data))})",
                          "Pick one time point or channel (a layer with 2 or 3 dimensions)")
    return in_chans


def segment_image(report: Report, image: Any, checkpoint: str | Path, k: int = 6, mode: str = "exact",
                  central_tokens: int | None = None, tri_planar: bool = False, device: str = "auto",
                  output: str | Path | None = None, scale: Sequence[float] | None = None,
                  n_samples: int = 200_000, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """``micromae segment`` on an in-memory image (Y, X) or volume (Z, Y, X).

    Returns ``{"labels": (Z, Y, X) or (Y, X) uint array, "k": k, "path": the group or None, "attrs": the
    group's attributes}``. With ``output`` the group stays there and also holds ``image`` and ``scale`` (an
    ``.ome.zarr`` output: the image copy, and the layer's scale as voxel size unless it is all ones).
    """
    arr = np.asarray(image)
    volume = arr[None] if arr.ndim == 2 else arr
    if output is not None and Path(output).exists() and not overwrite:
        raise input_error("output", "a path that does not exist yet", f"'{output}' exists",
                          "Choose another output path, or leave it empty to keep the labels in napari only")
    settings = SegmentSettings(central_tokens=central_tokens or None, mode=mode,
                               axes=(0, 1, 2) if tri_planar else (0,))
    tmp = None if output is not None else Path(tempfile.mkdtemp(prefix="micromae-napari-"))
    target = Path(output) if output is not None else tmp / "seg.zarr"
    try:
        report(0, 0, "fitting k-means on sampled pixel embeddings")
        full = None if scale is None else [1.0] * (3 - len(scale)) + [float(s) for s in scale]
        voxel_size = full if omezarr.is_ome_path(target) and full and any(v != 1.0 for v in full) else None
        out = run_segment(checkpoint, volume, target, k=k, settings=settings, n_samples=n_samples, seed=seed,
                          device=device, overwrite=overwrite, voxel_size=voxel_size,
                          on_progress=lambda done, total: report(done, total, f"plane {done} of {total}"))
        group = zarr.open_group(store=str(out), mode="a")
        labels = np.asarray(omezarr.label_arrays(group)["main"][:])
        if output is not None and not omezarr.is_ome_path(out):  # OME-Zarr: the image and voxel size are in
            group.create_array("image", data=volume, overwrite=True)
            if full is not None:
                group.attrs["scale"] = full
        attrs = dict(group.attrs)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"labels": labels[0] if arr.ndim == 2 else labels, "k": k, "path": None if tmp else out,
            "attrs": attrs}


# ------------------------------------------------------------------------------------------------------------
# Name clusters


def name_clusters(labels: Any, names: dict[int, str]) -> tuple[np.ndarray, list[str]]:
    """Cluster ids → class ids by name: ``names`` maps cluster id → class name (several clusters may share
    one; blank names stay unnamed). Returns the class volume (0 = unnamed, 1..n in order of first naming)
    and ``["unnamed", name_1, ..., name_n]``."""
    labels = np.asarray(labels)
    classes = ["unnamed"]
    lut = np.zeros(int(max([labels.max(initial=0), *names.keys()])) + 1, dtype=np.int64)
    for cluster, name in sorted(names.items()):
        name = (name or "").strip()
        if not name:
            continue
        if name == "unnamed":
            raise input_error(f"name of cluster {cluster}", "a class name other than 'unnamed'", repr(name),
                              "Leave the name blank to keep the cluster unnamed")
        if name not in classes:
            classes.append(name)
        lut[int(cluster)] = classes.index(name)
    if labels.min(initial=0) < 0:
        raise input_error("Labels layer", "cluster ids >= 0", f"minimum {labels.min()}", "Pick a cluster layer")
    dtype = np.uint8 if len(classes) <= 255 else np.uint16
    return lut[labels].astype(dtype), classes


def save_classes(path: str | Path, source_array: str, classes: np.ndarray, class_names: list[str],
                 names: dict[int, str]) -> Path:
    """Store ``classes`` in the group at ``path`` (array ``classes``, attributes ``class_names``,
    ``cluster_names`` per cluster array and ``classes_from``); the array is written beside the group's
    arrays under a temporary name and renamed, so a failure never leaves half a ``classes``."""
    path = Path(path)
    group = zarr.open_group(store=str(path), mode="a")
    if omezarr.is_ome_segmentation(group):  # OME-Zarr: the class label image of micromae label-clusters
        label = source_array.split("/")[1] if source_array.startswith("labels/") else omezarr.MAIN_LABELS
        k = int(label[len(omezarr.MAIN_LABELS) + 2:]) if label != omezarr.MAIN_LABELS else None
        named = {int(c): n.strip() for c, n in names.items() if (n or "").strip()}
        return run_label_clusters(path, names=named, k=k)
    if source_array not in group.array_keys():
        raise input_error(f"segmentation '{path}'", f"an array '{source_array}'",
                          f"arrays {sorted(group.array_keys())}", "Name the clusters of a layer read from this file")
    if tuple(group[source_array].shape) != tuple(classes.shape):
        raise input_error("classes", f"the shape of '{source_array}' {tuple(group[source_array].shape)}",
                          f"shape {tuple(classes.shape)}", "Name the clusters of the layer read from this file")
    tmp = path / "classes.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    zarr.create_array(store=str(tmp), data=classes, chunks=group[source_array].chunks, zarr_format=3)
    shutil.rmtree(path / "classes", ignore_errors=True)
    tmp.rename(path / "classes")
    cluster_names = dict(group.attrs.get("cluster_names", {}))
    cluster_names[source_array] = {str(c): n for c, n in sorted(names.items()) if (n or "").strip()}
    group.attrs.update({"class_names": class_names, "cluster_names": cluster_names, "classes_from": source_array})
    return path / "classes"


# ------------------------------------------------------------------------------------------------------------
# Pre-train


def pretrain_presets() -> list[str]:
    """Presets that pre-train a one-channel MAESTER model (the Pre-train widget's choices)."""
    from micromae.config import list_presets

    return [p for p in list_presets() if p.startswith("maester_")]


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` unless it already holds a run (a pre-training never overwrites one)."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise input_error("run folder", "a new or empty folder", f"'{run_dir}' holds a run",
                          "Choose another run folder")
    return run_dir


def pretrain_image(report: Report, image: Any, run_dir: str | Path, preset: str = "maester_tiny",
                   steps: int = 100, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Pre-train ``preset`` for ``steps`` on an image (Y, X) or volume (Z, Y, X); ``report(step, steps,
    loss=...)`` after every optimiser step. Writes the image to ``run_dir/data/image.tif`` and a normal run
    folder (config.yaml, log.jsonl, checkpoints/, figures/). Returns ``{"checkpoint", "step", "loss",
    "losses"}``."""
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise input_error("Image layer", "a 2-D image or a 3-D volume", f"shape {arr.shape}",
                          "Pick a one-channel layer")
    run_dir = check_run_dir(run_dir)
    if steps < 1:
        raise input_error("steps", "at least 1", str(steps), "Raise the number of steps")
    axes = "YX" if arr.ndim == 2 else "ZYX"
    data_path = run_dir / "data" / "image.tif"
    cfg = load_config(resolve_config(preset), PretrainConfig, [f"train.steps={steps}", *overrides])
    planes = "[YX]" if arr.ndim == 2 or arr.shape[0] < cfg.model.img_size else "[YX,ZX,ZY]"
    cfg = apply_overrides(cfg, ["data.source=files", f"data.paths=[{data_path}]", f"data.axes={axes}",
                                f"data.planes={planes}", "train.log_every=1"])
    check_pretrain_config(cfg)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    if not data_path.exists():
        write_array(data_path, arr, axes=axes)
    losses: list[float] = []

    def build(ctx):
        plan = build_pretrain_run(cfg, ctx)
        objective = plan.objective
        loss_of, after_step = objective.loss, objective.after_step

        def loss(module, batch):  # the engine calls objective.loss(module, batch)
            value, logs = loss_of(module, batch)
            losses.append(float(value.detach()))
            return value, logs

        def after(step: int) -> None:
            after_step(step)
            report(step + 1, cfg.train.steps, f"step {step + 1} of {cfg.train.steps}: loss {losses[-1]:.4f}",
                   loss=losses[-1])

        objective.loss, objective.after_step = loss, after
        return plan

    result = run_training(cfg, run_dir, None, None, check_pretrain_config, build)
    return {"checkpoint": result.checkpoint, "step": result.step, "loss": result.last_loss, "losses": losses}


# ------------------------------------------------------------------------------------------------------------
# Evaluate


def evaluate_labels(pred: Any, reference: Any, class_names: Sequence[str] | None = None,
                    ignore: Sequence[str] = ()) -> dict[str, Any]:
    """Clusters (or classes) of ``pred`` against reference classes: :func:`evaluate_table` (Hungarian and
    majority mappings, Dice per class), after checking that both layers have one shape."""
    pred, reference = np.asarray(pred), np.asarray(reference)
    if pred.shape != reference.shape:
        raise input_error("reference Labels layer", f"the segmentation's shape {pred.shape}",
                          f"shape {reference.shape}", "Pick a reference of the same size as the segmentation")
    table = contingency(pred, reference)
    names = list(class_names) if class_names else None
    if names is not None and len(names) < table.shape[1]:
        names = None
    return evaluate_table(table, names, ignore)


def dice_rows(result: dict[str, Any], mapping: str = "hungarian") -> list[tuple[str, float | None]]:
    """``(class, Dice)`` for each reference class present, from :func:`evaluate_labels`'s result."""
    per_class = result[mapping]["scores"]["per_class"]
    return [(name, v["dice"]) for name, v in per_class.items() if v["n_ref"] > 0]

