"""``micromae export-bioimageio``: bioimage.io model packages of a MAESTER segmenter or a cell classifier."""

from __future__ import annotations

import argparse

# micromae.export (torch, bioimageio.spec) is imported inside the verb: `micromae --help` stays fast


def cmd_export_bioimageio(args: argparse.Namespace) -> int:
    from micromae.export.bioimageio import PackageInfo, export_classifier, export_segmenter

    info = None
    if args.name or args.author or args.license or args.description:
        kind = "MAESTER segmenter" if args.what == "segmenter" else "cell classifier"
        info = PackageInfo(name=args.name or f"micromae {kind}",
                           description=args.description or f"A micromae {kind}.",
                           authors=args.author or (), license=args.license or "MIT")
    if args.what == "segmenter":
        out = export_segmenter(args.checkpoint, args.centres, args.input, args.output, info=info, axes=args.axes,
                               key=args.key, test_size=args.test_size, overwrite=args.overwrite)
    else:
        out = export_classifier(args.checkpoint, args.input, args.output, info=info, axes=args.axes,
                                overwrite=args.overwrite)
    print(f"wrote {out}; check it with: bioimageio test {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export-bioimageio`` (``segmenter`` and ``classifier``) to the top-level sub-parsers."""
    p = sub.add_parser("export-bioimageio", help="write a bioimage.io model package (segmenter or classifier)",
                       description="Write a bioimage.io model package (format 0.5 zip: rdf.yaml, weights, test "
                                   "tensors, cover, documentation) that bioimage.io tools run. Needs "
                                   "pip install 'micromae[bioimageio]'.")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    q = what.add_parser("segmenter", help="MAESTER: encoder + k-means centres -> cluster labels and embeddings",
                        description="Package a pre-training checkpoint with its k-means centres (micromae "
                                    "cluster): input a one-channel image, outputs the cluster labels and the "
                                    "exact pixel embeddings of every pixel.")
    q.add_argument("--checkpoint", required=True, help="pre-training checkpoint (RUN_DIR/checkpoints/last.pt)")
    q.add_argument("--centres", help="k-means centres of this checkpoint (.npz from micromae cluster)")
    q.add_argument("--input", required=True, help="image or volume the test input is cut from")
    q.add_argument("--axes", help="dimension order of the input, e.g. ZYX")
    q.add_argument("--key", help="HDF5 dataset or Zarr array inside the input file")
    q.add_argument("--test-size", type=int, default=64, help="side of the test image in pixels (default 64)")
    r = what.add_parser("classifier", help="fine-tuned cell classifier: crop -> class probabilities",
                        description="Package a classification fine-tuning checkpoint: input single-cell crops "
                                    "at the training crop size, output the class probabilities.")
    r.add_argument("--checkpoint", required=True, help="fine-tuning checkpoint (micromae finetune classify_*)")
    r.add_argument("--input", required=True, help="one single-cell crop (multi-channel TIFF) for the test input")
    r.add_argument("--axes", help="dimension order of the crop, e.g. CYX (default: metadata, then the run's)")
    for q_ in (q, r):
        q_.add_argument("--output", required=True, help="the package to write (.zip)")
        q_.add_argument("--name", help="model name shown by bioimage.io tools")
        q_.add_argument("--description", help="one-line description")
        q_.add_argument("--author", action="append", help="an author's name (repeat for several; default: you)")
        q_.add_argument("--license", help="SPDX license id of the weights (default MIT)")
        q_.add_argument("--overwrite", action="store_true", help="replace an existing package")
        q_.set_defaults(func=cmd_export_bioimageio)
