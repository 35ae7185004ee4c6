import numpy as np
import pytest

from slidessl.data.grid import (
    GridError,
    cap_tiles,
    hilbert_index,
    infer_stride,
    spatial_order,
    to_grid,
    zorder_index,
)


def _square(side):
    gy, gx = np.mgrid[0:side, 0:side]
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)


def test_to_grid_subtracts_origin_and_divides(rng):
    grid = np.unique(rng.integers(0, 50, (200, 2)), axis=0)
    origin = rng.integers(100, 10_000, 2)
    stride = float(rng.choice([224, 256, 448, 512]))
    coords = grid * stride + origin
    got = to_grid(coords, stride)
    np.testing.assert_array_equal(got, grid - grid.min(axis=0))
    assert got.dtype == np.int64


def test_to_grid_rejects_stride_that_does_not_divide_gaps(rng):
    coords = np.unique(rng.integers(0, 30, (100, 2)), axis=0) * 256
    with pytest.raises(GridError, match="does not divide"):
        to_grid(coords, 300.0)


def test_to_grid_rejects_collapsing_stride(rng):
    # tiles 8 px apart read with a 512-px stride: all within rounding of one cell
    coords = np.unique(rng.integers(0, 5, (20, 2)), axis=0) * 8 + 1000
    with pytest.raises(GridError, match="collapses the grid"):
        to_grid(coords, 512.0)


def test_to_grid_flags_duplicates_unless_told_unique(rng):
    coords = np.unique(rng.integers(0, 30, (50, 2)), axis=0) * 256
    coords = np.concatenate([coords, coords[:1]])
    with pytest.raises(GridError, match="collapses the grid"):
        to_grid(coords, 256.0)
    assert len(to_grid(coords, 256.0, assume_unique=True)) == len(coords)


def test_to_grid_rejects_nonpositive_stride():
    with pytest.raises(GridError, match="positive"):
        to_grid(np.zeros((3, 2)), 0.0)


def test_infer_stride_most_common_gap(rng):
    grid = np.unique(rng.integers(0, 40, (300, 2)), axis=0)
    assert infer_stride(grid * 448 + 17) == 448.0
    assert infer_stride(np.array([[5, 5]])) is None


@pytest.mark.parametrize("side", [2, 8, 32])
def test_hilbert_visits_full_square_by_unit_steps(side):
    grid = _square(side)
    path = grid[spatial_order(grid, "hilbert")]
    steps = np.abs(np.diff(path, axis=0)).sum(axis=1)
    assert (steps == 1).all()
    assert sorted(hilbert_index(grid).tolist()) == list(range(side * side))


def test_zorder_interleaves_bits():
    grid = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [3, 3]])
    np.testing.assert_array_equal(zorder_index(grid), [0, 1, 2, 3, 4, 15])


def test_rowmajor_orders_rows_then_columns(rng):
    grid = np.unique(rng.integers(0, 20, (150, 2)), axis=0)
    grid = grid[rng.permutation(len(grid))]
    ordered = grid[spatial_order(grid, "rowmajor")]
    key = ordered[:, 1] * 1000 + ordered[:, 0]
    assert (np.diff(key) > 0).all()


@pytest.mark.parametrize("mode", ["hilbert", "zorder", "rowmajor"])
def test_spatial_order_is_a_permutation_and_local(rng, mode):
    grid = _square(32)[rng.random(1024) < 0.7]
    perm = spatial_order(grid, mode)
    assert sorted(perm.tolist()) == list(range(len(grid)))
    mean_step = np.abs(np.diff(grid[perm], axis=0)).sum(axis=1).mean()
    random_step = np.abs(np.diff(grid[rng.permutation(len(grid))], axis=0)).sum(axis=1).mean()
    assert mean_step < random_step / 4


def test_spatial_order_rejects_unknown_mode_and_bad_grid():
    with pytest.raises(ValueError, match="unknown spatial order"):
        spatial_order(_square(2), "spiral")
    with pytest.raises(GridError, match="non-negative"):
        spatial_order(np.array([[-1, 0]]), "hilbert")
    with pytest.raises(GridError, match="integers"):
        spatial_order(np.array([[0.5, 0.0]]), "hilbert")


def test_cap_keeps_all_when_small(rng):
    grid = _square(10)
    np.testing.assert_array_equal(cap_tiles(grid, 100, rng), np.arange(100))


def test_cap_is_spatially_uniform_not_first_n(rng):
    grid = _square(100)[rng.random(10_000) < 0.8]
    cap = 500
    idx = cap_tiles(grid, cap, rng)
    assert len(idx) == cap and len(np.unique(idx)) == cap
    assert (np.diff(idx) > 0).all()  # sorted for h5 fancy indexing
    kept = grid[idx]
    # covers the bounding box: each 5x5 block of 20x20-cell windows gets its share
    hist, _, _ = np.histogram2d(kept[:, 0], kept[:, 1], bins=5, range=[[0, 100], [0, 100]])
    full, _, _ = np.histogram2d(grid[:, 0], grid[:, 1], bins=5, range=[[0, 100], [0, 100]])
    expected = full * cap / len(grid)
    assert np.abs(hist - expected).max() <= 0.35 * expected.mean()
    assert not np.array_equal(idx, np.arange(cap))


def test_cap_depends_on_rng_state(rng):
    grid = _square(40)
    seed = int(rng.integers(1 << 30))
    a = cap_tiles(grid, 200, np.random.default_rng(seed))
    b = cap_tiles(grid, 200, np.random.default_rng(seed))
    c = cap_tiles(grid, 200, np.random.default_rng(seed + 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
