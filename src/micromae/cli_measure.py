"""Command-line verbs on a finished OME-Zarr segmentation: `micromae label-clusters`, `micromae measure`."""

from __future__ import annotations

import argparse

# micromae.evaluate (scipy, scikit-image) is imported inside the verbs: `micromae --help` stays fast


def cmd_label_clusters(args: argparse.Namespace) -> int:
    from micromae.evaluate.classes import run_label_clusters

    path = run_label_clusters(args.seg, names=args.names, from_report=args.from_report, mapping=args.mapping,
                              k=args.k)
    print(f"wrote named classes to {path}")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from micromae.evaluate.measure import run_measure

    paths = run_measure(args.seg, args.out, cells=args.cells, slab=args.slab, overwrite=args.overwrite)
    print(f"wrote {paths['instances']} and {paths['summary']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``label-clusters`` and ``measure`` to the top-level sub-parsers."""
    p = sub.add_parser("label-clusters", help="name the clusters of an OME-Zarr segmentation (class labels)",
                       description="Write labels/classes into a micromae segment OME-Zarr output: 0 for unnamed "
                                   "clusters, 1..n for the named classes (several clusters may map to one), with "
                                   "names and colours in its image-label metadata. Example: micromae "
                                   "label-clusters seg.ome.zarr --names 0=cytoplasm,3=nucleus,4=mitochondria")
    p.add_argument("seg", help="the OME-Zarr output of micromae segment (NAME.ome.zarr)")
    p.add_argument("--names", help="CLUSTER=NAME entries separated by commas, e.g. 0=cytoplasm,3=nucleus,5=nucleus")
    p.add_argument("--from-report", metavar="METRICS_JSON",
                   help="take the mapping micromae evaluate segmentation found (report/metrics.json)")
    p.add_argument("--mapping", default="hungarian", choices=("hungarian", "majority"),
                   help="which mapping of the report (default hungarian)")
    p.add_argument("--k", type=int, default=None, help="name the clusters of this k of a sweep (default: main k)")
    p.set_defaults(func=cmd_label_clusters)

    p = sub.add_parser("measure", help="measure the instances of each named class (CSV)",
                       description="Split each named class of an OME-Zarr segmentation into 3-D connected "
                                   "instances (26-connectivity, streamed by Z slabs) and write one CSV row per "
                                   "instance (class, id, voxels, volume, surface area, bounding box, centroid, "
                                   "cell) plus <stem>_summary.csv per class. Example: micromae measure "
                                   "seg.ome.zarr --out organelles.csv --cells cell_mask.tif")
    p.add_argument("seg", help="an OME-Zarr segmentation with named classes (micromae label-clusters)")
    p.add_argument("--out", required=True, help="instances CSV (the summary goes beside it)")
    p.add_argument("--cells", help="cell mask (nonzero inside) or cell instance volume of the same shape")
    p.add_argument("--slab", type=int, default=None,
                   help="Z planes read at a time (default: up to 16, fewer when planes are large)")
    p.add_argument("--overwrite", action="store_true", help="replace existing CSV files")
    p.set_defaults(func=cmd_measure)
