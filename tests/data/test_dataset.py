import numpy as np
import pytest
import torch

from slidessl.data.dataset import SlideDataset
from slidessl.data.errors import SlideError
from slidessl.data.grid import hilbert_index, zorder_index


def _manifest(tmp_path, paths, extra=""):
    lines = ["slide_id,path,y"] + [f"{p.stem},{p.name},{i % 2}" for i, p in enumerate(paths)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n" + extra)
    return tmp_path / "m.csv"


@pytest.fixture
def cohort(tmp_path, slide_factory, rng):
    made = [slide_factory(n=int(rng.integers(100, 700)), dim=12) for _ in range(4)]
    return _manifest(tmp_path, [m[0] for m in made]), made


def _match_rows(item_grid, grid):
    """Row index in the file of each item tile, found by grid position."""
    lookup = {tuple(g): i for i, g in enumerate(grid)}
    return np.array([lookup[tuple(g)] for g in item_grid])


def test_items_are_float32_features_and_grid_in_hilbert_order(cohort):
    manifest, made = cohort
    ds = SlideDataset(manifest, max_tiles=None)
    assert len(ds) == 4 and ds.feature_dim == 12
    for i, (path, feats, _, grid) in enumerate(made):
        item = ds[i]
        assert item["slide_id"] == path.stem and item["index"] == i
        f, g = item["features"], item["grid"]
        assert f.dtype == torch.float32 and g.dtype == torch.int64
        assert f.shape == (len(feats), 12) and g.shape == (len(feats), 2)
        rows = _match_rows(g.numpy(), grid)
        np.testing.assert_array_equal(f.numpy(), feats[rows])  # features follow their tiles
        assert (np.diff(hilbert_index(g.numpy())) > 0).all()


@pytest.mark.parametrize("order", ["zorder", "rowmajor"])
def test_other_orders(cohort, order):
    ds = SlideDataset(cohort[0], max_tiles=None, order=order)
    g = ds[0]["grid"].numpy()
    if order == "rowmajor":
        key = g[:, 1] * 10_000 + g[:, 0]
        assert (np.diff(key) > 0).all()
    else:
        assert (np.diff(zorder_index(g)) > 0).all()


def test_cap_is_deterministic_per_seed_index_epoch(tmp_path, slide_factory):
    path, feats, _, grid = slide_factory(n=1500, dim=6, width=60)
    manifest = _manifest(tmp_path, [path])
    a = SlideDataset(manifest, max_tiles=200, seed=3)
    b = SlideDataset(manifest, max_tiles=200, seed=3)
    first = a[0]
    assert first["features"].shape == (200, 6) and first["num_tiles"] == 1500
    assert torch.equal(first["grid"], b[0]["grid"])
    a.set_epoch(1)
    assert not torch.equal(first["grid"], a[0]["grid"])
    a.set_epoch(0)
    assert torch.equal(first["grid"], a[0]["grid"])
    c = SlideDataset(manifest, max_tiles=200, seed=4)
    assert not torch.equal(first["grid"], c[0]["grid"])
    rows = _match_rows(first["grid"].numpy(), grid)
    np.testing.assert_array_equal(first["features"].numpy(), feats[rows])
    # spread over the slide, not the first rows of the file
    assert rows.max() > 1200 and rows.min() < 300


def test_manifest_stride_column_used(tmp_path, rng, layouts):
    grid = layouts.random_grid(rng, 50, 12)
    layouts.clam(tmp_path / "c.h5", rng.standard_normal((50, 4)), grid * 224)
    (tmp_path / "m.csv").write_text("slide_id,path,stride\nc,c.h5,224\n")
    ds = SlideDataset(tmp_path / "m.csv")
    assert ds._open(ds.entries[0]).stride_source == "manifest"
    np.testing.assert_array_equal(
        np.sort(ds[0]["grid"].numpy(), axis=0), np.sort(grid - grid.min(0), axis=0)
    )


def test_bad_slide_errors_by_default(tmp_path, cohort, layouts, rng):
    manifest, made = cohort
    bad = layouts.h5(tmp_path / "bad.h5", {"features": rng.standard_normal((5, 12))})
    manifest = _manifest(tmp_path, [m[0] for m in made] + [bad])
    with pytest.raises(SlideError, match="missing dataset 'coords'"):
        SlideDataset(manifest)


def test_bad_slides_skipped_with_warning(tmp_path, cohort, layouts, rng):
    _, made = cohort
    bad = layouts.h5(tmp_path / "bad.h5", {"features": rng.standard_normal((5, 12))})
    wide = layouts.clam(
        tmp_path / "wide.h5", rng.standard_normal((20, 99)), layouts.random_grid(rng, 20, 9)
    )
    manifest = _manifest(tmp_path, [m[0] for m in made] + [bad, wide])
    with pytest.warns(UserWarning, match="skipping slide"):
        ds = SlideDataset(manifest, on_bad_slide="skip")
    assert len(ds) == 4 and ds.feature_dim == 12
    reasons = dict(ds.skipped)
    assert set(reasons) == {"bad", "wide"}
    assert "missing dataset" in reasons["bad"] and "feature dim 99" in reasons["wide"]


def test_nan_found_on_read_returns_none_under_skip(tmp_path, rng, layouts):
    grid = layouts.random_grid(rng, 40, 10)
    feats = rng.standard_normal((40, 4)).astype(np.float32)
    feats[int(rng.integers(40)), 0] = np.nan
    layouts.clam(tmp_path / "n.h5", feats, grid * 256)
    manifest = _manifest(tmp_path, [tmp_path / "n.h5"])
    ds = SlideDataset(manifest, on_bad_slide="skip")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        assert ds[0] is None
    assert ds.skipped[0][0] == "n"
    with pytest.raises(SlideError, match="NaN/Inf"):
        SlideDataset(manifest)[0]
    dropped = SlideDataset(manifest, nan_policy="drop")[0]
    assert dropped["features"].shape == (39, 4)


def test_all_bad_is_an_error(tmp_path, layouts, rng):
    bad = layouts.h5(tmp_path / "bad.h5", {"features": rng.standard_normal((5, 12))})
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable slides"):
        SlideDataset(_manifest(tmp_path, [bad]), on_bad_slide="skip")


def test_argument_checks(cohort):
    with pytest.raises(ValueError, match="on_bad_slide"):
        SlideDataset(cohort[0], on_bad_slide="ignore")
    with pytest.raises(ValueError, match="order"):
        SlideDataset(cohort[0], order="spiral")
    with pytest.raises(IndexError):
        SlideDataset(cohort[0])[99]


def test_dataloader_with_fork_worker(cohort):
    ds = SlideDataset(cohort[0], max_tiles=64)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=1, multiprocessing_context="fork"
    )
    got = [item["slide_id"] for item in loader]
    assert got == ds.slide_ids
