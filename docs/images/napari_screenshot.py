"""Make docs/images/napari_plugin.png, the README's screenshot of the napari plugin, as a user would.

A 150-step pre-training of ``maester_tiny`` on the synthetic EM volume (the plugin's sample data), then the
Segment widget on an 8-slice volume (k = 6) and the clusters named in the Name clusters widget, in a real
viewer. About 3 minutes on 2 idle CPU cores (12 on a loaded one). Needs the napari extra and a display (``xvfb-run -a python ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from micromae.data.synthetic_em import make_em_volume
from micromae.napari import jobs
from micromae.napari.widgets import NameClustersWidget, SegmentWidget

OUT = Path(__file__).with_name("napari_plugin.png")


def wait(widget) -> None:
    while widget.busy:
        QApplication.processEvents()
    if widget.error is not None:
        sys.exit(f"{type(widget).__name__}: {widget.status.value}")


def main(work: Path = Path("runs/napari_screenshot")) -> None:
    if not (work / "run" / "checkpoints" / "last.pt").exists():
        train = make_em_volume(shape=(32, 160, 160), seed=0).image
        jobs.pretrain_image(lambda *a, **k: None, train, work / "run", preset="maester_tiny", steps=150)
    vol = make_em_volume(shape=(8, 192, 192), seed=1)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 820)
    viewer.add_image(vol.image, name="synthetic EM")
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment (micromae)")
    seg.reset_choices()
    seg.checkpoint.value = work / "run" / "checkpoints" / "last.pt"
    seg.k.value, seg.device.value, seg.samples.value = 6, "cpu", 50_000
    seg.start()
    wait(seg)
    names = NameClustersWidget(viewer)
    viewer.window.add_dock_widget(names, name="Name clusters (micromae)", tabify=True)
    names.reset_choices()
    names.labels.value = viewer.layers["synthetic EM k=6"]
    viewer.layers["synthetic EM k=6"].opacity = 0.45
    viewer.dims.set_point(0, 4)
    viewer.window._qt_window.show()
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(str(OUT), canvas_only=False, flash=False)
    print(f"wrote {OUT}")
    viewer.close()


if __name__ == "__main__":
    main()
