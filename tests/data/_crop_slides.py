"""Random irregular slides for the view/mask/collate/relayout tests: tissue blobs with holes."""

from __future__ import annotations

import numpy as np
import torch


def blob_grid(rng: np.random.Generator, size: int = 80, n_blobs: int = 2) -> np.ndarray:
    """(n, 2) int64 grid positions of a few noisy elliptical tissue pieces with holes."""
    yy, xx = np.mgrid[0:size, 0:size]
    tissue = np.zeros((size, size), dtype=bool)
    for _ in range(n_blobs):
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        a, b = rng.uniform(0.12, 0.3, 2) * size
        theta = np.arctan2(yy - cy, xx - cx)
        r = np.hypot((xx - cx) / a, (yy - cy) / b)
        edge = (
            1
            + 0.15 * np.sin(3 * theta + rng.uniform(0, 6))
            + 0.08 * np.sin(7 * theta + rng.uniform(0, 6))
        )
        tissue |= r < edge
    for _ in range(int(rng.integers(2, 8))):
        cx, cy = rng.uniform(0, size, 2)
        tissue &= np.hypot(xx - cx, yy - cy) > rng.uniform(1, 4)
    tissue &= rng.random((size, size)) > 0.02
    gy, gx = np.nonzero(tissue)
    grid = np.stack([gx, gy], axis=1).astype(np.int64)
    return grid - grid.min(axis=0)


def random_slide(
    rng: np.random.Generator,
    size: int = 80,
    dim: int = 16,
    n_blobs: int = 2,
    slide_id: str = "slide",
) -> dict:
    """A slide dict as ``SlideDataset`` returns it; feature row i encodes tile i's position."""
    grid = blob_grid(rng, size, n_blobs)
    feats = torch.from_numpy(rng.standard_normal((len(grid), dim)).astype(np.float32))
    feats[:, 0] = torch.from_numpy(grid[:, 0].astype(np.float32))
    feats[:, 1] = torch.from_numpy(grid[:, 1].astype(np.float32))
    return {"slide_id": slide_id, "index": 0, "features": feats, "grid": torch.from_numpy(grid)}
