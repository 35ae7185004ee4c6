"""Sub-commands of the data layer: ``slidessl synth`` and ``slidessl inspect``."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic cohort (TRIDENT-layout h5 files + manifest.csv)",
        description="Write a deterministic synthetic cohort: DIR/slides/*.h5 in TRIDENT "
        "layout and DIR/manifest.csv with composition, spatial and mutation labels "
        "(see docs/synthetic.md).",
    )
    p.add_argument("--out", required=True, help="output folder DIR")
    p.add_argument("--slides", type=int, default=200, help="number of slides (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dim", type=int, default=128, help="tile feature dim (default 128)")
    p.add_argument("--min-tiles", type=int, default=200, help="fewest tiles per slide")
    p.add_argument("--max-tiles", type=int, default=20_000, help="most tiles per slide")
    p.set_defaults(func=_synth)

    q = subparsers.add_parser(
        "inspect",
        help="check slide files, a manifest or a folder; exit 1 when any slide has an error",
        description="Per slide: tiles, dim, dtype, stride and its source, grid extent, fill "
        "ratio, problems; for a manifest also a summary. Exit status 1 when any slide has "
        "an error, 2 when the manifest itself cannot be read.",
    )
    q.add_argument("target", metavar="PATH_OR_MANIFEST")
    q.add_argument(
        "--stride",
        type=float,
        default=None,
        help="tile stride in coordinate units for files without patch_size_level0",
    )
    q.add_argument(
        "--no-scan",
        action="store_true",
        help="skip the NaN/Inf scan of all features (faster; reads coords only)",
    )
    q.add_argument("--all", action="store_true", help="list every slide, not only bad ones")
    q.add_argument("--json", default=None, help="also write the per-slide reports to this file")
    q.set_defaults(func=_inspect)


def _synth(args: argparse.Namespace) -> int:
    import time

    from slidessl.data.synthetic import make_cohort

    t0 = time.perf_counter()
    try:
        manifest = make_cohort(
            args.out,
            args.slides,
            seed=args.seed,
            dim=args.dim,
            min_tiles=args.min_tiles,
            max_tiles=args.max_tiles,
        )
    except ValueError as exc:
        print(f"slidessl synth: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.slides} slides to {manifest.parent / 'slides'} and {manifest} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from slidessl.data.errors import ManifestError
    from slidessl.data.inspect import format_reports, inspect_path, reports_as_dicts

    try:
        reports, manifest = inspect_path(args.target, stride=args.stride, scan=not args.no_scan)
    except ManifestError as exc:
        print(f"slidessl inspect: {exc}", file=sys.stderr)
        return 2
    print(format_reports(reports, manifest, all_rows=args.all))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(reports_as_dicts(reports), fh, indent=1)
    return 0 if all(r.ok for r in reports) else 1
