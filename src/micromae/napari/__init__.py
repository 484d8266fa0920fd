"""The napari plugin (``pip install "micromae[napari]"``): a reader for ``micromae segment`` output, the
Segment / Name clusters / Pre-train / Evaluate widgets and sample data, declared in ``napari.yaml`` (npe2).

Importing this package loads neither napari nor Qt: :mod:`micromae.napari.reader`,
:mod:`micromae.napari.jobs` and :mod:`micromae.napari.samples` work without them;
:mod:`micromae.napari.widgets` needs the extra.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = Path(__file__).with_name("napari.yaml")
