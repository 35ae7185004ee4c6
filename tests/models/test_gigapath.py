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
