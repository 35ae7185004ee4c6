"""Tile coordinates to integer grid positions, spatial token order, and tile capping.

Dilated attention (LongNet, Ding et al. 2023, "LongNet: Scaling Transformers to
1,000,000,000 Tokens") groups tokens by sequence index, so the sequence must follow
space. :func:`spatial_order` returns a permutation along a Hilbert curve (Hilbert 1891;
neighbours on the curve are neighbours on the slide), a Z-order (Morton) curve, or
row-major order. :func:`cap_tiles` draws a spatially uniform random subsample by
stratifying along the Hilbert curve: it never keeps the first N rows of a file.
"""

from __future__ import annotations

import numpy as np

ORDERS = ("hilbert", "zorder", "rowmajor")


class GridError(ValueError):
    """Coordinates that do not form a grid with the given stride."""


def infer_stride(coords: np.ndarray) -> float | None:
    """Most common positive gap between sorted unique x values and sorted unique y values.

    Returns ``None`` when there is no gap at all (a single tile, or a single row and column).
    Ties go to the smallest gap.
    """
    c = np.asarray(coords, dtype=np.float64)
    gaps = [np.diff(np.unique(c[:, axis])) for axis in range(2)]
    g = np.concatenate(gaps)
    g = g[g > 0]
    if g.size == 0:
        return None
    values, counts = np.unique(np.round(g, 6), return_counts=True)
    return float(values[np.argmax(counts)])


def to_grid(
    coords: np.ndarray, stride: float, *, tol: float = 0.1, assume_unique: bool = False
) -> np.ndarray:
    """Integer grid positions ``(gx, gy)`` of tiles: origin subtracted, divided by the stride.

    ``tol`` is the largest distance (in strides) a tile may lie off the grid before the
    stride is declared not to divide the coordinate gaps. Raises :class:`GridError` when
    the stride is not positive, does not divide the gaps, or collapses the grid (several
    tiles on one cell). ``assume_unique=True`` (the readers, which reject duplicate
    coordinates first) skips the collision check when every tile lies exactly on the grid.
    """
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise GridError(f"coords must have shape (N, 2), got {c.shape}")
    if c.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if not np.isfinite(stride) or stride <= 0:
        raise GridError(f"stride must be a positive number, got {stride}")
    q = (c - c.min(axis=0)) / stride
    g = np.rint(q)
    off = np.abs(q - g).max(axis=1)
    bad = np.flatnonzero(off > tol)
    if bad.size:
        x, y = c[bad[0]]
        raise GridError(
            f"stride {stride:g} does not divide the coordinate gaps: {bad.size} of {len(c)} "
            f"tiles lie off the grid (e.g. tile at ({x:g}, {y:g}) is {off[bad[0]]:.2f} "
            "strides off)"
        )
    grid = g.astype(np.int64)
    if assume_unique and off.max() < 1e-9:  # exact: distinct coords, distinct cells
        return grid
    n_cells = np.unique(grid[:, 0] * (int(grid[:, 1].max()) + 1) + grid[:, 1]).size
    if n_cells < len(grid):
        raise GridError(
            f"stride {stride:g} collapses the grid: {len(grid)} tiles fall on only "
            f"{n_cells} cells ({len(grid) - n_cells} tiles share a cell with another)"
        )
    return grid


def _check_grid(grid: np.ndarray) -> np.ndarray:
    g = np.asarray(grid)
    if g.ndim != 2 or g.shape[1] != 2:
        raise GridError(f"grid must have shape (N, 2), got {g.shape}")
    if g.size and not np.issubdtype(g.dtype, np.integer):
        raise GridError(f"grid must hold integers, got dtype {g.dtype}")
    g = g.astype(np.int64)
    if g.size and g.min() < 0:
        raise GridError("grid positions must be non-negative (subtract the origin first)")
    return g


def _curve_order(g: np.ndarray) -> int:
    """Number of bits needed to hold the largest grid position."""
    top = int(g.max()) if g.size else 0
    return max(1, top.bit_length())


def hilbert_index(grid: np.ndarray) -> np.ndarray:
    """Distance of each grid cell along a Hilbert curve covering the bounding square."""
    g = _check_grid(grid)
    order = _curve_order(g)
    n = np.int64(1) << order
    x = g[:, 0].copy()
    y = g[:, 1].copy()
    d = np.zeros(len(g), dtype=np.int64)
    s = n >> 1
    while s > 0:
        rx = ((x & s) > 0).astype(np.int64)
        ry = ((y & s) > 0).astype(np.int64)
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant so that the sub-curve has the canonical orientation
        flip = (ry == 0) & (rx == 1)
        x = np.where(flip, n - 1 - x, x)
        y = np.where(flip, n - 1 - y, y)
        swap = ry == 0
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    return d


def zorder_index(grid: np.ndarray) -> np.ndarray:
    """Morton code: the bits of ``gx`` and ``gy`` interleaved (x in the even bits)."""
    g = _check_grid(grid)
    order = _curve_order(g)
    d = np.zeros(len(g), dtype=np.int64)
    for bit in range(order):
        d |= ((g[:, 0] >> bit) & 1) << (2 * bit)
        d |= ((g[:, 1] >> bit) & 1) << (2 * bit + 1)
    return d


def spatial_order(grid: np.ndarray, mode: str = "hilbert") -> np.ndarray:
    """Permutation that puts tiles in spatial order: ``grid[perm]`` follows the curve.

    ``mode`` is ``"hilbert"``, ``"zorder"`` or ``"rowmajor"`` (by row ``gy``, then
    column ``gx``). Ties keep their input order.
    """
    g = _check_grid(grid)
    if mode == "hilbert":
        key = hilbert_index(g)
    elif mode == "zorder":
        key = zorder_index(g)
    elif mode == "rowmajor":
        return np.lexsort((g[:, 0], g[:, 1])).astype(np.int64)
    else:
        raise ValueError(f"unknown spatial order {mode!r}; choose one of {ORDERS}")
    return np.argsort(key, kind="stable").astype(np.int64)


def cap_tiles(grid: np.ndarray, max_tiles: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices of at most ``max_tiles`` tiles, spread uniformly over the tissue.

    The tiles are walked along a Hilbert curve and cut into ``max_tiles`` contiguous
    strata of (almost) equal size; one tile is drawn at random from each stratum. Every
    region of the slide therefore keeps its share of tiles (the subsample covers the whole
    bounding box, never one corner), and different ``rng`` states give different subsets.
    """
    g = _check_grid(grid)
    n = len(g)
    if max_tiles <= 0:
        raise ValueError(f"max_tiles must be positive, got {max_tiles}")
    if n <= max_tiles:
        return np.arange(n, dtype=np.int64)
    perm = spatial_order(g, "hilbert")
    bounds = (np.arange(max_tiles + 1, dtype=np.int64) * n) // max_tiles
    sizes = np.diff(bounds)
    picks = bounds[:-1] + (rng.random(max_tiles) * sizes).astype(np.int64)
    return np.sort(perm[picks])
