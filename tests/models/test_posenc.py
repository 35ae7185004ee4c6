"""Positions: Prov-GigaPath's MAE table values, computed on the fly."""

import numpy as np
import pytest
import torch

from slidessl.models.posenc import sincos_1d, sincos_2d


def _mae_table(embed_dim, grid_size):
    """MAE's get_2d_sincos_pos_embed (no CLS row), written out from its definition."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, -1)

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], 1)


def test_gigapath_mode_equals_mae_table_lookup(rng):
    dim = 8
    table = _mae_table(dim, 1000).astype(np.float32)
    gx = rng.integers(0, 1000, size=500)
    gy = rng.integers(0, 1200, size=500)  # gy >= 1000 wraps exactly like the flat index
    flat = gx * 1000 + gy
    keep = flat < 1_000_000
    coords = torch.from_numpy(np.stack([gx, gy], -1)[keep])[None]
    ours = sincos_2d(coords, dim, "gigapath")[0].numpy()
    np.testing.assert_allclose(ours, table[flat[keep]], rtol=1e-5, atol=1e-6)


def test_xy_mode_halves_encode_x_then_y(rng):
    coords = torch.from_numpy(rng.integers(0, 5000, size=(2, 30, 2)))
    emb = sincos_2d(coords, 32, "xy")
    torch.testing.assert_close(emb[..., :16], sincos_1d(coords[..., 0], 16).float())
    torch.testing.assert_close(emb[..., 16:], sincos_1d(coords[..., 1], 16).float())


def test_large_coordinates_are_distinct_and_finite():
    # 256,000 px and beyond at 256-px tiles: grid values past 1000
    coords = torch.tensor([[[1000, 5], [1001, 5], [4000, 3999], [4000, 4000]]])
    for mode in ("xy", "gigapath"):
        emb = sincos_2d(coords, 64, mode)
        assert torch.isfinite(emb).all()
        assert torch.cdist(emb[0], emb[0]).fill_diagonal_(1.0).min() > 1e-3


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(torch.zeros(1, 3, 2, dtype=torch.long), 30)
    with pytest.raises(ValueError, match="integer"):
        sincos_2d(torch.zeros(1, 3, 2), 32)
    with pytest.raises(ValueError, match="unknown position mode"):
        sincos_2d(torch.zeros(1, 3, 2, dtype=torch.long), 32, "polar")
