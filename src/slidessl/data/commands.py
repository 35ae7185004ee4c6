"""Sub-commands of the data layer: ``slidessl synth`` and ``slidessl inspect``."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic cohort (TRIDENT-layout h5 files + manifest.csv)",
        formatter_class=fmt,
        description="Write a deterministic synthetic cohort to try slidessl without data: "
        "OUT/slides/*.h5 in TRIDENT layout (features, coords with patch_size_level0) and "
        "OUT/manifest.csv with patient ids and composition, arrangement, long-range, subtype "
        "and mutation labels (see docs/synthetic.md); the same seed gives the same files. "
        "Example: slidessl synth --out /tmp/c --slides 200",
    )
    p.add_argument("--out", required=True, help="output folder OUT (created)")
    p.add_argument("--slides", type=int, default=200, help="number of slides")
    p.add_argument("--seed", type=int, default=0, help="random seed of the whole cohort")
    p.add_argument("--dim", type=int, default=128, help="tile feature dim")
    p.add_argument("--min-tiles", type=int, default=200, help="fewest tiles per slide")
    p.add_argument("--max-tiles", type=int, default=20_000, help="most tiles per slide")
    p.set_defaults(func=_synth)

    q = subparsers.add_parser(
        "inspect",
        help="check slide files, a manifest or a folder; exit 2 when any slide has an error",
        description="Check slide files before training on them: per slide, tiles, dim, "
        "dtype, format, stride and its source, grid extent, fill ratio and problems; for a "
        "manifest or folder also a cohort summary (patients, tiles, dims, label counts). "
        "Reads only; prints a table (and writes --json). Exit status 0 when every slide is "
        "usable, 2 when any slide has an error or the manifest itself cannot be read. "
        "Example: slidessl inspect cohort/manifest.csv",
        formatter_class=fmt,
    )
    q.add_argument(
        "target",
        metavar="PATH_OR_MANIFEST",
        help="a slide file (.h5, .npz, .pt), a manifest CSV/TSV, or a folder (its "
        "manifest.csv, else every slide file in it)",
    )
    q.add_argument(
        "--stride",
        type=float,
        default=None,
        help="tile stride in coordinate units for files without a patch_size_level0 "
        "attribute or a manifest stride value (not given: inferred from coordinate gaps)",
    )
    q.add_argument(
        "--no-scan",
        action="store_true",
        help="skip the NaN/Inf scan of all features (faster; reads coords only)",
    )
    q.add_argument(
        "--all",
        action="store_true",
        help="list every slide, not only bad ones (up to 50 slides are always all listed)",
    )
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
    return 0 if all(r.ok for r in reports) else 2  # a bad slide is bad input
