"""Neighbourhood attention on the tile grid and the region readout, against dense references."""

import numpy as np
import pytest
import torch

from slidessl.models import build_encoder
from slidessl.models.gridconv import grid_neighbours
from slidessl.models.local_attention import (
    NeighbourhoodAttention,
    distance_classes,
    local_attention,
)


def _slide_grid(rng, n, side):
    cells = rng.choice(side * side, n, replace=False)
    return torch.as_tensor(np.stack([cells % side, cells // side], 1), dtype=torch.long)


def _dense_reference(q, k, v, coords, padding_mask, kernel, bias_table):
    """float64 softmax over an explicit (B, H, 1+N, 1+N) score matrix: tile -> grid
    neighbours within the kernel (with the distance-class bias), CLS -> everything real."""
    b, n1, h, d = q.shape
    r = kernel // 2
    classes = distance_classes(kernel)
    offsets = [(dx, dy) for dx in range(-r, r + 1) for dy in range(-r, r + 1)]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5
    allowed = torch.zeros(b, n1, n1, dtype=torch.bool)
    bias = torch.zeros(b, h, n1, n1, dtype=q.dtype)
    real = ~padding_mask
    allowed[:, 0, :] = real
    for bi in range(b):
        for i in range(1, n1):
            for j in range(1, n1):
                if not (real[bi, i] and real[bi, j]):
                    continue
                dx, dy = (coords[bi, j - 1] - coords[bi, i - 1]).tolist()
                if (dx, dy) in offsets:
                    allowed[bi, i, j] = True
                    bias[bi, :, i, j] = bias_table[:, classes[offsets.index((dx, dy))]]
    scores = (scores + bias).masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.masked_fill(padding_mask[:, :, None, None], 0.0)


@pytest.mark.parametrize("kernel", [3, 5])
def test_local_attention_equals_dense_masked_reference(rng, kernel):
    b, n, h, d = 2, 40, 3, 4
    coords = torch.stack([_slide_grid(rng, n, 9), _slide_grid(rng, n, 9)])
    pad = torch.zeros(b, 1 + n, dtype=torch.bool)
    pad[1, 1 + 31 :] = True  # second slide: 31 real tiles
    q, k, v = (torch.randn(b, 1 + n, h, d, dtype=torch.float64) for _ in range(3))
    table = torch.randn(h, int(distance_classes(kernel).max()) + 1, dtype=torch.float64)
    index = grid_neighbours(coords, pad[:, 1:], kernel)
    got = local_attention(q, k, v, index, table[:, distance_classes(kernel)], pad)
    want = _dense_reference(q, k, v, coords, pad, kernel, table)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # padded tiles never receive mass: changing them changes no real output
    k2, v2 = k.clone(), v.clone()
    k2[pad], v2[pad] = 1e3, -1e3
    torch.testing.assert_close(
        local_attention(q, k2, v2, index, None, pad)[~pad],
        local_attention(q, k, v, index, None, pad)[~pad],
    )


def test_distance_bias_is_rotation_invariant():
    # offsets related by flips / quarter turns share one bias class
    cls = distance_classes(5).view(5, 5)
    assert (
        torch.equal(cls, cls.T) and torch.equal(cls, cls.flip(0)) and torch.equal(cls, cls.flip(1))
    )
    assert int(cls.max()) + 1 == 6  # dx^2 + dy^2 in {0, 1, 2, 4, 5, 8}


def test_module_gradients_and_shapes(rng):
    attn = NeighbourhoodAttention(16, 4, 3)
    coords = _slide_grid(rng, 30, 7)[None]
    x = torch.randn(1, 31, 16, requires_grad=True)
    y = attn(x, None, grid_neighbours(coords, None, 3))
    y.square().sum().backward()
    assert y.shape == x.shape and attn.rel_bias.grad is not None
    with pytest.raises(ValueError, match="neighbour index"):
        attn(x)


def _local_encoder(seed, **kw):
    torch.manual_seed(seed)
    enc = build_encoder(
        "tiny",
        in_dim=8,
        attention="dense",
        local_kernel=3,
        local_depth=2,
        input_center=True,
        pos_mode="none",
        **kw,
    ).eval()
    for p in enc.parameters():  # away from the zero init of biases and tables
        p.data += 0.05 * torch.randn_like(p)
    return enc


@pytest.mark.parametrize("cls_pos", [False, True])
def test_forward_regions_equals_running_each_region(rng, cls_pos):
    """Tile tokens computed once for the slide serve every region: equal to encoding each
    region alone when no receptive field crosses a region border (two blocks of columns,
    three empty columns apart) and to the whole-slide CLS for the whole slide."""
    enc = _local_encoder(int(rng.integers(1 << 20)), cls_pos=cls_pos)
    g = torch.stack(torch.meshgrid(torch.arange(20), torch.arange(9), indexing="xy"), -1)
    g = g.reshape(-1, 2)
    g = g[(g[:, 0] % 10) < 7]
    x = torch.randn(len(g), 8)
    with torch.no_grad():
        whole = enc.forward_regions(x, g, [torch.arange(len(g))])[0]
        torch.testing.assert_close(whole, enc(x[None], g[None])[0], rtol=1e-5, atol=1e-5)
        parts = [torch.nonzero(g[:, 0] < 10)[:, 0], torch.nonzero(g[:, 0] >= 10)[:, 0]]
        got = enc.forward_regions(x, g, parts, center=x.mean(0))
        for i, r in enumerate(parts):
            alone = enc(x[r][None], (g[r] - g[r].min(0).values)[None])  # centred on its own mean
            ref = enc.forward_tokens(
                x[r][None], (g[r] - g[r].min(0).values)[None], center=x.mean(0)[None]
            )[0][0]
            torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(
                alone[0], ref, atol=1e-4
            )  # the slide's mean, not the region's


def test_forward_regions_needs_all_local_blocks():
    enc = build_encoder("tiny", in_dim=8, attention="dense", local_kernel=3, local_depth=1)
    with pytest.raises(ValueError, match="all local"):
        enc.forward_regions(
            torch.randn(5, 8), torch.zeros(5, 2, dtype=torch.long), [torch.arange(5)]
        )


def test_input_center_removes_a_per_slide_shift(rng):
    """A stain / scanner shift shared by all tiles of a slide does not move the embedding."""
    enc = _local_encoder(int(rng.integers(1 << 20)))
    g = _slide_grid(rng, 60, 10)[None]
    x = torch.randn(1, 60, 8)
    shift = 3.0 * torch.randn(1, 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(enc(x + shift, g), enc(x, g), rtol=1e-5, atol=1e-5)
        # a crop centred on its slide's mean: the same shift cancels too
        c = x[0].mean(0, keepdim=True)
        a = enc.forward_tokens(x[:, :20], g[:, :20], center=c)[0]
        b = enc.forward_tokens(x[:, :20] + shift, g[:, :20], center=c + shift[0])[0]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_local_config_checks():
    for kw in (
        {"local_kernel": 3},
        {"local_depth": 1},
        {"local_kernel": 4, "local_depth": 1},
        {"local_kernel": 3, "local_depth": 3},
    ):
        with pytest.raises(ValueError, match="local"):
            build_encoder("tiny", in_dim=8, **kw)
