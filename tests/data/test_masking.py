import numpy as np
import pytest
from _crop_slides import blob_grid

from slidessl.data.masking import block_mask, sample_mask


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 0.5, 1.0])
def test_exact_ratio_on_irregular_grids(rng, ratio):
    grid = blob_grid(rng, size=40)
    m = block_mask(grid, ratio, rng)
    assert m.dtype == bool and m.shape == (len(grid),)
    assert int(m.sum()) == round(ratio * len(grid))


def test_masks_are_blocks_not_salt_and_pepper(rng):
    yy, xx = np.mgrid[0:40, 0:40]
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    where = {tuple(v): i for i, v in enumerate(grid.tolist())}
    m = block_mask(grid, 0.3, rng, min_block_tiles=16)
    # share of masked tiles with a masked 4-neighbour: ~1 for blocks, ~0.76 for random tiles
    masked = np.flatnonzero(m)
    with_nb = 0
    for i in masked:
        x, y = grid[i]
        nbs = [where.get((x + dx, y + dy)) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        with_nb += any(j is not None and m[j] for j in nbs)
    assert with_nb / len(masked) > 0.9
    # the masked region is made of few connected blocks, not hundreds of islands
    assert _components(grid, m) <= 30


def _components(grid, mask):
    cells = {tuple(v) for v in grid[mask].tolist()}
    seen, count = set(), 0
    for start in cells:
        if start in seen:
            continue
        count += 1
        stack = [start]
        seen.add(start)
        while stack:
            x, y = stack.pop()
            for nb in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if nb in cells and nb not in seen:
                    seen.add(nb)
                    stack.append(nb)
    return count


def test_different_draws_differ(rng):
    grid = blob_grid(rng, size=30)
    a, b = block_mask(grid, 0.3, rng), block_mask(grid, 0.3, rng)
    assert not np.array_equal(a, b)


def test_sample_mask_probability_and_range(rng):
    grid = blob_grid(rng, size=30)
    n = len(grid)
    draws = [sample_mask(grid, rng, probability=0.5, ratio=(0.2, 0.4)) for _ in range(200)]
    counts = np.array([int(d.sum()) for d in draws])
    masked = counts > 0
    assert 0.35 < masked.mean() < 0.65
    assert counts[masked].min() >= round(0.2 * n) and counts[masked].max() <= round(0.4 * n)
    assert not sample_mask(grid, rng, probability=0.0).any()


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"ratio": 1.5}, "ratio"), ({"ratio": 0.2, "aspect": (2.0, 1.0)}, "aspect")],
)
def test_bad_arguments(rng, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        block_mask(np.zeros((4, 2), dtype=np.int64), rng=rng, **kwargs)
    with pytest.raises(ValueError, match="probability"):
        sample_mask(np.zeros((4, 2), dtype=np.int64), rng, probability=2.0)


def _deep_share(grid, m, r=2):
    """Share of masked tiles whose whole (2r+1)^2 neighbourhood is masked (nothing left to
    predict them from within a 5 x 5 receptive field)."""
    where = {tuple(v): i for i, v in enumerate(grid.tolist())}
    deep = 0
    for i in np.flatnonzero(m):
        x, y = grid[i]
        nbs = [where.get((x + dx, y + dy)) for dx in range(-r, r + 1) for dy in range(-r, r + 1)]
        deep += all(j is None or m[j] for j in nbs)
    return deep / max(int(m.sum()), 1)


def test_max_block_tiles_keeps_unmasked_neighbours(rng):
    yy, xx = np.mgrid[0:40, 0:40]
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    big = block_mask(grid, 0.4, rng)
    small = block_mask(grid, 0.4, rng, max_block_tiles=4)
    assert int(small.sum()) == int(big.sum()) == 640  # the ratio stays exact
    assert _deep_share(grid, big) > 0.3
    assert _deep_share(grid, small) < _deep_share(grid, big) / 3
    assert _components(grid, small) > 2 * _components(grid, big)
