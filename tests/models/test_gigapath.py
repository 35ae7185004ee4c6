"""Prov-GigaPath weight import: key mapping, strict report, output equivalence."""

import pytest
import torch

from slidessl.models.gigapath import gigapath_forward, load_gigapath, pixel_to_grid

SMALL = dict(depth=2, embed_dim=64, mlp_dim=128, in_dim=32)


def _published_state(enc):
    """Our state dict renamed to Prov-GigaPath's published key names."""
    out = {}
    for k, v in enc.state_dict().items():
        if k == "mask_token":
            continue
        k = k.replace("patch_embed.", "patch_embed.proj.").replace("blocks.", "encoder.layers.")
        k = k.replace("encoder_norm.", "encoder.layer_norm.")
        out[k] = v.clone() + 0.01 * torch.randn_like(v)
    return out


def test_import_maps_every_key(tmp_path):
    from slidessl.models import build_encoder

    src = build_encoder("gigapath", **SMALL)
    state = _published_state(src)
    state["pos_embed"] = torch.zeros(1, 5, 64)  # old checkpoints may carry the fixed table
    torch.save({"model": state}, tmp_path / "slide_encoder.pth")
    enc = load_gigapath(tmp_path / "slide_encoder.pth", **SMALL)
    assert not enc.training
    torch.testing.assert_close(
        enc.blocks[1].self_attn.inner_attn_ln.weight,
        state["encoder.layers.1.self_attn.inner_attn_ln.weight"],
    )
    torch.testing.assert_close(enc.patch_embed.weight, state["patch_embed.proj.weight"])
    torch.testing.assert_close(enc.encoder_norm.bias, state["encoder.layer_norm.bias"])
    x = torch.randn(1, 31, 32)
    grid = pixel_to_grid(torch.randint(0, 256 * 900, (1, 31, 2)).float())
    outs = gigapath_forward(enc, x, grid, all_layer_embed=True)
    assert len(outs) == 3 and outs[0].shape == (1, 64)
    torch.testing.assert_close(
        outs[-1], enc.norm(enc.forward_features(x, grid, return_layers=True)["layers"][-1])[:, 0]
    )
    pooled = load_gigapath(tmp_path / "slide_encoder.pth", global_pool=True, **SMALL)
    assert pooled.config["pool"] == "mean"


def test_strict_report_lists_missing_and_unexpected(tmp_path):
    from slidessl.models import build_encoder

    state = _published_state(build_encoder("gigapath", **SMALL))
    del state["encoder.layers.0.ffn.fc1.weight"]
    state["encoder.layers.0.ffn.fc3.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth.*\n.*missing \(1\): blocks.0.ffn.fc1.weight"):
        load_gigapath(tmp_path / "bad.pth", **SMALL)
    state.pop("encoder.layers.0.ffn.fc3.weight")
    state["decoder.head"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "bad2.pth")
    with pytest.raises(ValueError, match="unexpected Prov-GigaPath key.*decoder.head"):
        load_gigapath(tmp_path / "bad2.pth", **SMALL)
    with pytest.raises(FileNotFoundError):
        load_gigapath(tmp_path / "missing.pth")


def test_pixel_to_grid_floors():
    coords = torch.tensor([[[0.0, 255.9], [256.0, 511.0], [256_000.0, 300_000.0]]])
    assert pixel_to_grid(coords).tolist() == [[[0, 0], [1, 1], [1000, 1171]]]


def test_embed_cli_with_published_weights(tmp_path, capsys):
    """``slidessl embed gigapath:PATH`` end to end on a published-format checkpoint (random
    weights: none can be downloaded here): one 768-dim CLS embedding per slide, equal to the
    loaded encoder run on that slide alone; tile features of another width are refused."""
    from slidessl.cli import main
    from slidessl.data.dataset import SlideDataset
    from slidessl.eval.embed_io import read_embeddings
    from slidessl.models import build_encoder

    torch.manual_seed(0)
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": _published_state(build_encoder("gigapath"))}, path)
    cohort = tmp_path / "cohort"
    args = ["--slides", "3", "--min-tiles", "40", "--max-tiles", "90", "--seed", "3"]
    assert main(["synth", "--out", str(cohort), "--dim", "1536", *args]) == 0
    out = tmp_path / "emb.h5"
    assert main(["embed", f"gigapath:{path}", str(cohort / "manifest.csv"), "--out", str(out)]) == 0
    ids, emb, meta = read_embeddings(out)
    assert emb.shape == (3, 768) and len(set(ids)) == 3
    assert "gigapath:" in str(meta)
    enc = load_gigapath(path)
    items = {it["slide_id"]: it for it in SlideDataset(cohort / "manifest.csv")}  # Hilbert order
    with torch.no_grad():
        for i, sid in enumerate(ids):
            ref = enc(items[sid]["features"][None].float(), items[sid]["grid"][None])
            torch.testing.assert_close(torch.as_tensor(emb[i]), ref[0], rtol=1e-4, atol=1e-4)
    small = tmp_path / "small"
    assert main(["synth", "--out", str(small), "--dim", "64", *args]) == 0
    bad = [
        "embed",
        f"gigapath:{path}",
        str(small / "manifest.csv"),
        "--out",
        str(tmp_path / "x.h5"),
    ]
    capsys.readouterr()
    assert main(bad) == 2
    assert "takes 1536-dim tile features" in capsys.readouterr().err
