"""Generative model of one synthetic slide: tissue geometry, tissue-type map, tile features.

Used by :mod:`slidessl.data.synthetic`; the model is described in ``docs/synthetic.md``.
Tile features depend on the tissue type, i.i.d. within-type variation and a per-slide
stain/batch shift only, never on the tile's position, so a label defined by the spatial
arrangement of types is invisible to mean pooling when compositions match.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

TISSUE_TYPES = ("tumor", "stroma", "immune", "necrosis", "normal", "fat")
TUMOR, STROMA, IMMUNE, NECROSIS, NORMAL, FAT = range(len(TISSUE_TYPES))
SUBTYPES = ("adenocarcinoma", "squamous", "small_cell")


def _one_blas_thread():
    """Limit BLAS to one thread when threadpoolctl (a scikit-learn dependency) is present."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


@dataclass
class FeatureSpace:
    """Shared by every slide of a cohort: a low-rank, anisotropic embedding space."""

    basis: np.ndarray  # (r, D): latent -> feature map (orthonormal rows times a decaying spectrum)
    offset: np.ndarray  # (D,)
    prototypes: np.ndarray  # (T, r) one centre per tissue type
    spreads: np.ndarray  # (T, r) per-type anisotropic within-type std
    subtype_shift: np.ndarray  # (S, r) moves the tumour centre by subtype
    noise_bank: np.ndarray  # (B, D) isotropic full-rank noise, drawn from by every tile


def make_feature_space(dim: int, rng: np.random.Generator) -> FeatureSpace:
    rank = min(24, dim)
    q, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
    spectrum = 2.0 * 0.9 ** np.arange(rank)
    basis = (q * spectrum).T
    spreads = np.stack([rng.permutation(0.7 * 0.88 ** np.arange(rank)) for _ in TISSUE_TYPES])
    return FeatureSpace(
        basis=basis,
        offset=0.3 * rng.standard_normal(dim),
        prototypes=rng.standard_normal((len(TISSUE_TYPES), rank)),
        spreads=spreads,
        subtype_shift=0.5 * rng.standard_normal((len(SUBTYPES), rank)),
        noise_bank=0.05 * rng.standard_normal((8192, dim), dtype=np.float32),
    )


def tile_features(
    space: FeatureSpace, types: np.ndarray, subtype: int, rng: np.random.Generator
) -> np.ndarray:
    """Features (N, D) float32 from tissue types; no dependence on position."""
    rank = space.prototypes.shape[1]
    centres = space.prototypes.copy()
    centres[TUMOR] += space.subtype_shift[subtype]
    stain = 0.3 * rng.standard_normal(rank)  # per-slide stain / scanner / batch shift
    gain = 1.0 + 0.05 * rng.standard_normal()
    eps = rng.standard_normal((len(types), rank), dtype=np.float32)
    z = (centres[types] + stain).astype(np.float32) + space.spreads[types] * eps
    with _one_blas_thread():  # tiny matmuls: threads only add latency on a busy machine
        x = (gain * z) @ space.basis.astype(np.float32) + space.offset.astype(np.float32)
    x += space.noise_bank[rng.integers(0, len(space.noise_bank), len(types))]
    return x


def _smooth_field(u, v, rng, n_waves=8, freq=(1.0, 3.0)) -> np.ndarray:
    """Sum of random plane waves: a smooth random field on normalised coordinates."""
    theta = rng.uniform(0, 2 * np.pi, n_waves)
    k = rng.uniform(*freq, n_waves)
    phase = rng.uniform(0, 2 * np.pi, n_waves)
    arg = 2 * np.pi * (np.outer(u, k * np.cos(theta)) + np.outer(v, k * np.sin(theta))) + phase
    return np.cos(arg).sum(axis=1) / np.sqrt(n_waves / 2)


@dataclass
class Shape:
    """A slide outline in normalised units (height 1, width ``aspect``), scale-free."""

    aspect: float
    centres: np.ndarray  # (K, 2)
    radii: np.ndarray  # (K,)
    axes: np.ndarray  # (K,) minor/major ratio
    angles: np.ndarray  # (K,)
    wobble: np.ndarray  # (K, M, 2) Fourier amplitudes and phases of the border
    hole_seed: int


def make_shape(rng: np.random.Generator) -> Shape:
    k = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
    aspect = float(rng.uniform(1.0, 1.3 + 0.3 * k))
    cu = aspect * (np.arange(k) + 0.5) / k + rng.uniform(-0.05, 0.05, k) * aspect / k
    cv = 0.5 + rng.uniform(-0.12, 0.12, k)
    base = 0.45 * min(aspect / k, 1.0)
    wobble = np.stack([rng.uniform(0, 0.09, (k, 5)), rng.uniform(0, 2 * np.pi, (k, 5))], axis=-1)
    return Shape(
        aspect=aspect,
        centres=np.stack([cu, cv], axis=1),
        radii=base * rng.uniform(0.7, 1.0, k),
        axes=rng.uniform(0.6, 1.0, k),
        angles=rng.uniform(0, np.pi, k),
        wobble=wobble,
        hole_seed=int(rng.integers(2**31)),
    )


def rasterise(shape: Shape, height: int) -> np.ndarray:
    """Grid positions ``(gx, gy)`` of tissue cells for a grid ``height`` cells tall."""
    width = max(1, int(round(shape.aspect * height)))
    gy, gx = np.mgrid[0:height, 0:width]
    gx, gy = gx.ravel(), gy.ravel()
    u, v = (gx + 0.5) / height, (gy + 0.5) / height
    inside = np.zeros(len(u), dtype=bool)
    for c, r, ax, ang, wob in zip(  # each fragment: a rotated ellipse with a wobbly border
        shape.centres, shape.radii, shape.axes, shape.angles, shape.wobble
    ):
        reach = r * (1 + wob[:, 0].sum())  # no border point lies farther from the centre
        near = np.flatnonzero((np.abs(u - c[0]) < reach) & (np.abs(v - c[1]) < reach))
        du, dv = u[near] - c[0], v[near] - c[1]
        a = du * np.cos(ang) + dv * np.sin(ang)
        b = (-du * np.sin(ang) + dv * np.cos(ang)) / ax
        rho, phi = np.hypot(a, b), np.arctan2(b, a)
        m = np.arange(2, 2 + wob.shape[0])
        border = r * (1 + (wob[:, 0] * np.cos(np.outer(phi, m) + wob[:, 1])).sum(axis=1))
        inside[near[rho < border]] = True
    gx, gy, u, v = gx[inside], gy[inside], u[inside], v[inside]
    holes = _smooth_field(u, v, np.random.default_rng(shape.hole_seed), freq=(3.0, 6.0))
    keep = holes < 1.5
    return np.stack([gx[keep], gy[keep]], axis=1).astype(np.int64)


def tissue_grid(
    rng: np.random.Generator, target: int, min_tiles: int, max_tiles: int
) -> np.ndarray:
    """Tissue cells of one slide, about ``target`` of them, within [min_tiles, max_tiles]."""
    shape = make_shape(rng)
    probe = 40  # a coarse raster measures the tissue fraction; area grows as height**2
    fill = max(len(rasterise(shape, probe)), 1) / probe**2
    height = max(4, int(round(np.sqrt(target / fill))))
    grid = rasterise(shape, height)
    if len(grid) > max_tiles:  # trim the bottom rows: still a slide, only cropped
        grid = grid[np.lexsort((grid[:, 0], grid[:, 1]))][:max_tiles]
    while len(grid) < min_tiles:
        height = int(height * 1.2) + 1
        grid = rasterise(shape, height)
        if len(grid) > max_tiles:
            grid = grid[np.lexsort((grid[:, 0], grid[:, 1]))][:max_tiles]
    return grid


def _top(field: np.ndarray, candidates: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` candidates with the largest field values (a coherent region)."""
    if count <= 0:
        return candidates[:0]
    return candidates[np.argsort(-field[candidates], kind="stable")[:count]]


def assign_types(
    grid: np.ndarray, fractions: np.ndarray, infiltrated: bool, rng: np.random.Generator
) -> np.ndarray:
    """Tissue type per tile with exact counts ``round(fractions * N)``.

    The tumour area is the top ``(p_tumor + p_immune)`` quantile of a smooth field. If
    ``infiltrated``, immune tiles are clusters *inside* that area (top quantile of a
    finer field restricted to it); otherwise they form the band *around* the tumour core.
    Either way the numbers of tumour and immune tiles are the same.
    """
    n = len(grid)
    h = max(float(grid[:, 1].max()) + 1, 8.0)
    u, v = (grid[:, 0] + 0.5) / h, (grid[:, 1] + 0.5) / h
    counts = np.floor(fractions * n).astype(int)
    types = np.full(n, STROMA, dtype=np.int64)
    all_idx = np.arange(n)
    f_tumor = _smooth_field(u, v, rng, freq=(1.5, 3.5))
    area = _top(f_tumor, all_idx, counts[TUMOR] + counts[IMMUNE])
    if infiltrated:
        g = _smooth_field(u, v, rng, freq=(5.0, 9.0))
        immune = _top(g, area, counts[IMMUNE])
        types[area] = TUMOR
        types[immune] = IMMUNE
    else:
        types[area] = IMMUNE
        types[_top(f_tumor, area, counts[TUMOR])] = TUMOR
    rest = np.setdiff1d(all_idx, area)
    for t in (NECROSIS, NORMAL, FAT):
        chosen = _top(_smooth_field(u, v, rng, freq=(1.5, 4.0)), rest, counts[t])
        types[chosen] = t
        rest = np.setdiff1d(rest, chosen)
    return types


NORMAL_GAP = 5.0  # grid distance below which the two normal foci never come


def _blob(grid: np.ndarray, cand: np.ndarray, seed: np.ndarray, count: int, rng) -> np.ndarray:
    """The ``count`` candidate cells nearest ``seed`` (a compact blob; ties at random)."""
    d = np.hypot(*(grid[cand] - seed).T) + 0.01 * rng.random(len(cand))
    return cand[np.argsort(d, kind="stable")[:count]]


def place_normal(
    grid: np.ndarray, types: np.ndarray, apart: bool, rng: np.random.Generator
) -> np.ndarray:
    """Rearrange the normal tiles into two equal foci, far ``apart`` or close together.

    Tumour, immune, necrosis and fat keep their cells; the normal tiles become stroma and
    the same number of stroma cells become normal, as two compact blobs of (almost) equal
    size. Focus 1 grows around a random stroma cell. Focus 2 grows among the stroma cells at
    least ``NORMAL_GAP`` from focus 1, around a seed drawn from the 10% of them farthest
    from focus 1 (``apart``) or closest to ``NORMAL_GAP`` plus its own radius (close: a gap
    of about ``NORMAL_GAP`` cells). Composition and each focus's surroundings are alike in
    both cases; only the distance between the foci differs, and it is never below
    ``NORMAL_GAP``, so neighbour co-occurrence at smaller radii cannot tell them apart.
    """
    from scipy.spatial import cKDTree

    out = types.copy()
    count = int((types == NORMAL).sum())
    if count < 2:
        return out
    out[out == NORMAL] = STROMA
    cand = np.flatnonzero(out == STROMA)
    first = _blob(grid, cand, grid[cand[rng.integers(len(cand))]], count // 2, rng)
    rest = np.setdiff1d(cand, first)
    if len(rest) == 0:
        out[first] = NORMAL
        return out
    dist = cKDTree(grid[first]).query(grid[rest])[0]
    ok = dist >= NORMAL_GAP
    if ok.sum() < count - len(first):  # no room for a gap: the farthest cells
        ok = np.zeros(len(rest), dtype=bool)
        ok[np.argsort(-dist, kind="stable")[: count - len(first)]] = True
    rest, dist = rest[ok], dist[ok]
    top = max(1, len(rest) // 10)
    if apart:
        pool = np.argsort(-dist, kind="stable")[:top]
    else:
        target = NORMAL_GAP + np.sqrt((count - len(first)) / np.pi)
        pool = np.argsort(np.abs(dist - target), kind="stable")[:top]
    second = _blob(grid, rest, grid[rest[rng.choice(pool)]], count - len(first), rng)
    out[first] = NORMAL
    out[second] = NORMAL
    return out


def draw_fractions(tumor_high: bool, rng: np.random.Generator) -> np.ndarray:
    """Composition of one slide; only the tumour fraction depends on a label."""
    p = np.zeros(len(TISSUE_TYPES))
    p[TUMOR] = rng.uniform(0.26, 0.50) if tumor_high else rng.uniform(0.06, 0.30)
    p[IMMUNE] = rng.uniform(0.06, 0.18)
    p[NECROSIS] = rng.uniform(0.0, 0.08)
    p[NORMAL] = rng.uniform(0.02, 0.15)
    p[FAT] = rng.uniform(0.0, 0.10)
    others = p[[NECROSIS, NORMAL, FAT]].sum()
    room = 0.9 - p[TUMOR] - p[IMMUNE]
    if others > room:
        p[[NECROSIS, NORMAL, FAT]] *= room / others
    p[STROMA] = 1.0 - p.sum()
    return p
