"""Compact-grid relayout ("new settings"): repack a slide's tiles into a square without holes.

A slide's tissue covers only part of its bounding box, so windows on the true grid are
mostly empty cells. The compact layout writes the n tiles into an S x S square
(S = ceil(sqrt(n)); only the end of the last row stays empty) so every crop is full.
How the tiles are written decides whether a packed neighbour is still a slide neighbour:

- ``"hilbert"``: the tiles, taken in Hilbert order of their true positions (Hilbert 1891),
  fill the square along a Hilbert curve over the square, so runs of the curve that are
  compact on the slide stay compact in the square.
- ``"file_order"``: the tiles in their given order, row by row. Kept only to reproduce the
  original behaviour: most vertical neighbours are lost.

:func:`neighbour_retention` measures the share of true 4-neighbour pairs that are still
4-neighbours after packing.

Example::

    >>> import numpy as np
    >>> grid = np.array([[0, 0], [5, 0], [0, 7], [9, 9]])
    >>> packed = pack_compact(grid)
    >>> int(packed.min()), int(packed.max()), len(np.unique(packed, axis=0))
    (0, 1, 4)
"""

from __future__ import annotations

import math

import numpy as np

from slidessl.data.grid import hilbert_index, spatial_order

__all__ = ["PACKINGS", "neighbour_retention", "pack_compact"]

PACKINGS = ("hilbert", "file_order")


def _square_cells(side: int, n: int) -> np.ndarray:
    """The first ``n`` cells of an ``side`` x ``side`` square along a Hilbert curve."""
    ys, xs = np.divmod(np.arange(side * side, dtype=np.int64), side)
    cells = np.stack([xs, ys], axis=1)
    return cells[np.argsort(hilbert_index(cells), kind="stable")[:n]]


def pack_compact(grid: np.ndarray, packing: str = "hilbert") -> np.ndarray:
    """Packed (n, 2) int64 positions in an S x S square, S = ceil(sqrt(n)); a bijection."""
    g = np.asarray(grid, dtype=np.int64)
    if g.ndim != 2 or g.shape[1] != 2:
        raise ValueError(f"pack_compact: grid must be (n, 2), got {g.shape}")
    n = len(g)
    out = np.zeros((n, 2), dtype=np.int64)
    if n == 0:
        return out
    side = math.isqrt(n - 1) + 1
    if packing == "file_order":
        ys, xs = np.divmod(np.arange(n, dtype=np.int64), side)
        out[:, 0], out[:, 1] = xs, ys
        return out
    if packing != "hilbert":
        raise ValueError(f"unknown packing {packing!r}; choose one of {PACKINGS}")
    order = spatial_order(g - g.min(axis=0), "hilbert")
    out[order] = _square_cells(side, n)
    return out


def neighbour_retention(grid: np.ndarray, packed: np.ndarray) -> float:
    """Share of true 4-neighbour pairs that are 4-neighbours in ``packed`` (nan if none)."""
    g = np.asarray(grid, dtype=np.int64)
    p = np.asarray(packed, dtype=np.int64)
    if g.shape != p.shape:
        raise ValueError(f"neighbour_retention: shapes differ, {g.shape} vs {p.shape}")
    g = g - g.min(axis=0)
    width = int(g[:, 0].max()) + 2
    keys = g[:, 1] * width + g[:, 0]
    sorter = np.argsort(keys)
    kept = total = 0
    for step in (1, width):  # right neighbour, lower neighbour
        pos = np.searchsorted(keys, keys + step, sorter=sorter)
        pos = np.minimum(pos, len(keys) - 1)
        j = sorter[pos]
        hit = keys[j] == keys + step
        i, j = np.flatnonzero(hit), j[hit]
        total += len(i)
        kept += int((np.abs(p[i] - p[j]).sum(axis=1) == 1).sum())
    return kept / total if total else float("nan")
