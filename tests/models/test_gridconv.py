import numpy as np
import pytest
import torch

from slidessl.models.encoder import build_encoder
from slidessl.models.gridconv import GridContext, grid_neighbours


def _random_slide(rng, n, extent):
    cells = rng.choice(extent * extent, size=n, replace=False)
    return np.stack([cells // extent, cells % extent], axis=1)


def _reference(h, coords, weight, bias, k):
    """Brute force: for each token, scan all tokens for each offset."""
    r = k // 2
    out = np.zeros_like(h)
    for i, (x, y) in enumerate(coords):
        acc = bias.copy()
        for j, (dx, dy) in enumerate((a, b) for a in range(-r, r + 1) for b in range(-r, r + 1)):
            hit = np.nonzero((coords[:, 0] == x + dx) & (coords[:, 1] == y + dy))[0]
            if len(hit):
                acc += h[hit[0]] * weight[j]
        out[i] = acc
    return out


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force(rng, k):
    n, e = int(rng.integers(20, 60)), 8
    coords = _random_slide(rng, n, extent=9) + rng.integers(0, 300_000, size=2)
    h = rng.normal(size=(n, e)).astype(np.float64)
    mod = GridContext(e, k).double()
    with torch.no_grad():
        mod.bias.normal_()
    got = mod(torch.from_numpy(h)[None], torch.from_numpy(coords)[None])[0].detach().numpy()
    want = _reference(h, coords, mod.weight.detach().numpy(), mod.bias.detach().numpy(), k)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_padding_invariance_and_no_cross_slide_neighbours(rng):
    e = 6
    slides = [_random_slide(rng, n, extent=8) for n in (40, 17, 29)]
    feats = [rng.normal(size=(len(c), e)).astype(np.float32) for c in slides]
    mod = GridContext(e, 3)
    n_max = max(len(c) for c in slides)
    x = torch.zeros(3, n_max, e)
    coords = torch.zeros(3, n_max, 2, dtype=torch.long)  # padding sits on real cells' coords
    pad = torch.ones(3, n_max, dtype=torch.bool)
    for i, (c, f) in enumerate(zip(slides, feats)):
        x[i, : len(c)] = torch.from_numpy(f)
        coords[i, : len(c)] = torch.from_numpy(c)
        pad[i, : len(c)] = False
    batched = mod(x, coords, pad)
    for i, (c, f) in enumerate(zip(slides, feats)):
        alone = mod(torch.from_numpy(f)[None], torch.from_numpy(c)[None])[0]
        torch.testing.assert_close(batched[i, : len(c)], alone, rtol=1e-5, atol=1e-6)
        assert torch.all(batched[i, len(c) :] == 0)


def test_isolated_tile_sees_only_itself():
    coords = torch.tensor([[[0, 0], [5, 5], [5, 6]]])
    idx = grid_neighbours(coords, None, 3)
    assert (idx[0] != 3).sum() == 1  # only the centre
    assert set(idx[1].tolist()) == {1, 2, 3} and set(idx[2].tolist()) == {1, 2, 3}


def test_encoder_option_changes_output_by_arrangement(rng):
    """Same tiles, shuffled positions: with grid context the tokens differ, without it a
    token's own input is unchanged (only attention mixes)."""
    enc = build_encoder("tiny", in_dim=16, grid_context=3).eval()
    n = 50
    coords = torch.from_numpy(_random_slide(rng, n, extent=10))[None]
    x = torch.randn(1, n, 16)
    perm = torch.randperm(n)
    with torch.no_grad():
        a = enc.patch_embed(x)
        ctx_a = enc.grid_context(a, coords)
        ctx_b = enc.grid_context(a, coords[:, perm])
    assert not torch.allclose(ctx_a, ctx_b)
    enc(x, coords).sum().backward()
    assert enc.grid_context.weight.grad is not None
    assert torch.isfinite(enc.grid_context.weight.grad).all()


def test_bad_kernel_size():
    with pytest.raises(ValueError, match="odd"):
        GridContext(8, 2)
