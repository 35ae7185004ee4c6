"""Prov-GigaPath's published forward (torchscale-gml==0.2.3) vs ``gigapath_forward``, on CPU.

Optional: skipped unless ``torchscale`` (torchscale-gml 0.2.3, installed with --no-deps)
and ``einops`` are importable; ``tests/published_gigapath.py`` rebuilds the published
``LongNetViT`` around them. Errors are ``max |ours - published| / max |published|``.
"""

import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("einops")
pytest.importorskip("torchscale")
import published_gigapath as pg  # noqa: E402
from slidessl.models.gigapath import (  # noqa: E402
    gigapath_forward,
    load_gigapath,
    pixel_to_grid,
    published_dilated_attention,
)
from slidessl.models.posenc import sincos_2d  # noqa: E402

pytestmark = pytest.mark.reference
E, DEPTH, MLP_RATIO, IN = 64, 2, 2, 32


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the two shared cores a second thread mostly waits (a 2-layer
    forward at 1,030 tiles took 1.6 s with two threads, 0.1 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seed(request):
    s = zlib.crc32(request.node.nodeid.encode()) & 0xFFFF
    print(f"seed {s} ({request.node.nodeid})")
    return s


def _rel(a, e):
    return ((a - e).abs().max() / e.abs().max()).item()


@pytest.mark.parametrize(
    "n,embed,heads,segments,ratios",
    [
        (1100, 64, 16, pg.SEGMENTS, pg.RATIOS),  # GigaPath branches, 2 segments at w = 1024
        (4097, 32, 16, pg.SEGMENTS, pg.RATIOS),
        (37, 48, 12, "[10, 24, 64]", "[1, 4, 8]"),  # heads padded to a multiple of r = 8
        (77, 48, 12, "[10, 23, 64]", "[1, 4, 8]"),  # r does not divide w: shifted segments
        (64, 32, 16, "[16, 32, 64]", "[1, 2, 4]"),  # no padding anywhere
    ],
)
def test_dilated_attention_matches_torchscale(monkeypatch, seed, n, embed, heads, segments, ratios):
    pg.use_flash_math(monkeypatch)
    torch.manual_seed(seed)
    ref = pg.dilated_attention_module(embed, heads, segments, ratios).eval()
    b = 1 if n > 1000 else 2
    x = torch.randn(b, n, embed)
    with torch.no_grad():
        expect, _ = ref(x, x, x)
        q, k, v = (p(x).view(b, n, heads, -1) for p in (ref.q_proj, ref.k_proj, ref.v_proj))
        got = published_dilated_attention(q, k, v, eval(segments), eval(ratios))
        got = ref.out_proj(got.reshape(b, n, embed))
    rel = _rel(got, expect)
    print(f"n={n} max rel err {rel:.2e}")
    assert rel < 1e-5


def test_lazy_table_is_the_mae_table(seed):
    """The reference's lazily computed rows equal MAE's whole 1,000,001-row table (written
    out from gigapath/pos_embed.py), and so do our on-the-fly positions."""
    rng = np.random.default_rng(seed)
    table = torch.from_numpy(pg.mae_table(4, 1000)).float()
    rows = torch.from_numpy(rng.integers(0, table.shape[0], 400))
    rows[:3] = torch.tensor([0, 1, table.shape[0] - 1])
    torch.testing.assert_close(pg.LazyMaeTable(4)[rows], table[rows], rtol=0, atol=0)
    flat = rows[rows > 0] - 1
    grid = torch.stack([flat // 1000, flat % 1000], -1)
    torch.testing.assert_close(sincos_2d(grid, 4, "gigapath"), table[rows[rows > 0]])
    with pytest.raises(IndexError):
        pg.LazyMaeTable(4)[torch.tensor([table.shape[0]])]


def _published_pair(tmp_path, seed, global_pool=False):
    g = torch.Generator().manual_seed(seed)
    ref = pg.PublishedLongNetViT(IN, E, DEPTH, MLP_RATIO, global_pool=global_pool).randomize(g)
    torch.save({"model": ref.state_dict()}, tmp_path / "slide_encoder.pth")
    return ref, load_gigapath(tmp_path / "slide_encoder.pth", global_pool=global_pool), g


@pytest.mark.parametrize(
    "n_tiles,global_pool,origin",
    [(255, False, 0), (255, True, 0), (1030, False, 3), (1030, True, 3), (2047, False, 0)],
)
def test_matches_published_longnet(tmp_path, monkeypatch, seed, n_tiles, global_pool, origin):
    """Every published output (all layers, ``forward``'s ``encoder_out``) on tokens in the
    order given, coordinates in px off the 256 grid, lengths that need padding or not."""
    pg.use_flash_math(monkeypatch)
    ref, ours, g = _published_pair(tmp_path, seed, global_pool)
    b = 2 if n_tiles < 1000 else 1
    x = torch.randn(b, n_tiles, IN, generator=g)
    cells = torch.randint(0, 120, (b, n_tiles, 2), generator=g) + origin
    coords = (cells * 256 + torch.randint(0, 256, (b, n_tiles, 2), generator=g)).float()
    with torch.no_grad():
        for all_layers in (False, True):
            expect = ref(x, coords, all_layers)
            got = gigapath_forward(ours, x, pixel_to_grid(coords), all_layers)
            assert len(got) == len(expect) == (DEPTH + 1 if all_layers else 1)
            errs = [_rel(a, e) for a, e in zip(got, expect)]
            print(f"all_layer_embed={all_layers} max rel err {max(errs):.2e}")
            assert max(errs) < 1e-5, errs


def test_past_the_table_published_fails_and_extrapolation_follows_its_formula(
    tmp_path, monkeypatch, seed
):
    """``gy >= 1000`` wraps into the next column's row in the published model (it runs, so
    extrapolation must give its numbers); ``gx >= 1000`` runs off its table (IndexError)."""
    pg.use_flash_math(monkeypatch)
    ref, ours, g = _published_pair(tmp_path, seed)
    x = torch.randn(1, 40, IN, generator=g)
    grid = torch.stack([torch.randint(0, 998, (1, 40)), torch.randint(990, 1010, (1, 40))], -1)
    coords = (grid * 256).float()
    with torch.no_grad():
        expect = ref(x, coords)[0]
        with pytest.raises(ValueError, match="outside Prov-GigaPath's 1000 x 1000"):
            gigapath_forward(ours, x, grid)
        got = gigapath_forward(ours, x, grid, extrapolate=True)[0]
        assert _rel(got, expect) < 1e-5
        grid[0, 0] = torch.tensor([1000, 3])
        with pytest.raises(IndexError):
            ref(x, (grid * 256).float())
        assert torch.isfinite(gigapath_forward(ours, x, grid, extrapolate=True)[0]).all()
