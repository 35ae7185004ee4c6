"""Slide-file read throughput: slidessl's reader vs ``numpy.fromfile`` of the same bytes.

Writes ``--slides`` TRIDENT-layout HDF5 files of ``--rows`` x ``--dim`` float16 features
and, beside each, a raw ``.bin`` holding exactly the same feature bytes. Then, in one run:

- whole-slide reads: ``open_slide(path).read_features()`` (coords read + grid validation +
  fp16 -> fp32 + NaN check) and bare ``h5py`` ``ds[()]`` vs ``numpy.fromfile(bin)``;
- random ``--sample``-row reads (sorted, without replacement, fresh rows per repeat):
  ``read_features(rows)`` and bare ``h5py`` fancy indexing vs ``numpy.fromfile`` of the
  same rows (seek + fromfile per row) and ``numpy.memmap`` fancy indexing.

Prints slides/s, MB/s (of on-disk feature bytes) and the ratio to the ``numpy.fromfile``
baseline measured in the same run. Files are freshly written, so reads hit the page cache
(this measures software overhead, not the disk). Run::

    .venv/bin/python benchmarks/bench_io.py            # 4 slides of 20,000 x 1536 fp16
    .venv/bin/python benchmarks/bench_io.py --slides 2 --repeats 2   # quicker
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _write(folder: Path, k: int, rows: int, dim: int, rng) -> tuple[Path, Path]:
    import h5py

    feats = rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16)
    side = int(np.ceil(np.sqrt(rows * 1.5)))
    cells = rng.choice(side * side, rows, replace=False)
    coords = np.stack([cells % side, cells // side], axis=1).astype(np.int64) * 512
    h5 = folder / f"slide{k}.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("features", data=feats)
        ds = f.create_dataset("coords", data=coords)
        ds.attrs["patch_size"], ds.attrs["patch_size_level0"], ds.attrs["overlap"] = 256, 512, 0
    raw = folder / f"slide{k}.bin"
    feats.tofile(raw)
    return h5, raw


def _time(fn, items, repeats) -> float:
    """Median over repeats of the seconds to run ``fn`` once per item."""
    runs = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i, item in enumerate(items):
            fn(item, r * len(items) + i)
        runs.append(time.perf_counter() - t0)
    return float(np.median(runs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--sample", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import h5py

    from slidessl.data.formats import open_slide

    rng = np.random.default_rng(args.seed)
    row_bytes = args.dim * 2
    with tempfile.TemporaryDirectory(prefix="bench_io_") as tmp:
        files = [_write(Path(tmp), k, args.rows, args.dim, rng) for k in range(args.slides)]
        n_draws = args.slides * args.repeats
        samples = [
            np.sort(rng.choice(args.rows, args.sample, replace=False)) for _ in range(n_draws)
        ]

        def fromfile_whole(f, _):
            np.fromfile(f[1], dtype=np.float16).reshape(-1, args.dim)

        def fromfile_f32_whole(f, _):
            np.fromfile(f[1], dtype=np.float16).reshape(-1, args.dim).astype(np.float32)

        def h5py_whole(f, _):
            with h5py.File(f[0], "r") as h:
                h["features"][()]

        def ours_whole(f, _):
            open_slide(f[0]).read_features()

        def fromfile_rows(f, i):
            out = np.empty((args.sample, args.dim), np.float16)
            with open(f[1], "rb") as fh:
                for j, row in enumerate(samples[i]):
                    fh.seek(int(row) * row_bytes)
                    out[j] = np.fromfile(fh, dtype=np.float16, count=args.dim)

        def memmap_rows(f, i):
            np.array(np.memmap(f[1], np.float16, "r", shape=(args.rows, args.dim))[samples[i]])

        def h5py_rows(f, i):
            with h5py.File(f[0], "r") as h:
                h["features"][samples[i]]

        def ours_rows(f, i):
            open_slide(f[0]).read_features(samples[i])

        for fn in (fromfile_whole, ours_whole):  # warm the page cache and imports
            _time(fn, files, 1)
        whole_mb = args.rows * row_bytes / 1e6
        rows_mb = args.sample * row_bytes / 1e6
        table = []
        for label, mb, cases in (
            (
                "whole slide",
                whole_mb,
                [
                    ("numpy.fromfile", fromfile_whole),
                    ("numpy.fromfile + fp32 cast", fromfile_f32_whole),
                    ("h5py ds[()]", h5py_whole),
                    ("slidessl read_features()", ours_whole),
                ],
            ),
            (
                f"random {args.sample} rows",
                rows_mb,
                [
                    ("numpy.fromfile", fromfile_rows),
                    ("numpy.memmap", memmap_rows),
                    ("h5py fancy index", h5py_rows),
                    ("slidessl read_features(rows)", ours_rows),
                ],
            ),
        ):
            base = None
            for name, fn in cases:
                sec = _time(fn, files, args.repeats) / args.slides
                base = base or sec
                table.append((label, name, 1 / sec, mb / sec, base / sec))

    print(
        f"{args.slides} slides of {args.rows} x {args.dim} float16, {args.repeats} repeats "
        "(median), warm page cache"
    )
    print(f"{'read':<20} {'reader':<30} {'slides/s':>9} {'MB/s':>9} {'vs fromfile':>12}")
    for label, name, sps, mbps, ratio in table:
        print(f"{label:<20} {name:<30} {sps:9.1f} {mbps:9.0f} {ratio:11.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
