"""Every attention path on the inputs iBOT masking and cropping produce: identical masked
tokens, a query whose whole neighbourhood is masked, padding and single-tile crops.

Each path's output and gradients equal a float64 dense reference with the same mask and
bias, and stay finite in float32. Then the encoder: masked tiles whose whole receptive
field is masked (no absolute positions) keep gradients bounded - the iBOT recipes trained
on 1e30 gradients while a zero mask token made those tiles exact zero vectors, where each
LayerNorm's backward multiplies by 1 / sqrt(eps).
"""

import numpy as np
import pytest
import torch

from reference_attention import reference_dilated_attention
from slidessl.models import attention as attention_mod
from slidessl.models import build_encoder
from slidessl.models.alibi import alibi_attention, alibi_slopes
from slidessl.models.attention import dense_attention, dilated_attention_qkv
from slidessl.models.gridconv import grid_neighbours
from slidessl.models.local_attention import distance_classes, local_attention

H, D, E = 2, 4, 8


def _batch(rng):
    """Three inputs of one padded batch (CLS first): an 8 x 8 block of tiles whose 5 x 5
    core is masked (identical tokens), a 20-tile crop padded to 64, and a single tile."""
    side = 8
    g0 = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
    n = len(g0)
    g1 = np.zeros((n, 2), dtype=np.int64)
    cells = rng.choice(36, 20, replace=False)
    g1[:20] = np.stack([cells % 6, cells // 6], 1)
    coords = torch.as_tensor(np.stack([g0, g1, np.zeros((n, 2), dtype=np.int64)]))
    pad = torch.zeros(3, 1 + n, dtype=torch.bool)
    pad[1, 1 + 20 :] = True
    pad[2, 1 + 1 :] = True
    masked = torch.zeros(3, 1 + n, dtype=torch.bool)
    core = (g0[:, 0] >= 1) & (g0[:, 0] <= 5) & (g0[:, 1] >= 1) & (g0[:, 1] <= 5)
    masked[0, 1:] = torch.as_tensor(core)
    masked[1, 1:6] = True
    return coords, pad, masked


def _tokens(rng, pad, masked, dtype):
    """(B, 1 + N, E) tokens: masked positions hold one shared vector (the mask token),
    padded positions zero (as the encoder writes them)."""
    x = torch.as_tensor(rng.standard_normal(pad.shape + (E,)), dtype=dtype)
    token = torch.as_tensor(rng.standard_normal(E), dtype=dtype)
    x = torch.where(masked[..., None], token, x)
    return x.masked_fill(pad[..., None], 0.0).requires_grad_(True)


def _project(x, w):
    """q, k, v (B, 1 + N, H, D) from tokens by one fixed linear map."""
    qkv = (x @ w).view(*x.shape[:2], H, 3, D)
    return qkv


def _dense_reference(qkv, allowed, bias=None):
    """Softmax over the allowed keys of each query (``allowed`` (B, Nq, Nk) bool, ``bias``
    (B, H, Nq, Nk)); a query with no allowed key outputs zero."""
    q, k, v = qkv.unbind(3)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _local_allowed(coords, pad, kernel, table):
    b, n1 = pad.shape
    r = kernel // 2
    offsets = [(dx, dy) for dx in range(-r, r + 1) for dy in range(-r, r + 1)]
    classes = distance_classes(kernel)
    allowed = torch.zeros(b, n1, n1, dtype=torch.bool)
    bias = torch.zeros(b, H, n1, n1, dtype=table.dtype)
    real = ~pad
    allowed[:, 0] = real
    for bi in range(b):
        for i in range(1, n1):
            if not real[bi, i]:
                continue
            for j in range(1, n1):
                d = tuple((coords[bi, j - 1] - coords[bi, i - 1]).tolist())
                if real[bi, j] and d in offsets:
                    allowed[bi, i, j] = True
                    bias[bi, :, i, j] = table[:, classes[offsets.index(d)]]
    return allowed, bias


def _paths(coords, pad, dtype):
    """name -> (attention of qkv, float64 reference of qkv) for every attention path."""
    table = torch.linspace(-0.5, 0.5, H * 3, dtype=dtype).view(H, 3)
    index = grid_neighbours(coords, pad[:, 1:], 3)
    allowed, lbias = _local_allowed(coords, pad, 3, table.double())
    real = (~pad)[:, None, :].expand(-1, pad.shape[1], -1)
    slopes = alibi_slopes(H)
    pos = torch.cat([coords.new_zeros(len(pad), 1, 2), coords], 1).double()
    dist = torch.cdist(pos, pos)
    dist[:, 0], dist[:, :, 0] = 0.0, 0.0
    abias = -slopes.double()[None, :, None, None] * dist[:, None]
    segs, dils = [4, 16, 128], [1, 2, 4]

    def local(qkv):
        return local_attention(*qkv.unbind(3), index, table[:, distance_classes(3)], pad)

    def dilated(qkv):
        return dilated_attention_qkv(qkv, segs, dils, pad)

    def dilated_ref(qkv):
        q, k, v = qkv.unbind(3)
        return reference_dilated_attention(q, k, v, segs, dils, pad)

    return {
        "local": (local, lambda qkv: _dense_reference(qkv, allowed, lbias)),
        "dense": (
            lambda qkv: dense_attention(*qkv.unbind(3), pad),
            lambda qkv: _dense_reference(qkv, real),
        ),
        "dilated": (dilated, dilated_ref),
        "alibi": (
            lambda qkv: alibi_attention(*qkv.unbind(3), coords, slopes.to(dtype), pad),
            lambda qkv: _dense_reference(qkv, real, abias),
        ),
    }


@pytest.fixture(params=["per-branch", "biased-dense"])
def dilated_backend(request, monkeypatch):
    small = attention_mod.SMALL_N_BIAS_ELEMENTS if request.param == "biased-dense" else 0
    monkeypatch.setattr(attention_mod, "SMALL_N_BIAS_ELEMENTS", small)
    return request.param


@pytest.mark.parametrize("path", ["local", "dense", "dilated", "alibi"])
def test_attention_paths_on_masked_padded_single_tile_inputs(rng, path, dilated_backend):
    """Output and the gradients of the tokens and projection through each path equal the
    float64 dense reference; real outputs only (padded rows are zero in both)."""
    coords, pad, masked = _batch(rng)
    x = _tokens(rng, pad, masked, torch.float64)
    w = torch.as_tensor(rng.standard_normal((E, 3 * H * D)) / np.sqrt(E)).requires_grad_(True)
    fn, ref = _paths(coords, pad, torch.float64)[path]
    keep = (~pad)[..., None, None].double()
    out, want = fn(_project(x, w)) * keep, ref(_project(x, w)) * keep
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    g = torch.as_tensor(rng.standard_normal(out.shape))
    got = torch.autograd.grad((out * g).sum(), (x, w))
    exp = torch.autograd.grad((want * g).sum(), (x, w))
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-9)
    # identical masked tokens whose neighbourhood is all masked: identical outputs
    if path == "local":
        core = masked[0].clone()
        inner = torch.nonzero(core)[:, 0]
        grid = coords[0, inner - 1]
        deep = inner[((grid >= 2) & (grid <= 4)).all(1)]
        rows = out[0, deep]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["local", "dense", "dilated", "alibi"])
def test_attention_paths_float32_gradients_are_finite(rng, path):
    coords, pad, masked = _batch(rng)
    x = _tokens(rng, pad, masked, torch.float32)
    w = torch.as_tensor(rng.standard_normal((E, 3 * H * D)) / np.sqrt(E), dtype=torch.float32)
    w.requires_grad_(True)
    fn, _ = _paths(coords, pad, torch.float32)[path]
    out = fn(_project(x, w))
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert float(gx.abs().max()) < 1e3 and float(gw.abs().max()) < 1e3


def test_packed_stream_with_single_tile_inputs_matches_reference(rng):
    """The varlen (packed) path with masked-identical tokens and one-tile inputs (CLS + 1)."""
    lengths = (65, 2, 21, 2)
    t = sum(lengths)
    tokens = rng.standard_normal((1, t, E))
    tokens[0, 3:30] = tokens[0, 2]  # a run of identical (masked) tokens
    x = torch.as_tensor(tokens).requires_grad_(True)
    w = torch.as_tensor(rng.standard_normal((E, 3 * H * D)) / np.sqrt(E))
    segs, dils = [4, 16, 128], [1, 2, 4]
    out = dilated_attention_qkv(_project(x, w), segs, dils, lengths=lengths)
    g = torch.as_tensor(rng.standard_normal(out.shape))
    (got,) = torch.autograd.grad((out * g).sum(), x)
    start = 0
    for n in lengths:
        part = x[:, start : start + n]
        q, k, v = _project(part, w).unbind(3)
        ref = reference_dilated_attention(q, k, v, segs, dils)
        torch.testing.assert_close(out[:, start : start + n], ref, rtol=1e-9, atol=1e-10)
        (exp,) = torch.autograd.grad((ref * g[:, start : start + n]).sum(), x)
        torch.testing.assert_close(
            got[:, start : start + n], exp[:, start : start + n], rtol=1e-8, atol=1e-9
        )
        start += n


def _masked_encoder_grads(seed, mask_token_zero):
    """Gradients of a loss on the masked tiles' output tokens of the CPU recipe's encoder
    (3 x 3 neighbourhood blocks, no positions, centred input) on a 12 x 12 crop whose 8 x 8
    core is masked, a padded crop and a single-tile crop."""
    torch.manual_seed(seed)
    enc = build_encoder(
        "tiny", in_dim=8, attention="dense", pos_mode="none", local_kernel=3, local_depth=2,
        input_center=True,
    )  # fmt: skip
    if mask_token_zero:
        torch.nn.init.zeros_(enc.mask_token)
    g = torch.stack(torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij"), -1)
    g = g.reshape(-1, 2)
    n = len(g)
    coords = torch.stack([g, g, torch.zeros_like(g)])
    pad = torch.zeros(3, n, dtype=torch.bool)
    pad[1, 30:] = True
    pad[2, 1:] = True
    token_mask = torch.zeros(3, n, dtype=torch.bool)
    token_mask[0] = ((g >= 2) & (g <= 9)).all(1)
    token_mask[1, :10] = True
    x = torch.randn(3, n, 8)
    center = torch.randn(3, 8)
    cls, tokens = enc.forward_tokens(x, coords, pad, token_mask, center)
    target = torch.randn_like(tokens)
    loss = (tokens * target)[token_mask].sum() / token_mask.sum() + (cls * target[:, 0]).sum()
    loss.backward()
    return {name: p.grad for name, p in enc.named_parameters() if p.grad is not None}


def test_fully_masked_receptive_fields_keep_encoder_gradients_bounded(rng):
    grads = _masked_encoder_grads(int(rng.integers(1 << 30)), mask_token_zero=False)
    norm = torch.stack([gr.norm() for gr in grads.values()]).norm()
    assert torch.isfinite(norm) and float(norm) < 1e3, float(norm)
    assert "mask_token" in grads and float(grads["mask_token"].norm()) > 0
    # the cause, kept visible: a zero mask token makes those tiles zero vectors in every
    # block, and the LayerNorms' backward at zero variance explodes the gradient
    bad = _masked_encoder_grads(int(rng.integers(1 << 30)), mask_token_zero=True)
    assert float(bad["mask_token"].abs().max()) > 1e8
