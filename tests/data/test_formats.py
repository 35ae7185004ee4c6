"""Each writer's exact layout, written and read back."""

import numpy as np
import pytest
import torch

from slidessl.data.formats import SlideError, open_slide


def _grid(layouts, rng, n, width=48):
    return layouts.random_grid(rng, n, width)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_trident_layout(tmp_path, rng, layouts, dtype):
    n, d = int(rng.integers(50, 400)), int(rng.integers(4, 64))
    grid = _grid(layouts, rng, n)
    origin = rng.integers(0, 9000, 2)
    coords = grid * 512 + origin
    feats = rng.standard_normal((n, d)).astype(dtype)
    path = layouts.trident(tmp_path / "TCGA-AA-0001.h5", feats, coords)
    rec = open_slide(path)
    assert (rec.slide_id, rec.source_format, rec.num_tiles, rec.feature_dim) == (
        "TCGA-AA-0001",
        "trident",
        n,
        d,
    )
    assert rec.dtype == np.dtype(dtype).name
    assert (rec.stride, rec.stride_source) == (512.0, "attribute")
    assert rec.attrs["level0_magnification"] == 40
    np.testing.assert_array_equal(rec.coords, coords)
    np.testing.assert_array_equal(rec.grid, grid - grid.min(axis=0))
    out = rec.read_features()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, feats.astype(np.float32))


def test_trident_overlap_aware_stride(tmp_path, rng, layouts):
    # 256-px tiles at 20x from a 40x scan with 32 px overlap: step = 512 - 32 * 2 = 448
    grid = _grid(layouts, rng, 120)
    coords = grid * 448 + 7
    path = layouts.trident(tmp_path / "s.h5", rng.standard_normal((120, 8)), coords, overlap=32)
    rec = open_slide(path)
    assert (rec.stride, rec.stride_source) == (448.0, "attribute")
    np.testing.assert_array_equal(rec.grid, grid - grid.min(axis=0))


def test_clam_layout_infers_stride(tmp_path, rng, layouts):
    grid = _grid(layouts, rng, 200)
    coords = (grid * 256 + 1024).astype(np.int32)
    feats = rng.standard_normal((200, 32)).astype(np.float32)
    rec = open_slide(layouts.clam(tmp_path / "clam.h5", feats, coords))
    assert rec.source_format == "clam" and rec.coords.dtype == np.int64
    assert (rec.stride, rec.stride_source) == (256.0, "inferred")
    np.testing.assert_array_equal(rec.read_features(), feats)


def test_off_grid_coordinates_without_a_stride_are_refused(tmp_path, rng, layouts):
    """Whole-number coordinates jittered by up to 100 px off a 256-px grid, no
    patch_size_level0: the inferred stride (1) explains nothing; the error names the file
    and the fixes. With the stride given, the same file reads (the jitter is within it)."""
    grid = _grid(layouts, rng, 300)
    coords = grid * 256 + 4096 + rng.integers(-100, 101, size=grid.shape)
    path = layouts.clam(tmp_path / "jitter.h5", rng.standard_normal((300, 4)), coords)
    with pytest.raises(SlideError, match="`stride` column") as err:
        open_slide(path)
    assert "jitter.h5" in str(err.value) and "cannot explain the coordinates" in str(err.value)
    # exactly on the grid, the same tiles infer their stride
    clean = layouts.clam(tmp_path / "clean.h5", rng.standard_normal((300, 4)), grid * 256 + 4096)
    assert open_slide(clean).stride == 256.0


def test_gigapath_layout(tmp_path, rng, layouts):
    grid = _grid(layouts, rng, 64)
    feats = rng.standard_normal((64, 1536)).astype(np.float16)
    rec = open_slide(layouts.gigapath(tmp_path / "g.h5", feats, grid * 256))
    assert rec.source_format == "gigapath" and rec.feature_dim == 1536
    assert rec.stride == 256.0


def test_stride_option_and_manifest_sources(tmp_path, rng, layouts):
    grid = _grid(layouts, rng, 80)
    path = layouts.clam(tmp_path / "c.h5", rng.standard_normal((80, 4)), grid * 224)
    assert open_slide(path, stride=224).stride_source == "option"
    assert open_slide(path, stride=224, stride_source="manifest").stride_source == "manifest"
    # a file attribute wins over the option
    t = layouts.trident(tmp_path / "t.h5", rng.standard_normal((80, 4)), grid * 512)
    assert open_slide(t, stride=1000).stride_source == "attribute"


def test_npz_layout(tmp_path, rng, layouts):
    grid = _grid(layouts, rng, 150)
    feats = rng.standard_normal((150, 16)).astype(np.float16)
    path = tmp_path / "s.npz"
    np.savez_compressed(path, features=feats, coords=grid * 256)
    rec = open_slide(path)
    assert (rec.source_format, rec.dtype, rec.stride) == ("npz", "float16", 256.0)
    rows = rng.choice(150, 20, replace=False)
    np.testing.assert_array_equal(rec.read_features(rows), feats[rows].astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pt_dict_layout(tmp_path, rng, layouts, dtype):
    grid = _grid(layouts, rng, 90)
    feats = torch.from_numpy(rng.standard_normal((90, 12)).astype(np.float32)).to(dtype)
    path = tmp_path / "s.pt"
    torch.save({"features": feats, "coords": torch.from_numpy(grid * 512)}, path)
    rec = open_slide(path)
    assert rec.source_format == "pt" and rec.dtype == str(dtype).removeprefix("torch.")
    np.testing.assert_array_equal(rec.read_features(), feats.float().numpy())


def test_bare_pt_uses_sibling_h5_coords(tmp_path, rng, layouts):
    """CLAM keeps features in pt_files/X.pt and coords in h5_files/X.h5."""
    (tmp_path / "pt_files").mkdir()
    (tmp_path / "h5_files").mkdir()
    grid = _grid(layouts, rng, 70)
    feats = rng.standard_normal((70, 10)).astype(np.float32)
    torch.save(torch.from_numpy(feats), tmp_path / "pt_files" / "X.pt")
    layouts.clam(tmp_path / "h5_files" / "X.h5", feats, grid * 256)
    rec = open_slide(tmp_path / "pt_files" / "X.pt")
    assert rec.attrs["coords_from"].endswith("X.h5")
    np.testing.assert_array_equal(rec.grid, grid - grid.min(axis=0))
    np.testing.assert_array_equal(rec.read_features(), feats)


def test_bare_pt_without_coords_is_refused(tmp_path, rng):
    path = tmp_path / "lonely.pt"
    torch.save(torch.zeros(5, 3), path)
    with pytest.raises(SlideError, match="without coordinates") as info:
        open_slide(path)
    assert info.value.path == path


def test_pt_with_arbitrary_object_is_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    # numpy arrays are pickled objects: a weights_only load refuses them
    torch.save({"features": np.zeros((2, 2)), "coords": np.zeros((2, 2))}, path)
    with pytest.raises(SlideError, match="UnpicklingError"):
        open_slide(path)


def test_read_features_any_order_with_repeats(slide_factory, rng):
    path, feats, _, _ = slide_factory(n=500)
    rec = open_slide(path)
    rows = rng.integers(0, 500, 64)  # unsorted, with repeats
    np.testing.assert_array_equal(rec.read_features(rows), feats[rows])
    big = rng.choice(500, 400, replace=False)  # above the whole-read threshold (half)
    np.testing.assert_array_equal(rec.read_features(big), feats[big])
    assert rec.read_features(np.array([], dtype=np.int64)).shape == (0, feats.shape[1])
    with pytest.raises(SlideError, match="out of range"):
        rec.read_features(np.array([500]))


def test_open_reads_no_features(slide_factory, monkeypatch):
    """Opening touches coords only; the features are read on demand."""
    from slidessl.data import readers

    path, *_ = slide_factory(n=100)
    calls = []
    monkeypatch.setattr(readers, "read_rows", lambda *a, **k: calls.append(a))
    open_slide(path)
    assert calls == []


def test_subset_read_asks_h5_for_those_rows_only(slide_factory, rng, monkeypatch):
    """A small subset is read with sorted fancy indexing, not by loading the dataset."""
    import h5py

    path, feats, _, _ = slide_factory(n=2000, dim=8, width=80)
    rec = open_slide(path)
    seen = []
    original = h5py.Dataset.__getitem__

    def spy(self, key):
        seen.append(key)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    rows = rng.choice(2000, 100, replace=False)
    np.testing.assert_array_equal(rec.read_features(rows), feats[rows])
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], np.sort(rows))
