"""One test per validation error: each names the file and the problem."""

import h5py
import numpy as np
import pytest

from slidessl.data.formats import SlideError, open_slide


def _raises(path, match, **kw):
    with pytest.raises(SlideError, match=match) as info:
        open_slide(path, **kw)
    assert info.value.path == path and str(path) in str(info.value)
    return info.value


@pytest.fixture
def base(rng, layouts):
    grid = layouts.random_grid(rng, 60, 20)
    return rng.standard_normal((60, 8)).astype(np.float32), grid * 256


def test_missing_dataset(tmp_path, layouts, base):
    feats, _ = base
    path = layouts.h5(tmp_path / "s.h5", {"features": feats})
    _raises(path, r"missing dataset 'coords'")


def test_length_mismatch(tmp_path, layouts, base):
    feats, coords = base
    path = layouts.h5(tmp_path / "s.h5", {"features": feats[:-3], "coords": coords})
    _raises(path, "features have 57 rows but coords have 60")


def test_coords_not_n_by_2(tmp_path, layouts, base):
    feats, coords = base
    path = layouts.h5(tmp_path / "s.h5", {"features": feats, "coords": coords[:, :1]})
    _raises(path, r"coords must have shape \(N, 2\)")


def test_features_not_2d(tmp_path, layouts, base):
    feats, coords = base
    path = layouts.h5(tmp_path / "s.h5", {"features": feats[None], "coords": coords})
    _raises(path, r"features must have shape \(N, D\)")


def test_integer_features_refused(tmp_path, layouts, base):
    feats, coords = base
    path = layouts.h5(tmp_path / "s.h5", {"features": feats.astype(np.int32), "coords": coords})
    _raises(path, "dtype int32")


def test_nan_error_on_read(tmp_path, layouts, base, rng):
    feats, coords = base
    bad = rng.choice(60, 3, replace=False)
    feats[bad[0], 0], feats[bad[1], 2], feats[bad[2], 5] = np.nan, np.inf, -np.inf
    path = layouts.clam(tmp_path / "s.h5", feats, coords)
    rec = open_slide(path)  # lazy: found when read
    with pytest.raises(SlideError, match="3 of the 60 rows read hold NaN/Inf"):
        rec.read_features()
    good = np.setdiff1d(np.arange(60), bad)
    np.testing.assert_array_equal(rec.read_features(good), feats[good])
    np.testing.assert_array_equal(np.sort(rec.scan_nonfinite()), np.sort(bad))


def test_nan_drop_with_count(tmp_path, layouts, base, rng, caplog):
    feats, coords = base
    bad = rng.choice(60, 4, replace=False)
    feats[bad, 1] = np.nan
    path = layouts.clam(tmp_path / "s.h5", feats, coords)
    rec = open_slide(path, nan_policy="drop")
    keep = np.setdiff1d(np.arange(60), bad)
    assert rec.num_tiles == 56 and rec.attrs["dropped_nonfinite"] == 4
    assert "dropped 4 of 60" in caplog.text
    np.testing.assert_array_equal(rec.coords, coords[keep])
    np.testing.assert_array_equal(rec.read_features(), feats[keep])
    np.testing.assert_array_equal(rec.read_features(np.array([2, 0])), feats[keep[[2, 0]]])


def test_all_nan_drop_is_zero_tiles(tmp_path, layouts, base):
    feats, coords = base
    path = layouts.clam(tmp_path / "s.h5", np.full_like(feats, np.nan), coords)
    _raises(path, "zero tiles", nan_policy="drop")


def test_zero_tiles(tmp_path, layouts):
    path = layouts.h5(
        tmp_path / "s.h5", {"features": np.zeros((0, 8), np.float32), "coords": np.zeros((0, 2))}
    )
    _raises(path, "zero tiles")


def test_duplicate_coordinates(tmp_path, layouts, base):
    feats, coords = base
    coords = coords.copy()
    coords[7] = coords[3]
    path = layouts.clam(tmp_path / "s.h5", feats, coords)
    _raises(path, "duplicate coordinates: 1 tiles")


def test_negative_coordinates(tmp_path, layouts, base):
    feats, coords = base
    path = layouts.clam(tmp_path / "s.h5", feats, coords - 512)
    _raises(path, "negative coordinates")


def test_non_integer_coordinates(tmp_path, layouts, base):
    feats, coords = base
    path = layouts.h5(tmp_path / "s.h5", {"features": feats, "coords": coords + 0.5})
    _raises(path, "not whole numbers")


def test_stride_collapsing_grid(tmp_path, layouts, rng):
    grid = np.unique(rng.integers(0, 4, (12, 2)), axis=0)
    coords = grid * 16 + 2048  # 16-px gaps read with the file's 512-px stride
    path = layouts.trident(tmp_path / "s.h5", rng.standard_normal((len(grid), 4)), coords)
    err = _raises(path, "collapses the grid")
    assert "stride from attribute" in str(err)


def test_stride_not_dividing_gaps(tmp_path, layouts, base):
    feats, coords = base
    path = layouts.clam(tmp_path / "s.h5", feats, coords)
    _raises(path, "does not divide", stride=300)


def test_nonpositive_option_stride(tmp_path, layouts, base):
    feats, coords = base
    path = layouts.clam(tmp_path / "s.h5", feats, coords)
    _raises(path, "option stride must be positive", stride=-5)


def test_feature_dim_mismatch(tmp_path, layouts, base):
    feats, coords = base
    path = layouts.clam(tmp_path / "s.h5", feats, coords)
    _raises(path, "feature dim 8 differs from the dataset's 16", expected_dim=16)


def test_truncated_file(tmp_path, slide_factory):
    path, *_ = slide_factory(n=400, dim=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(path, "unreadable or truncated")


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "s.h5"
    path.write_text("slide_id,path\n")
    _raises(path, "unreadable or truncated HDF5")


def test_truncated_npz(tmp_path, rng):
    path = tmp_path / "s.npz"
    np.savez(path, features=rng.standard_normal((50, 4)), coords=np.arange(100).reshape(50, 2))
    path.write_bytes(path.read_bytes()[:300])
    _raises(path, "unreadable or truncated .npz")


def test_unknown_extension(tmp_path):
    path = tmp_path / "s.parquet"
    path.write_bytes(b"PAR1")
    _raises(path, "unknown extension '.parquet'")


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.h5", "file not found")


def test_group_instead_of_dataset(tmp_path, base):
    feats, coords = base
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_group("features")
        f.create_dataset("coords", data=coords)
    _raises(path, "'features' is a group")


def test_bad_nan_policy(tmp_path, slide_factory):
    path, *_ = slide_factory(n=10)
    with pytest.raises(ValueError, match="nan_policy"):
        open_slide(path, nan_policy="ignore")
