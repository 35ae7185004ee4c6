import numpy as np
import pytest
import torch
from _crop_slides import random_slide

from slidessl.data.grid import spatial_order
from slidessl.data.relayout import pack_compact
from slidessl.data.views import MultiCrop, MultiCropConfig

NO_AUG = {"flip": False, "rot90": False}


def _all_crops(out):
    return [(True, c) for c in out["global"]] + [(False, c) for c in out["local"]]


def test_default_crops_shapes_order_and_content(rng):
    slide = random_slide(rng)
    cfg = MultiCropConfig()
    out = MultiCrop(cfg)(slide, rng)
    assert out["slide_id"] == "slide"
    assert (len(out["global"]), len(out["local"])) == (2, 8)
    grid = slide["grid"].numpy()
    for is_global, crop in _all_crops(out):
        rows, coords = crop["rows"].numpy(), crop["coords"].numpy()
        n = len(rows)
        assert n >= (cfg.global_min_tiles if is_global else cfg.local_min_tiles)
        assert n <= (cfg.global_max_tiles if is_global else cfg.local_max_tiles)
        assert len(np.unique(rows)) == n
        torch.testing.assert_close(crop["features"], slide["features"][crop["rows"]])
        assert coords.min() == 0 and coords.dtype == np.int64
        # tokens in Hilbert order of the coordinates the model sees
        np.testing.assert_array_equal(spatial_order(coords, "hilbert"), np.arange(n))
        # rotations/flips keep the geometry: L1 distances between tokens are unchanged
        sub = rng.choice(n, size=min(n, 20), replace=False)
        d_true = np.abs(grid[rows][sub, None] - grid[rows][None, sub]).sum(-1)
        d_crop = np.abs(coords[sub, None] - coords[None, sub]).sum(-1)
        np.testing.assert_array_equal(d_true, d_crop)
        assert ("ibot_mask" in crop) == is_global


def test_without_augmentation_coords_are_shifted_true_positions(rng):
    slide = random_slide(rng)
    out = MultiCrop(MultiCropConfig(**NO_AUG))(slide, rng)
    for _, crop in _all_crops(out):
        g = slide["grid"][crop["rows"]]
        torch.testing.assert_close(crop["coords"], g - g.min(dim=0).values)


def test_scales_control_crop_size(rng):
    slide = random_slide(rng)
    n = len(slide["grid"])
    cfg = MultiCropConfig(
        global_scale=(1.0, 1.0),
        aspect_ratio=(1.0, 1.0),
        n_local=4,
        local_scale=(0.05, 0.1),
        **NO_AUG,
    )
    out = MultiCrop(cfg)(slide, rng)
    for crop in out["global"]:
        assert len(crop["rows"]) == n  # the whole bounding box
    for crop in out["local"]:
        assert len(crop["rows"]) < 0.5 * n
        span = crop["coords"].max(dim=0).values + 1
        box = (slide["grid"].max(dim=0).values + 1).prod()
        assert span.prod() <= 0.15 * box + 2 * span.sum()


def test_min_tiles_fallback_on_sparse_slide(rng):
    # two far-apart clusters: most windows are empty, the minimum must still hold
    a = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2)
    grid = np.concatenate([a, a + 200])
    slide = {
        "slide_id": "sparse",
        "index": 3,
        "features": torch.randn(len(grid), 4),
        "grid": torch.from_numpy(grid),
    }
    cfg = MultiCropConfig(
        global_min_tiles=30,
        local_min_tiles=20,
        local_scale=(0.01, 0.02),
        global_scale=(0.01, 0.02),
        max_tries=3,
    )
    out = MultiCrop(cfg)(slide, rng)
    for is_global, crop in _all_crops(out):
        assert len(crop["rows"]) >= (30 if is_global else 20)


def test_min_tiles_clamped_to_small_slides(rng):
    slide = {
        "slide_id": "tiny",
        "index": 0,
        "features": torch.randn(5, 3),
        "grid": torch.tensor([[0, 0], [1, 0], [4, 4], [9, 2], [3, 7]]),
    }
    out = MultiCrop(MultiCropConfig())(slide, rng)
    for crop in out["global"] + out["local"]:
        assert len(crop["rows"]) == 5


def test_cap_is_spatially_uniform(rng):
    slide = random_slide(rng, size=60, n_blobs=1)
    cfg = MultiCropConfig(
        global_scale=(1.0, 1.0),
        aspect_ratio=(1.0, 1.0),
        global_max_tiles=100,
        global_min_tiles=10,
        n_local=0,
        **NO_AUG,
    )
    out = MultiCrop(cfg)(slide, rng)
    grid = slide["grid"].numpy()
    for crop in out["global"]:
        kept = grid[crop["rows"].numpy()]
        assert len(kept) == 100
        # each half of the tissue (split at the median x) keeps about half of the tiles
        left = (kept[:, 0] <= np.median(grid[:, 0])).mean()
        assert 0.35 < left < 0.65


def test_compact_layout_crops_are_full(rng):
    slide = random_slide(rng, size=70)
    cfg = MultiCropConfig(
        layout="compact", position_coords="packed", local_max_tiles=8192, **NO_AUG
    )
    out = MultiCrop(cfg)(slide, rng)
    packed = pack_compact(slide["grid"].numpy())
    holes = (packed.max(axis=0) + 1).prod() - len(packed)  # all at the end of the layout
    for _, crop in _all_crops(out):
        coords = crop["coords"].numpy()
        span = coords.max(axis=0) + 1
        assert len(coords) >= span.prod() - holes  # a window on the packed grid is full


def test_compact_layout_keeps_true_positions_by_default(rng):
    slide = random_slide(rng, size=50)
    out = MultiCrop(MultiCropConfig(layout="compact", **NO_AUG))(slide, rng)
    for _, crop in _all_crops(out):
        g = slide["grid"][crop["rows"]]
        torch.testing.assert_close(crop["coords"], g - g.min(dim=0).values)


def test_feature_noise_is_relative_to_feature_std(rng):
    slide = random_slide(rng, size=60)
    slide["features"][:, 2:] *= 7.0
    cfg = MultiCropConfig(feature_noise=0.2, global_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0))
    out = MultiCrop(cfg)(slide, rng)
    crop = out["global"][0]
    diff = crop["features"] - slide["features"][crop["rows"]]
    ratio = diff[:, 2:].std() / slide["features"][:, 2:].std(dim=0).mean()
    assert 0.17 < float(ratio) < 0.23


def test_feature_shift_and_gain_are_one_draw_per_crop(rng):
    slide = random_slide(rng, size=60)
    cfg = MultiCropConfig(
        feature_shift=0.5, feature_gain=0.3, n_local=4, local_scale=(0.3, 0.5), **NO_AUG
    )
    out = MultiCrop(cfg)(slide, rng)
    spread = slide["features"].std(dim=0)
    shifts = []
    for _, crop in _all_crops(out):
        src = slide["features"][crop["rows"]]
        # x' = g * x + s with one g and one s per crop: least squares, then an exact check
        dx, dy = src - src.mean(0), crop["features"] - crop["features"].mean(0)
        gain = float((dx * dy).sum() / (dx * dx).sum())
        shift = crop["features"].mean(0) - gain * src.mean(0)
        torch.testing.assert_close(crop["features"], gain * src + shift, rtol=1e-4, atol=1e-4)
        assert 0.7 - 1e-4 <= gain <= 1.3 + 1e-4
        shifts.append(shift / spread)
    shifts = torch.stack(shifts)
    assert 0.3 < float(shifts.std()) < 0.7  # N(0, 0.5 std) per dimension
    assert not torch.allclose(shifts[0], shifts[1])  # a fresh draw for every crop


def test_token_drop_fraction(rng):
    slide = random_slide(rng, size=60)
    n = len(slide["grid"])
    cfg = MultiCropConfig(token_drop=0.4, global_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0))
    out = MultiCrop(cfg)(slide, rng)
    assert len(out["global"][0]["rows"]) == round(0.6 * n)


def test_ibot_masks_on_global_crops(rng):
    slide = random_slide(rng)
    cfg = MultiCropConfig(mask_probability=1.0, mask_ratio=(0.3, 0.3))
    out = MultiCrop(cfg)(slide, rng)
    for crop in out["global"]:
        m = crop["ibot_mask"]
        assert m.dtype == torch.bool and m.shape == crop["rows"].shape
        assert int(m.sum()) == round(0.3 * len(m))
    off = MultiCrop(MultiCropConfig(mask_probability=0.0))(slide, rng)
    assert not any(bool(c["ibot_mask"].any()) for c in off["global"])


def test_global_crops_carry_a_seeded_shuffle_of_their_positions(rng):
    """``shuffled_coords`` (the arrangement contrast's negative) permutes a global crop's
    positions among its tiles; it is drawn from a child generator, so the parent stream -
    every crop, mask and augmentation after it - is the one it would have been without."""
    slide = random_slide(rng)
    seed = int(rng.integers(1 << 30))
    print("seed", seed)
    out = MultiCrop(MultiCropConfig())(slide, np.random.default_rng(seed))
    for crop in out["global"]:
        c, s = crop["coords"], crop["shuffled_coords"]
        assert s.shape == c.shape and s.dtype == c.dtype
        assert sorted(map(tuple, s.tolist())) == sorted(map(tuple, c.tolist()))
        assert not torch.equal(s, c)
    assert all("shuffled_coords" not in crop for crop in out["local"])
    # spawning leaves the parent's stream where it was
    ref = np.random.default_rng(seed).random(3)
    parent = np.random.default_rng(seed)
    child = parent.spawn(1)[0]
    assert np.array_equal(parent.random(3), ref) and not np.array_equal(child.random(3), ref)


def test_same_seed_same_crops():
    slide = random_slide(np.random.default_rng(1))
    cfg = MultiCropConfig(feature_noise=0.1, token_drop=0.1)
    a = MultiCrop(cfg)(slide, np.random.default_rng(7))
    b = MultiCrop(cfg)(slide, np.random.default_rng(7))
    for ca, cb in zip(a["global"] + a["local"], b["global"] + b["local"]):
        for key in ca:
            torch.testing.assert_close(ca[key], cb[key])


@pytest.mark.parametrize(
    "section, needle",
    [
        ({"n_globals": 2}, "unknown crops option"),
        ({"global_scale": (0.5, 0.2)}, "global_scale"),
        ({"local_scale": (0.0, 0.2)}, "local_scale"),
        ({"layout": "square"}, "layout"),
        ({"token_drop": 1.0}, "token_drop"),
        ({"feature_shift": -0.1}, "feature_shift"),
        ({"feature_gain": 1.0}, "feature_gain"),
        ({"local_max_tiles": 4}, "local_max_tiles"),
        ({"packing": "random"}, "packing"),
        ({"mask_ratio": (0.2, 1.5)}, "mask_ratio"),
    ],
)
def test_config_errors_name_the_option(section, needle):
    with pytest.raises(ValueError, match=needle):
        MultiCropConfig.from_dict(section)


def test_bad_slides_name_the_slide(rng):
    crop = MultiCrop(MultiCropConfig())
    empty = {
        "slide_id": "s-empty",
        "features": torch.zeros(0, 4),
        "grid": torch.zeros(0, 2, dtype=torch.long),
    }
    with pytest.raises(ValueError, match="s-empty.*no tiles"):
        crop(empty, rng)
    bad = {"slide_id": "s-bad", "features": torch.zeros(3, 4), "grid": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="s-bad.*grid"):
        crop(bad, rng)


def _grid_neighbour_share(grid: np.ndarray, rows: np.ndarray) -> float:
    """Of the slide's 4-neighbour pairs touching the crop's tiles, the share kept in it."""
    cells = {tuple(c) for c in grid.tolist()}
    inside = {tuple(c) for c in grid[rows].tolist()}
    kept = total = 0
    for x, y in inside:
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if (x + dx, y + dy) in cells:
                total += 1
                kept += (x + dx, y + dy) in inside
    return kept / max(total, 1)


def test_shrink_keeps_full_density_where_thin_does_not(rng):
    """A window above its cap: `thin` subsamples it (neighbours lost), `shrink` keeps a
    compact window of exactly `cap` tiles at the tissue's density."""
    slide = random_slide(rng, size=60)
    grid = slide["grid"].numpy()
    base = dict(NO_AUG, n_global=1, n_local=3, global_scale=(0.8, 1.0), local_scale=(0.3, 0.5))
    base.update(global_max_tiles=150, local_max_tiles=40)
    shares = {}
    for mode in ("thin", "shrink"):
        out = MultiCrop(MultiCropConfig(**base, oversize=mode))(slide, np.random.default_rng(1))
        crops = [c for _, c in _all_crops(out)]
        assert [len(c["rows"]) for c in crops] == [150, 40, 40, 40]
        shares[mode] = np.mean([_grid_neighbour_share(grid, c["rows"].numpy()) for c in crops])
        if mode == "shrink":
            for c in crops:  # compact: the crop's bounding box is not much larger than it
                w, h = np.ptp(c["coords"].numpy(), axis=0) + 1
                assert w * h <= 2.5 * len(c["rows"])
    assert shares["shrink"] > 0.6 > 0.4 > shares["thin"]


def test_region_crops_stay_inside_one_region(rng):
    slide = random_slide(rng, size=70)
    grid = slide["grid"].numpy()
    cfg = MultiCropConfig(**NO_AUG, n_local=4, region_max_tiles=200, oversize="shrink")
    for seed in range(5):
        out = MultiCrop(cfg)(slide, np.random.default_rng(seed))
        rows = np.unique(np.concatenate([c["rows"].numpy() for _, c in _all_crops(out)]))
        assert len(rows) <= 200  # every crop lies in the same region of at most 200 tiles
        w, h = np.ptp(grid[rows], axis=0) + 1
        assert max(w, h) <= 2 * int(np.ceil(np.sqrt(200)))  # and the region is compact
    with pytest.raises(ValueError, match="region_max_tiles"):
        MultiCropConfig(region_max_tiles=0)
    with pytest.raises(ValueError, match="oversize"):
        MultiCropConfig(oversize="squash")


def test_crops_carry_their_slide_mean(rng):
    from slidessl.data.collate import collate_views

    slide = random_slide(rng)
    out = MultiCrop(MultiCropConfig(n_local=2))(slide, rng)
    mean = slide["features"].double().mean(0).float()
    for _, c in _all_crops(out):
        torch.testing.assert_close(c["center"], mean)
    batch = collate_views([out, out])
    assert batch["global"]["center"].shape == (4, slide["features"].shape[1])
    assert batch["local"]["center"].shape == (4, slide["features"].shape[1])
