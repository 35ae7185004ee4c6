import numpy as np
import pytest
from _crop_slides import blob_grid

from slidessl.data.relayout import (
    PACKINGS,
    default_band_height,
    neighbour_retention,
    pack_compact,
)
from slidessl.data.tissue import tissue_grid


def _brute_retention(grid, packed):
    where = {tuple(v): i for i, v in enumerate(grid.tolist())}
    kept = total = 0
    for i, (x, y) in enumerate(grid.tolist()):
        for nb in ((x + 1, y), (x, y + 1)):
            j = where.get(nb)
            if j is not None:
                total += 1
                kept += int(np.abs(packed[i] - packed[j]).sum() == 1)
    return kept / total


def test_neighbour_retention_matches_brute_force(rng):
    grid = blob_grid(rng, size=30)
    packed = grid[rng.permutation(len(grid))]  # some random bijection onto the same cells
    assert neighbour_retention(grid, packed) == pytest.approx(_brute_retention(grid, packed))
    assert neighbour_retention(grid, grid + 5) == 1.0


@pytest.mark.parametrize("packing", PACKINGS)
def test_packing_is_a_bijection_onto_a_near_square(rng, packing):
    grid = blob_grid(rng, size=int(rng.integers(20, 70))) + rng.integers(0, 50, 2)
    packed = pack_compact(grid, packing)
    n = len(grid)
    assert packed.dtype == np.int64 and packed.shape == (n, 2)
    assert len(np.unique(packed, axis=0)) == n
    assert packed.min() == 0
    width, height = packed.max(axis=0) + 1
    assert width * height - n < 2 * max(width, height)  # holes only at the very end
    assert abs(int(width) - int(height)) <= 2 * default_band_height(n) + 1


def test_full_rectangle_is_packed_without_loss():
    yy, xx = np.mgrid[0:32, 0:32]
    grid = np.stack([xx.ravel(), yy.ravel()], 1)[np.random.default_rng(0).permutation(1024)]
    assert neighbour_retention(grid, pack_compact(grid)) == 1.0


def test_strips_keep_most_neighbours_on_irregular_slides(rng, record_property):
    """The acceptance number: share of true 4-neighbour pairs kept by the compact layout."""
    kept = {p: [] for p in PACKINGS}
    for target in (1000, 3000, 8000, 20000):
        grid = tissue_grid(rng, target, 500, 100_000)
        for p in PACKINGS:
            kept[p].append(neighbour_retention(grid, pack_compact(grid, p)))
    summary = {p: round(float(np.mean(v)), 3) for p, v in kept.items()}
    print(f"neighbour retention on synthetic slides (1k-20k tiles): {summary}")
    record_property("neighbour_retention", summary)
    assert min(kept["strips"]) >= 0.8
    assert np.mean(kept["strips"]) > np.mean(kept["file_order"]) + 0.25


def test_band_height_override_changes_the_layout(rng):
    grid = tissue_grid(rng, 3000, 500, 100_000)
    a, b = pack_compact(grid, band_height=4), pack_compact(grid, band_height=16)
    assert not np.array_equal(a, b)
    assert len(np.unique(b, axis=0)) == len(grid)


@pytest.mark.parametrize(
    "grid, kwargs, needle",
    [
        (np.array([[0, 0], [0, 0]]), {}, "share a grid cell"),
        (np.zeros((3, 2)) + 0.5, {}, "integers"),
        (np.array([[0, 0], [1, 0]]), {"packing": "snake"}, "unknown packing"),
        (np.array([[0, 0], [1, 0]]), {"band_height": 0}, "band_height"),
    ],
)
def test_bad_input_is_a_clear_error(grid, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        pack_compact(grid, **kwargs)


def test_tiny_slides():
    assert pack_compact(np.zeros((0, 2), dtype=np.int64)).shape == (0, 2)
    np.testing.assert_array_equal(pack_compact(np.array([[7, 3]])), [[0, 0]])
