"""The napari dock widgets: Segment, Name clusters, Pre-train, Evaluate (magicgui containers).

Each widget collects its inputs, checks them (a clear message in the widget, nothing started, nothing
written) and runs the job of :mod:`micromae.napari.jobs` in a napari thread worker: the viewer stays
responsive, a progress bar follows the job's reports and Cancel stops it at its next report. The result
lands as a layer (or a table) and on disk when asked. ``busy``, ``result`` and ``error`` expose the last
run's state (for the tests and scripts).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
    create_widget,
)
from napari.qt.threading import create_worker

from micromae.errors import MicromaeInputError, input_error
from micromae.napari import jobs
from micromae.napari.reader import class_layer_kwargs, cluster_colours, label_colormap


class JobWidget(Container):
    """A container with Run / Cancel buttons, a progress bar and a status line, running one job at a time."""

    run_text = "Run"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.run_button = PushButton(text=self.run_text)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="")
        self.busy = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.worker: Any = None
        self._cancel = threading.Event()
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)

    def add_controls(self, *widgets: Any) -> None:
        self.extend([*widgets, self.run_button, self.cancel_button, self.progress, self.status])

    # -- to implement -------------------------------------------------------------------------------------
    def prepare(self) -> Callable[[jobs.Report], Any]:
        """Check the inputs (raise MicromaeInputError) and return the job ``job(report)``."""
        raise NotImplementedError

    def finish(self, result: Any) -> None:
        """Show ``result`` (main thread)."""

    # -- running -------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.status.value = text

    def start(self) -> None:
        """Check the inputs and start the job in a thread worker (a message instead on bad input)."""
        if self.busy:
            return
        self.error, self.result = None, None
        try:
            job = self.prepare()
        except MicromaeInputError as exc:
            self.error = exc
            self.say(f"error: {exc}")
            return
        self._cancel = threading.Event()
        self.busy = True
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.progress.max, self.progress.value = 0, 0  # indeterminate until the job reports a total
        self.worker = create_worker(jobs.stepped, job, self._cancel, _ignore_errors=True)  # errors: _on_errored
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def cancel(self) -> None:
        """Stop the running job at its next progress report."""
        if self.busy:
            self._cancel.set()
            self.say("cancelling ...")

    def _on_progress(self, event: jobs.Progress) -> None:
        if event.total > 0:
            self.progress.max, self.progress.value = event.total, min(event.done, event.total)
        if event.message:
            self.say(event.message)

    def _on_returned(self, result: Any) -> None:
        self.result = result
        try:
            self.finish(result)
        except MicromaeInputError as exc:
            self.error = exc
            self.say(f"error: {exc}")

    def _on_errored(self, exc: BaseException) -> None:
        self.error = exc
        if isinstance(exc, jobs.JobCancelled):
            self.say("cancelled")
        elif isinstance(exc, MicromaeInputError):
            self.say(f"error: {exc}")
        else:
            self.say(f"failed: {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self.busy = False
        self.run_button.enabled, self.cancel_button.enabled = True, False
        if self.progress.max == 0:
            self.progress.max = 1
        if self.error is None:
            self.progress.value = self.progress.max


def _level0(layer: Any) -> Any:
    """A layer's data at full resolution, unread (level 0 of a multiscale layer, as an OME-Zarr output opens)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def _full_resolution(layer: Any) -> np.ndarray:
    return np.asarray(_level0(layer))


def _rows(rows: list[list[Any]], columns: list[str]) -> dict[str, Any]:
    """A magicgui Table value of ``rows`` under ``columns``."""
    return {"data": rows, "index": list(range(len(rows))), "columns": columns}


def _path_or_none(text: str) -> Path | None:
    text = (text or "").strip()
    return Path(text).expanduser() if text else None


def _checkpoint(edit: FileEdit) -> Path:
    path = Path(edit.value) if edit.value else None
    if path is None or not path.is_file():
        raise input_error("checkpoint", "an existing checkpoint (.pt) or exported encoder (.safetensors)",
                          f"'{path}'" if path else "nothing", "Pick RUN_DIR/checkpoints/last.pt of a pre-training")
    return path


def _layer(combo: Any, kind: str) -> Any:
    layer = combo.value
    if layer is None:
        raise input_error(f"{kind} layer", f"a {kind} layer in the viewer", "none selected",
                          f"Open or add a {kind} layer and pick it")
    return layer


class SegmentWidget(JobWidget):
    """Segment an Image layer: k-means on the checkpoint's exact pixel embeddings (``micromae segment``)."""

    run_text = "Segment"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(viewer)
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.pt *.safetensors")
        self.k = SpinBox(label="k", min=2, max=255, value=6)
        self.mode = ComboBox(label="mode", choices=["exact", "fast"], value="exact")
        self.central_tokens = SpinBox(label="central tokens", min=0, max=64, value=0,
                                      tooltip="0: the default (4 in exact mode, half the grid in fast mode)")
        self.tri_planar = CheckBox(text="tri-planar (Z, Y and X fused; 3x the time)")
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.samples = SpinBox(label="samples", min=100, max=10_000_000, value=200_000,
                               tooltip="pixels sampled to fit k-means (as micromae segment --samples)")
        self.output = LineEdit(label="save to (.zarr)",
                               tooltip="optional: also write the segmentation there (NAME.ome.zarr: OME-Zarr)")
        self.add_controls(self.image, self.checkpoint, self.k, self.mode, self.central_tokens, self.tri_planar,
                          self.device, self.samples, self.output)

    def prepare(self) -> Callable[[jobs.Report], Any]:
        layer = _layer(self.image, "Image")
        checkpoint = _checkpoint(self.checkpoint)
        jobs.check_image(_level0(layer), layer.rgb, checkpoint)
        output = _path_or_none(self.output.value)
        if output is not None and output.exists():
            raise input_error("save to", "a path that does not exist yet", f"'{output}' exists",
                              "Choose another path, or leave it empty")
        data, scale = _full_resolution(layer), tuple(float(s) for s in layer.scale)
        kwargs = dict(checkpoint=checkpoint, k=int(self.k.value), mode=self.mode.value,
                      central_tokens=int(self.central_tokens.value) or None, tri_planar=bool(self.tri_planar.value),
                      device=self.device.value, output=output, scale=scale, n_samples=int(self.samples.value))
        self._source = layer
        return lambda report: jobs.segment_image(report, data, **kwargs)

    def finish(self, result: dict[str, Any]) -> None:
        k, layer = result["k"], self._source
        meta = {"k": k, "cluster_names": {}}
        if result["path"] is not None:
            meta.update(micromae_path=str(result["path"]), micromae_array="labels")
        self.viewer.add_labels(result["labels"], name=f"{layer.name} k={k}", scale=layer.scale,
                               translate=layer.translate, colormap=label_colormap(cluster_colours(k), k),
                               metadata=meta)
        saved = f", saved to {result['path']}" if result["path"] is not None else ""
        self.say(f"done: {k} clusters{saved}")


class NameClustersWidget(JobWidget):
    """Give each cluster of a Labels layer a class name (several clusters may share one): a new Labels layer
    of classes, saved back into the segmentation file the layer came from."""

    run_text = "Apply names"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(viewer)
        self.labels = create_widget(annotation=napari.layers.Labels, label="clusters")
        self.table = Table(value=[], columns=["cluster", "class"])
        self.labels.changed.connect(self.fill)
        self.add_controls(self.labels, self.table)
        self.fill()

    def fill(self, *_: Any) -> None:
        """One row per cluster of the chosen layer, with the names saved before."""
        layer = self.labels.value
        if layer is None:
            self.table.value = _rows([], ["cluster", "class"])
            return
        k = int(layer.metadata.get("k") or int(_full_resolution(layer).max()) + 1)
        known = {int(c): n for c, n in (layer.metadata.get("cluster_names") or {}).items()}
        self.table.value = _rows([[i, known.get(i, "")] for i in range(k)], ["cluster", "class"])

    def names(self) -> dict[int, str]:
        """Cluster id → class name as typed in the table."""
        columns = self.table.to_dict("list")
        return {int(c): str(n or "") for c, n in zip(columns["cluster"], columns["class"])}

    def prepare(self) -> Callable[[jobs.Report], Any]:
        layer = _layer(self.labels, "Labels")
        names = self.names()
        if not any(n.strip() for n in names.values()):
            raise input_error("class names", "a name for at least one cluster", "none",
                              "Type class names in the table's second column")
        data, meta = _full_resolution(layer), dict(layer.metadata)
        self._source = layer

        def job(report: jobs.Report) -> dict[str, Any]:
            report(0, 2, "naming clusters")
            classes, class_names = jobs.name_clusters(data, names)
            path = None
            if meta.get("micromae_path") and meta.get("micromae_array"):
                report(1, 2, f"saving to {meta['micromae_path']}")
                path = jobs.save_classes(meta["micromae_path"], meta["micromae_array"], classes, class_names, names)
            report(2, 2)
            return {"classes": classes, "class_names": class_names, "path": path, "names": names}

        return job

    def finish(self, result: dict[str, Any]) -> None:
        layer = self._source
        layer.metadata["cluster_names"] = {str(c): n for c, n in result["names"].items() if n.strip()}
        name = f"{layer.name.rsplit(' k=', 1)[0]} classes"
        meta = {"class_names": result["class_names"], "named_from": layer.name}
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.viewer.add_labels(result["classes"], name=name, scale=layer.scale, translate=layer.translate,
                               metadata=meta, **class_layer_kwargs(result["class_names"]))
        saved = f"; saved in {result['path']}" if result["path"] is not None else " (layer not read from a file)"
        self.say(f"{len(result['class_names']) - 1} classes{saved}")


class PretrainWidget(JobWidget):
    """A short MAESTER pre-training on an Image layer, showing the loss; writes a run folder."""

    run_text = "Pre-train"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(viewer)
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        presets = jobs.pretrain_presets()
        self.preset = ComboBox(label="preset", choices=presets, value="maester_tiny" if "maester_tiny" in presets
                               else presets[0])
        self.steps = SpinBox(label="steps", min=1, max=1_000_000, value=200)
        self.run_dir = LineEdit(label="run folder", value=str(Path("runs") / "napari"))
        self.loss = Label(label="loss", value="")
        self.losses: list[float] = []
        self.add_controls(self.image, self.preset, self.steps, self.run_dir, self.loss)

    def prepare(self) -> Callable[[jobs.Report], Any]:
        layer = _layer(self.image, "Image")
        if layer.rgb:
            raise input_error("Image layer", "one channel", f"an RGB layer of shape {tuple(layer.data.shape)}",
                              "Split the channels (right click > Split RGB) and pick one")
        run_dir = _path_or_none(self.run_dir.value)
        if run_dir is None:
            raise input_error("run folder", "a folder to write the run to", "nothing", "Type a folder name")
        jobs.check_run_dir(run_dir)
        data, preset, steps = _full_resolution(layer), self.preset.value, int(self.steps.value)
        self.losses: list[float] = []
        return lambda report: jobs.pretrain_image(report, data, run_dir, preset=preset, steps=steps)

    def _on_progress(self, event: jobs.Progress) -> None:
        super()._on_progress(event)
        if "loss" in event.values:
            self.losses.append(event.values["loss"])
            first = self.losses[0]
            self.loss.value = f"{event.values['loss']:.4f} (first {first:.4f})"

    def finish(self, result: dict[str, Any]) -> None:
        self.say(f"step {result['step']}, loss {result['loss']:.4f}; checkpoint {result['checkpoint']}")


class EvaluateWidget(JobWidget):
    """Dice per class of a segmentation Labels layer against a reference Labels layer (clusters matched to
    classes by Hungarian matching, leftovers merged, as ``micromae evaluate segmentation``)."""

    run_text = "Evaluate"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(viewer)
        self.prediction = create_widget(annotation=napari.layers.Labels, label="segmentation")
        self.reference = create_widget(annotation=napari.layers.Labels, label="reference")
        self.mapping = ComboBox(label="mapping", choices=["hungarian", "majority"], value="hungarian")
        self.table = Table(value=[], columns=["class", "Dice"])
        self.add_controls(self.prediction, self.reference, self.mapping, self.table)

    @staticmethod
    def _class_names(layer: Any) -> list[str] | None:
        names = layer.metadata.get("class_names")
        if names:
            return list(names)
        features = getattr(layer, "features", None)
        if features is not None and "class" in features and "index" in features:
            return [str(c) for c in features.sort_values("index")["class"]]
        return None

    def prepare(self) -> Callable[[jobs.Report], Any]:
        pred, ref = _layer(self.prediction, "segmentation Labels"), _layer(self.reference, "reference Labels")
        p, r = _full_resolution(pred), _full_resolution(ref)
        if p.shape != r.shape:
            raise input_error("reference Labels layer", f"the segmentation's shape {p.shape}",
                              f"shape {r.shape} ('{ref.name}')", "Pick a reference of the same size")
        names, mapping = self._class_names(ref), self.mapping.value

        def job(report: jobs.Report) -> dict[str, Any]:
            report(0, 1, "scoring")
            result = jobs.evaluate_labels(p, r, names)
            return {"result": result, "mapping": mapping}

        return job

    def finish(self, result: dict[str, Any]) -> None:
        rows = jobs.dice_rows(result["result"], result["mapping"])
        self.table.value = _rows([[n, None if d is None else round(d, 4)] for n, d in rows], ["class", "Dice"])
        mean = result["result"][result["mapping"]]["scores"]["mean_dice"]
        self.say(f"mean Dice {mean:.3f} ({result['mapping']})" if mean is not None else "no reference class")
