"""Slide maps are computed where the encoder runs (embed, demo) and only drawn by report."""

import json

import numpy as np
import pytest
import torch

from slidessl.cli import main
from slidessl.data.synthetic import make_cohort
from slidessl.eval.maps import map_data, pick_map_items, read_maps, write_maps
from slidessl.models import build_encoder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return make_cohort(root, 12, seed=5, dim=16, min_tiles=40, max_tiles=90)


def _item(rng, n, sid):
    grid = torch.from_numpy(rng.choice(400, size=n, replace=False)).long()
    return {
        "slide_id": sid,
        "features": torch.from_numpy(rng.standard_normal((n, 16)).astype(np.float32)),
        "grid": torch.stack([grid % 20, grid // 20], -1),
    }


def test_maps_round_trip_and_sum_to_one(rng, tmp_path):
    enc = build_encoder("tiny", in_dim=16).eval()
    items = [_item(rng, 30, "a/b.svs"), _item(rng, 45, "c")]
    path = write_maps(tmp_path / "x.maps.npz", enc, items)
    back = read_maps(path)
    assert [m["slide_id"] for m in back] == ["a/b.svs", "c"]
    for m, it in zip(back, items):
        want = map_data(enc, it)
        np.testing.assert_array_equal(m["grid"], it["grid"].numpy())
        np.testing.assert_allclose(m["attention"], want["attention"], rtol=1e-6)
        assert m["attention"].sum() == pytest.approx(1.0, abs=1e-5)
        assert m["rgb"].shape == (len(it["grid"]), 3) and 0 <= m["rgb"].min() <= m["rgb"].max() <= 1
    assert write_maps(tmp_path / "none.maps.npz", None, items) is None  # mean pooling: no map
    assert not (tmp_path / "none.maps.npz").exists()


def test_pick_map_items_spreads_over_the_cohort():
    assert pick_map_items(list(range(10)), 3) == [0, 4, 9]  # linspace 0, 4.5, 9 rounded
    assert pick_map_items(list(range(2)), 5) == [0, 1]
    assert pick_map_items([], 3) == [] and pick_map_items([1], 0) == []


def test_embed_stores_maps_and_report_draws_them_without_a_model(cohort, tmp_path, monkeypatch):
    emb = tmp_path / "rand.h5"
    assert main(["embed", "random:tiny", str(cohort), "--out", str(emb), "--maps", "2"]) == 0
    maps = tmp_path / "rand.maps.npz"
    assert len(read_maps(maps)) == 2
    folds = tmp_path / "folds.json"
    probe = ["probe", str(emb), str(cohort), "--task", "tumor_high", "--folds", str(folds)]
    assert main([*probe, "--k", "3", "--bootstrap", "20", "--out", str(tmp_path / "p")]) == 0

    def no_model(*a, **k):
        raise AssertionError("report must not load or run an encoder")

    monkeypatch.setattr("slidessl.load_encoder", no_model)
    monkeypatch.setattr("slidessl.eval.maps.cls_attention", no_model)
    assert main(["report", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert len(rep["slide_maps"]) == 2 and {m["method"] for m in rep["slide_maps"]} == {"rand"}
    for m in rep["slide_maps"]:
        assert (tmp_path / "figures" / m["path"].split("/")[-1]).stat().st_size > 1000
    meanpool = tmp_path / "mp.h5"
    assert main(["embed", "meanpool", str(cohort), "--out", str(meanpool)]) == 0
    assert not (tmp_path / "mp.maps.npz").exists()
