"""SlideEncoder contract: shapes, masks, gradients, checkpointing, autocast, presets."""

import pytest
import torch

from slidessl.models import PRESETS, SlideEncoder, build_encoder
from slidessl.models.packing import pack_padded


def _inputs(b, n, d, grid=60):
    x = torch.randn(b, n, d)
    coords = torch.randint(0, grid, (b, n, 2))
    return x, coords


def _tiny(**kw):
    return build_encoder("tiny", in_dim=24, **kw)


def _layer_vectors(enc, x, c, layers):
    states = enc.forward_intermediates(x, c, indices=layers, norm=True, intermediates_only=True)
    return torch.cat([enc.forward_head(h) for h in states], -1)


def test_forward_features_contract():
    enc = _tiny().eval()
    x, c = _inputs(3, 40, 24)
    cls, tokens = enc.forward_tokens(x, c)
    feats = enc.forward_features(x, c)
    final, states = enc.forward_intermediates(x, c, include_input=True)
    out = {"cls": cls, "tokens": tokens, "pooled": enc.forward_head(feats), "embed": states[0]}
    out["layers"] = states[1:]
    assert out["cls"].shape == (3, 64) and out["tokens"].shape == (3, 40, 64)
    assert out["pooled"].shape == (3, 64) and out["embed"].shape == (3, 41, 64)
    assert len(out["layers"]) == enc.depth and out["layers"][-1].shape == (3, 41, 64)
    torch.testing.assert_close(enc(x, c), out["cls"])
    torch.testing.assert_close(final, feats)
    torch.testing.assert_close(feats[:, 0], cls)
    assert _layer_vectors(enc, x, c, [-1, -2]).shape == (3, 128)
    torch.testing.assert_close(_layer_vectors(enc, x, c, [-1]), out["cls"], rtol=1e-5, atol=1e-5)


def test_forward_intermediates_selects_blocks():
    enc = _tiny(depth=3).eval()
    x, c = _inputs(2, 20, 24)
    every = enc.forward_intermediates(x, c, intermediates_only=True)
    assert len(every) == 3
    last_two = enc.forward_intermediates(x, c, indices=2, intermediates_only=True)
    for a, b in zip(last_two, every[1:]):
        torch.testing.assert_close(a, b)
    picked = enc.forward_intermediates(x, c, indices=[0, -1], intermediates_only=True)
    torch.testing.assert_close(picked[0], every[0])
    torch.testing.assert_close(picked[1], every[2])
    with pytest.raises(ValueError, match="out of range"):
        enc.forward_intermediates(x, c, indices=[3])


def test_mean_pool_normalises_the_pooled_mean():
    """pool="mean" (Prov-GigaPath's global pool): forward_features stops before the final
    norm, forward_head normalises the mean of the real tile tokens."""
    enc = _tiny(pool="mean").eval()
    x, c = _inputs(2, 30, 24)
    pm = torch.zeros(2, 30, dtype=torch.bool)
    pm[1, 20:] = True
    feats = enc.forward_features(x, c, pm)
    want = torch.stack([enc.norm(feats[0, 1:].mean(0)), enc.norm(feats[1, 1:21].mean(0))])
    torch.testing.assert_close(enc(x, c, pm), want)
    cls, _ = enc.forward_tokens(x, c, pm)
    torch.testing.assert_close(cls, enc.norm(feats[:, 0]))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padded_batch_equals_slides_alone(pool):
    enc = _tiny(pool=pool, segments=(8, 32), dilations=(1, 2)).eval()
    lengths = [70, 21, 45]
    x, c = _inputs(3, 70, 24)
    pm = torch.arange(70)[None] >= torch.tensor(lengths)[:, None]
    x[pm] = 1e4  # junk in padding must not leak

    def run(x, c, pm=None):
        return {"pooled": enc(x, c, pm), "tokens": enc.forward_tokens(x, c, pm)[1]}

    out = run(x, c, pm)
    for i, m in enumerate(lengths):
        alone = run(x[i : i + 1, :m], c[i : i + 1, :m])
        torch.testing.assert_close(out["pooled"][i], alone["pooled"][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["tokens"][i, :m], alone["tokens"][0], rtol=1e-4, atol=1e-4)


def test_token_mask_hides_the_masked_features():
    enc = _tiny().eval()
    x, c = _inputs(2, 30, 24)
    tm = torch.rand(2, 30) < 0.4
    a = enc.forward_tokens(x, c, token_mask=tm)[0]
    x2 = x.clone()
    x2[tm] = torch.randn_like(x2[tm])
    b = enc.forward_tokens(x2, c, token_mask=tm)[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, enc.forward_tokens(x, c)[0])


@pytest.mark.parametrize("n", [1, 7, 1023, 1025, 8193])
def test_lengths(n):
    enc = build_encoder("tiny", in_dim=8, embed_dim=16, num_heads=2, mlp_dim=16, depth=1).eval()
    x, c = _inputs(1, n, 8, grid=200)
    with torch.no_grad():
        out = {"tokens": enc.forward_tokens(x, c)[1]}
    assert out["tokens"].shape == (1, n, 16) and torch.isfinite(out["tokens"]).all()


def test_gradients_and_checkpointing_agree():
    torch.manual_seed(0)
    enc = _tiny(segments=(16, 64), dilations=(1, 2))
    x, c = _inputs(2, 50, 24)
    pm = torch.zeros(2, 50, dtype=torch.bool)
    pm[1, 33:] = True
    enc.forward_tokens(x, c, pm)[0].pow(2).sum().backward()
    plain = {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in plain.values())
    # every parameter but the (unused) mask token learns
    assert set(plain) == {k for k, _ in enc.named_parameters()} - {"mask_token"}
    enc.zero_grad()
    config = dict(enc.config)
    enc.set_grad_checkpointing(True)
    assert enc.config == config  # a runtime switch never alters the exported config
    enc.forward_tokens(x, c, pm)[0].pow(2).sum().backward()
    for k, p in enc.named_parameters():
        if k in plain:
            torch.testing.assert_close(p.grad, plain[k], rtol=1e-4, atol=1e-5)


def test_bf16_autocast():
    enc = _tiny().eval()
    x, c = _inputs(2, 100, 24)
    ref = enc(x, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x, c)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_coordinates_beyond_256k_pixels():
    enc = _tiny().eval()
    x = torch.randn(1, 6, 24)
    c = torch.tensor([[[0, 0], [1000, 2], [1001, 2], [3000, 2999], [2, 1500], [9999, 9999]]])
    out = enc.forward_tokens(x, c)[1]
    assert torch.isfinite(out).all()
    moved = enc.forward_tokens(x, c + torch.tensor([0, 1]))[1]
    assert not torch.allclose(out, moved)


def test_bad_inputs_say_what_is_wrong():
    enc = _tiny()
    x, c = _inputs(2, 10, 24)
    with pytest.raises(ValueError, match=r"features must be \(B, N, 24\)"):
        enc(torch.randn(2, 10, 23), c)
    with pytest.raises(ValueError, match="coords must be"):
        enc(x, c[:, :9])
    with pytest.raises(ValueError, match="padding_mask must be bool"):
        enc(x, c, torch.zeros(2, 10))
    with pytest.raises(ValueError, match="unknown SlideEncoder option"):
        SlideEncoder(embed_dims=3)
    with pytest.raises(ValueError, match="unknown encoder preset"):
        build_encoder("huge")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_rebuild_from_config(name):
    overrides = {"depth": 1} if name != "tiny" else {}
    enc = build_encoder(name, **overrides)
    again = SlideEncoder(**enc.config)
    assert again.config == enc.config
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in enc.parameters())


def test_dense_and_single_full_branch_agree():
    torch.manual_seed(1)
    dense = _tiny(attention="dense").eval()
    dil = _tiny(segments=(10_000,), dilations=(1,)).eval()
    dil.load_state_dict(dense.state_dict())
    x, c = _inputs(2, 33, 24)
    torch.testing.assert_close(dense(x, c), dil(x, c), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encoder_matches_cpu_and_pads():
    torch.manual_seed(0)
    enc = build_encoder("gigapath", depth=2, in_dim=64).eval()
    lengths = [1500, 700]
    x, c = _inputs(2, 1500, 64, grid=900)
    pm = torch.arange(1500)[None] >= torch.tensor(lengths)[:, None]
    with torch.no_grad():
        ref = enc.forward_tokens(x, c, pm)[0]
        gpu = enc.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu.forward_tokens(x.cuda(), c.cuda(), pm.cuda())[0].float().cpu()
            alone = gpu.forward_tokens(x[1:, :700].cuda(), c[1:, :700].cuda())[0]
    assert (out - ref).norm() / ref.norm() < 0.05
    assert (out[1] - alone[0].float().cpu()).norm() / out[1].norm() < 0.05


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("tiny", {}),
        ("tiny", {"attention": "dense"}),
        ("tiny", {"input_center": True, "segments": (16, 64), "dilations": (1, 2)}),
        ("gigapath", {"depth": 2, "in_dim": 32, "embed_dim": 64, "num_heads": 4, "mlp_dim": 64}),
    ],
)
def test_forward_packed_equals_each_input_alone(rng, preset, overrides):
    """Inputs of different lengths packed into one stream (one CLS each): the CLS and tile
    tokens, and the gradients of every parameter, equal the padded batch's (float64)."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    enc = build_encoder(preset, drop_path_rate=0.0, **overrides).double().train()
    lengths = [int(n) for n in rng.integers(1, 120, size=4)] + [0]
    b, n = len(lengths), max(lengths)
    pm = torch.arange(n)[None] >= torch.tensor(lengths)[:, None]
    x = torch.randn(b, n, enc.in_dim, dtype=torch.float64).masked_fill(pm[..., None], 0.0)
    coords = torch.randint(0, 60, (b, n, 2))
    tmask = (torch.rand(b, n) < 0.3) & ~pm
    cls, tokens = enc.forward_tokens(x, coords, pm, token_mask=tmask)
    g_cls, g_tok = torch.randn_like(cls), torch.randn_like(tokens)
    loss = (cls * g_cls).sum() + (tokens * g_tok).masked_fill(pm[..., None], 0).sum()
    ref = torch.autograd.grad(loss, list(enc.parameters()), allow_unused=True)
    p_cls, p_tok = enc.forward_packed(
        pack_padded(x, lengths), pack_padded(coords, lengths), lengths, pack_padded(tmask, lengths)
    )
    torch.testing.assert_close(p_cls, cls, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p_tok, pack_padded(tokens, lengths), rtol=1e-10, atol=1e-12)
    loss = (p_cls * g_cls).sum() + (p_tok * pack_padded(g_tok, lengths)).sum()
    got = torch.autograd.grad(loss, list(enc.parameters()), allow_unused=True)
    for (name, _), a, e in zip(enc.named_parameters(), got, ref):
        if e is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10, msg=name)


def test_packed_drop_path_keeps_or_drops_whole_inputs(rng):
    """Drop-path on a packed stream draws once per input: each input's residual branch is
    all kept (scaled) or all dropped."""
    from slidessl.models.blocks import DropPath

    torch.manual_seed(int(rng.integers(1 << 30)))
    lengths = [5, 9, 3, 7, 11, 4]
    y = torch.ones(1, sum(lengths), 2)
    out = DropPath(0.5).train()(y, lengths)
    for part in out[0].split(lengths):
        assert torch.all(part == part[0, 0]) and float(part[0, 0]) in (0.0, 2.0)


def test_forward_packed_rejects_bad_shapes():
    enc = build_encoder("tiny", in_dim=8)
    with pytest.raises(ValueError, match="T = sum"):
        enc.forward_packed(torch.zeros(5, 8), torch.zeros(5, 2, dtype=torch.long), [2, 2])
    with pytest.raises(ValueError, match="token_mask"):
        enc.forward_packed(
            torch.zeros(4, 8), torch.zeros(4, 2, dtype=torch.long), [2, 2], torch.zeros(4)
        )
    with pytest.raises(ValueError, match="do not fit"):
        pack_padded(torch.zeros(2, 3), [4, 1])


@pytest.mark.parametrize("kw", [{}, {"attention": "dense", "local_kernel": 3, "local_depth": 1}])
def test_last_block_attention_is_the_dense_cls_softmax_and_ignores_padding(rng, kw):
    enc = _tiny(**kw).double().eval()
    x, c = _inputs(2, 30, 24)
    x = x.double()
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 18:] = True
    attn, tokens = enc.last_block_attention(x, c, mask)
    assert attn.shape == (2, 30) and tokens.shape == (2, 30, 64)
    _, states = enc.forward_intermediates(x, c, mask, include_input=True)
    blk = enc.blocks[-1]
    hn = blk.self_attn_layer_norm(states[-2])
    q = blk.self_attn.q_proj(hn[:, :1]).view(2, 1, 4, 16)
    k = blk.self_attn.k_proj(hn[:, 1:]).view(2, 30, 4, 16)
    logits = (q * k).sum(-1).transpose(1, 2) / 4.0  # (B, H, N)
    want = torch.softmax(logits.masked_fill(mask[:, None], float("-inf")), -1).mean(1)
    torch.testing.assert_close(attn, want.float())
    assert torch.all(attn[1, 18:] == 0)
    alone, alone_tokens = enc.last_block_attention(x[1:, :18], c[1:, :18])
    torch.testing.assert_close(attn[1:, :18], alone)
    torch.testing.assert_close(tokens[1:, :18], alone_tokens)
    torch.testing.assert_close(tokens, enc.forward_tokens(x, c, mask)[1])
