"""Prov-GigaPath weight import: key mapping, strict report, architecture from the checkpoint,
the position table's bounds. Equivalence with the published code: test_gigapath_reference.py
and tests/eval/test_gigapath_cli.py."""

import zlib

import pytest
import torch

from slidessl.models.gigapath import (
    PUBLISHED_ARCHS,
    gigapath_arch,
    gigapath_forward,
    load_gigapath,
    pixel_to_grid,
    published_arch_name,
)
from slidessl.models.posenc import check_gigapath_table

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
    # 32 tokens need no padding in any branch: the published forward equals ours there
    torch.testing.assert_close(
        outs[-1], enc.norm(enc.forward_intermediates(x, grid, intermediates_only=True)[-1])[:, 0]
    )
    torch.testing.assert_close(gigapath_forward(enc, x, grid)[0], enc(x, grid))
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


@pytest.fixture
def seed(request):
    s = zlib.crc32(request.node.nodeid.encode()) & 0xFFFF
    print(f"seed {s} ({request.node.nodeid})")
    return s


def test_architecture_comes_from_the_checkpoint(tmp_path, seed, caplog):
    """A 2-layer published-format checkpoint loads without overrides (it used to be refused
    as "weights do not match" the 12 x 768 preset)."""
    from slidessl.models import build_encoder

    torch.manual_seed(seed)
    src = build_encoder("gigapath", depth=2, embed_dim=96, mlp_dim=384, in_dim=48)
    torch.save({"model": _published_state(src)}, tmp_path / "two.pth")
    with caplog.at_level("INFO", logger="slidessl.models.gigapath"):
        enc = load_gigapath(tmp_path / "two.pth")
    assert (enc.depth, enc.embed_dim, enc.in_dim, enc.config["mlp_dim"]) == (2, 96, 48, 384)
    assert enc.config["num_heads"] == 16 and enc.config["encoder_norm"]
    assert "(not a registered size): 2 layers x 96, 16 heads" in caplog.text
    # 31 tiles + CLS = 32 tokens: no branch pads, so the published forward equals ours
    x, grid = torch.randn(1, 31, 48), torch.randint(0, 50, (1, 31, 2))
    torch.testing.assert_close(gigapath_forward(enc, x, grid)[0], enc(x, grid))


@pytest.mark.parametrize("name", sorted(PUBLISHED_ARCHS))
def test_published_sizes_are_recognised(name):
    """The three registered LongNetViT sizes, read from key names and shapes alone (meta
    tensors: nothing is allocated)."""
    depth, width = PUBLISHED_ARCHS[name]
    state = {
        "patch_embed.proj.weight": torch.empty(width, 1536, device="meta"),
        "cls_token": torch.empty(1, 1, width, device="meta"),
        "encoder.layer_norm.weight": torch.empty(width, device="meta"),
    }
    for i in range(depth):
        state[f"encoder.layers.{i}.ffn.fc1.weight"] = torch.empty(4 * width, width, device="meta")
        state[f"encoder.layers.{i}.self_attn.inner_attn_ln.weight"] = torch.empty(
            width, device="meta"
        )
    arch = gigapath_arch(state)
    assert arch == dict(
        in_dim=1536,
        embed_dim=width,
        depth=depth,
        num_heads=16,
        mlp_dim=4 * width,
        subln=True,
        encoder_norm=True,
    )
    assert published_arch_name(arch) == name
    del (
        state["encoder.layers.1.ffn.fc1.weight"],
        state["encoder.layers.1.self_attn.inner_attn_ln.weight"],
    )
    with pytest.raises(ValueError, match=r"x.pth: encoder layers are numbered \[0, 2, 3"):
        gigapath_arch(state, "x.pth")
    with pytest.raises(ValueError, match="no 'patch_embed.proj.weight'"):
        gigapath_arch({"cls_token": state["cls_token"]})


def test_position_table_bounds():
    inside = torch.tensor([[[0, 0], [999, 999], [3, 998]]])
    assert check_gigapath_table(inside) == 0
    outside = torch.tensor([[[0, 0], [1000, 5], [7, 1003]]])
    with pytest.raises(ValueError, match=r"2 of 3 tiles fall outside .* x 1000, y 1003"):
        check_gigapath_table(outside)
    assert check_gigapath_table(outside, extrapolate=True) == 2
    with pytest.raises(ValueError, match="negative positions"):
        check_gigapath_table(torch.tensor([[[-1, 4]]]), extrapolate=True)
    with pytest.raises(ValueError, match="integer"):
        check_gigapath_table(torch.zeros(1, 2, 2))
