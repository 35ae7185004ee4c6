import pytest
import torch
from _crop_slides import random_slide

from slidessl.data.collate import collate_views, pad_crops
from slidessl.data.views import MultiCrop, MultiCropConfig


def _views(rng, n_slides=3, **cfg):
    crop = MultiCrop(MultiCropConfig(n_local=3, **cfg))
    return [crop(random_slide(rng, size=40, dim=8, slide_id=f"s{i}"), rng) for i in range(n_slides)]


def test_crop_major_padded_batch(rng):
    views = _views(rng, mask_probability=1.0)
    batch = collate_views(views)
    b, g, ell = 3, 2, 3
    assert (batch["batch_size"], batch["n_global"], batch["n_local"]) == (b, g, ell)
    assert batch["slide_ids"] == ["s0", "s1", "s2"]
    glob, loc = batch["global"], batch["local"]
    n_g = max(len(c["rows"]) for v in views for c in v["global"])
    assert glob["features"].shape == (b * g, n_g, 8)
    assert glob["coords"].shape == (b * g, n_g, 2) and glob["coords"].dtype == torch.long
    assert glob["padding_mask"].shape == glob["ibot_mask"].shape == (b * g, n_g)
    assert loc["features"].shape[0] == b * ell and "ibot_mask" not in loc
    for kind, count, part in (("global", g, glob), ("local", ell, loc)):
        for k in range(count):
            for s in range(b):
                row = k * b + s  # crop-major
                crop = views[s][kind][k]
                n = len(crop["rows"])
                torch.testing.assert_close(part["features"][row, :n], crop["features"])
                torch.testing.assert_close(part["coords"][row, :n], crop["coords"])
                assert not part["padding_mask"][row, :n].any()
                assert part["padding_mask"][row, n:].all()
                assert not part["features"][row, n:].any()
                if kind == "global":
                    torch.testing.assert_close(part["ibot_mask"][row, :n], crop["ibot_mask"])
                    assert not part["ibot_mask"][row, n:].any()
    # chunking by crop gives one row per slide
    assert [c.shape[0] for c in glob["features"].chunk(g)] == [b, b]


def test_none_entries_are_dropped(rng):
    views = _views(rng, n_slides=2)
    batch = collate_views([None, views[0], None, views[1]])
    assert batch["batch_size"] == 2 and batch["slide_ids"] == ["s0", "s1"]
    assert collate_views([None, None]) is None


def test_pad_to_multiple(rng):
    batch = collate_views(_views(rng, n_slides=2), pad_to_multiple=64)
    assert batch["global"]["features"].shape[1] % 64 == 0
    assert batch["local"]["padding_mask"].shape[1] % 64 == 0


def test_mismatched_slides_are_a_clear_error(rng):
    a = _views(rng, n_slides=1)[0]
    b = MultiCrop(MultiCropConfig(n_local=1))(random_slide(rng, size=30, dim=8, slide_id="x"), rng)
    with pytest.raises(ValueError, match="slide x: 2 global / 1 local"):
        collate_views([a, b])
    c = MultiCrop(MultiCropConfig(n_local=3))(random_slide(rng, size=30, dim=5, slide_id="y"), rng)
    with pytest.raises(ValueError, match="feature dimensions"):
        collate_views([a, c])


def test_pad_crops_checks_lengths():
    bad = {"features": torch.zeros(3, 2), "coords": torch.zeros(2, 2, dtype=torch.long)}
    with pytest.raises(ValueError, match="3 feature rows but 2 coordinates"):
        pad_crops([bad])
    with pytest.raises(ValueError, match="pad_to_multiple"):
        pad_crops([], pad_to_multiple=0)
    empty = pad_crops([], feature_dim=4)
    assert empty["features"].shape == (0, 0, 4)


def test_no_local_crops(rng):
    crop = MultiCrop(MultiCropConfig(n_local=0))
    views = [crop(random_slide(rng, size=40, dim=6, slide_id=str(i)), rng) for i in range(2)]
    batch = collate_views(views)
    assert batch["local"]["features"].shape == (0, 0, 6)
    assert batch["global"]["features"].shape[0] == 4
    assert int((~batch["global"]["padding_mask"]).sum(1).min()) >= 32  # global_min_tiles
