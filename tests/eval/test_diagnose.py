"""The diagnostics: coordinate shuffle, slide-identity leakage, per-layer probes."""

import json

import numpy as np
import torch

from slidessl.cli import main
from slidessl.eval.diagnose import coordinate_shuffle, identity_leakage, layer_embeddings
from slidessl.models import build_encoder


def _items(rng, n=10, d=6):
    out = []
    for i in range(n):
        g = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(6), indexing="xy"), -1)
        out.append({"slide_id": f"s{i}", "features": torch.randn(48, d), "grid": g.reshape(-1, 2)})
    return out


def test_shuffle_leaves_mean_pooling_and_moves_a_spatial_encoder(rng):
    items = _items(rng)
    assert coordinate_shuffle(None, items, "mean")["shuffle_shift"] < 1e-6
    enc = build_encoder("tiny", in_dim=6, attention="dense", local_kernel=3, local_depth=2).eval()
    for p in enc.parameters():
        p.data += 0.2 * torch.randn_like(p)
    res = coordinate_shuffle(enc, items, "mean")
    assert res["shuffle_shift"] > 0.01 and res["between_distance"] > 0


def test_identity_leakage_sees_a_slide_signature(rng):
    """Slides whose tiles all carry a slide-specific offset: mean pooling retrieves the
    same slide from any window; the label (unrelated to the offset) is at chance."""
    items = _items(rng, n=12)
    for it in items:
        it["features"] += 6.0 * torch.randn(1, it["features"].shape[1])
    labels = {"y": {it["slide_id"]: i % 2 for i, it in enumerate(items)}}
    patients = {it["slide_id"]: it["slide_id"] for it in items}
    res = identity_leakage(None, items, labels, patients, "mean")
    assert res["same_slide_top1"] == 1.0 and res["n_windows"] == 24
    assert 0.0 <= res["same_label_top1"]["y"] <= 1.0


def test_layer_embeddings_match_the_forward(rng):
    enc = build_encoder("tiny", in_dim=6, attention="dense").eval()
    items = _items(rng, n=3)
    out = layer_embeddings(enc, items)
    assert sorted(out) == ["cls@0", "cls@1", "cls@2", "mean@0", "mean@1", "mean@2"]
    assert all(v.shape == (3, 64) for v in out.values())
    with torch.no_grad():
        x = torch.stack([it["features"] for it in items])
        g = torch.stack([it["grid"] for it in items])
        np.testing.assert_allclose(out["cls@2"], enc(x, g).numpy(), rtol=1e-5, atol=1e-5)


def test_diagnose_cli(tmp_path, capsys):
    from slidessl.data.synthetic import make_cohort

    m = make_cohort(tmp_path / "c", 24, seed=2, dim=8, min_tiles=60, max_tiles=120)
    assert main(["diagnose", "random:tiny", str(m), "--task", "infiltrated", "--out",
                 str(tmp_path / "d"), "--k", "3"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "coordinate shuffle" in text and "identity leakage" in text and "cls@2" in text
    res = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert set(res["layers"]) == {f"{p}@{i}" for p in ("cls", "mean") for i in range(3)}
    assert main(["diagnose", "meanpool", str(m), "--task", "infiltrated", "--out",
                 str(tmp_path / "e"), "--k", "3"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "e" / "diagnose.json").read_text())
    assert res["coordinate_shuffle"]["shuffle_shift"] < 1e-6 and res["layers"] == {}
