"""Writers of slide files in each tool's exact layout, for the data-layer tests."""

from __future__ import annotations

import types

import h5py
import numpy as np
import pytest
import torch


def random_grid(rng: np.random.Generator, n: int, width: int = 64) -> np.ndarray:
    """``n`` distinct random cells of a ``width``-wide grid, (gx, gy) int64."""
    cells = rng.choice(width * width, size=n, replace=False)
    return np.stack([cells % width, cells // width], axis=1).astype(np.int64)


def write_trident(path, feats, coords, *, psl0=512, patch_size=256, overlap=0, **extra):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        ds = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        attrs = {
            "patch_size": patch_size,
            "patch_size_level0": psl0,
            "level0_magnification": 40,
            "target_magnification": 20,
            "overlap": overlap,
            "level0_width": int(np.max(coords[:, 0]) + psl0),
            "level0_height": int(np.max(coords[:, 1]) + psl0),
        }
        attrs.update(extra)
        for k, v in attrs.items():
            ds.attrs[k] = v
    return path


def write_clam(path, feats, coords):
    """CLAM ``extract_features_fp.py``: features float32, coords int32, no attributes."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(feats, dtype=np.float32))
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int32))
    return path


def write_gigapath(path, feats, coords):
    """Prov-GigaPath tile-encoder output: 1536-d features, coords, no attributes."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
    return path


def write_h5(path, datasets: dict, coord_attrs: dict | None = None):
    """Arbitrary (possibly broken) layout."""
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
        for k, v in (coord_attrs or {}).items():
            f["coords"].attrs[k] = v
    return path


@pytest.fixture
def slide_factory(tmp_path, rng):
    """Make random TRIDENT-style slides: returns (path, features fp32, coords, grid)."""
    counter = iter(range(10_000))

    def make(n=300, dim=24, psl0=512, dtype=np.float16, name=None, width=64, **kw):
        grid = random_grid(rng, n, width)
        origin = rng.integers(0, 5000, 2)
        coords = grid * psl0 + origin
        feats = rng.standard_normal((n, dim)).astype(dtype)
        path = tmp_path / f"{name or f'slide{next(counter)}'}.h5"
        write_trident(path, feats, coords, psl0=psl0, **kw)
        return path, feats.astype(np.float32), coords, grid - grid.min(axis=0)

    return make


@pytest.fixture
def layouts():
    return types.SimpleNamespace(
        trident=write_trident,
        clam=write_clam,
        gigapath=write_gigapath,
        h5=write_h5,
        random_grid=random_grid,
        torch=torch,
    )
