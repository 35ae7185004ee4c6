"""iBOT masks as 2-D blocks on a crop's tile grid.

Reference: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022)
and Bao et al., "BEiT: BERT Pre-Training of Image Transformers" (ICLR 2022), Sec. 2.5
(blockwise masking): random rectangles of random area and aspect ratio are added until the
target share of tokens is masked. On a slide the tokens are tiles at integer grid positions
with holes, so a block masks the tiles it covers; every block is centred on a tile that is
still unmasked, so each one adds at least one tile and the loop always ends.

Example::

    >>> import numpy as np
    >>> grid = np.stack(np.meshgrid(np.arange(20), np.arange(20)), -1).reshape(-1, 2)
    >>> m = block_mask(grid, 0.3, np.random.default_rng(0))
    >>> int(m.sum())
    120
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["block_mask", "sample_mask"]


def block_mask(
    grid: np.ndarray,
    ratio: float,
    rng: np.random.Generator,
    *,
    min_block_tiles: int = 4,
    max_block_tiles: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """Boolean (n,) mask: exactly ``round(ratio * n)`` tiles, covered by random rectangles.

    ``grid`` is (n, 2) integer positions. Block areas (in cells) are drawn between
    ``min_block_tiles`` and the number still to mask (at most ``max_block_tiles`` when
    given: small blocks leave every masked tile unmasked neighbours to be predicted from),
    aspect ratios log-uniformly from ``aspect``; the last block is trimmed at random so the
    count is exact.
    """
    g = np.asarray(grid, dtype=np.int64)
    if g.ndim != 2 or g.shape[1] != 2:
        raise ValueError(f"block_mask: grid must be (n, 2), got {g.shape}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"block_mask: ratio must lie in [0, 1], got {ratio}")
    if aspect[0] <= 0 or aspect[1] < aspect[0]:
        raise ValueError(f"block_mask: aspect must be 0 < low <= high, got {aspect}")
    n = len(g)
    target = int(round(ratio * n))
    mask = np.zeros(n, dtype=bool)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    while (done := int(mask.sum())) < target:
        remaining = target - done
        lo = min(max(1, min_block_tiles), remaining)
        hi = remaining if max_block_tiles is None else min(remaining, max(1, max_block_tiles))
        area = rng.uniform(lo, max(lo, hi))
        r = math.exp(rng.uniform(log_lo, log_hi))
        w = max(1, int(round(math.sqrt(area * r))))
        h = max(1, int(round(math.sqrt(area / r))))
        free = np.flatnonzero(~mask)
        cx, cy = g[free[rng.integers(len(free))]]
        x0 = cx - int(rng.integers(w))
        y0 = cy - int(rng.integers(h))
        inside = (g[:, 0] >= x0) & (g[:, 0] < x0 + w) & (g[:, 1] >= y0) & (g[:, 1] < y0 + h)
        new = np.flatnonzero(inside & ~mask)
        if len(new) > remaining:
            new = rng.choice(new, size=remaining, replace=False)
        mask[new] = True
    return mask


def sample_mask(
    grid: np.ndarray,
    rng: np.random.Generator,
    *,
    probability: float = 0.5,
    ratio: tuple[float, float] = (0.1, 0.5),
    min_block_tiles: int = 4,
    max_block_tiles: int | None = None,
) -> np.ndarray:
    """With ``probability``, a block mask at a ratio drawn uniformly from ``ratio``; else none."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mask probability must lie in [0, 1], got {probability}")
    if not 0.0 <= ratio[0] <= ratio[1] <= 1.0:
        raise ValueError(f"mask ratio range must satisfy 0 <= low <= high <= 1, got {ratio}")
    n = len(grid)
    if n == 0 or rng.random() >= probability:
        return np.zeros(n, dtype=bool)
    return block_mask(
        grid,
        rng.uniform(ratio[0], ratio[1]),
        rng,
        min_block_tiles=min_block_tiles,
        max_block_tiles=max_block_tiles,
    )
