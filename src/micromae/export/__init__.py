"""Exports of trained models to other tools' formats: :mod:`micromae.export.bioimageio` (bioimage.io model
packages, ``pip install "micromae[bioimageio]"``)."""
