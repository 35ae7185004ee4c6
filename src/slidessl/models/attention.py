"""Dense and dilated (LongNet) self-attention with key-padding masks.

Dilated attention follows LongNet (Ding et al., 2023, "LongNet: Scaling Transformers to
1,000,000,000 Tokens", arXiv:2307.02486) as implemented in microsoft/torchscale: for each
branch ``(w, r)`` the spatially ordered sequence is cut into segments of ``w`` tokens (one
segment when ``w >= N``); inside a segment head group ``j`` keeps the positions whose offset
``t`` satisfies ``t % r == j``; attention runs inside each sparse segment; the branch outputs
are combined per position and head with weights ``softmax_i(lse_i)``, the softmax
denominators. Unlike the published code, a partial last segment and padded slides are
*masked*: no padded key ever receives softmax mass.

Tensors use the layout ``(B, N, H, D)`` (the natural view of a linear projection); the
``padding_mask`` is ``(B, N)`` bool with True = padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slidessl.models.lse import attention_with_lse

__all__ = [
    "branch_index",
    "dense_attention",
    "dilated_attention",
    "validate_branches",
]

_INDEX_CACHE: dict = {}
_BIAS_CACHE: dict = {}
# below this many (batch x heads x N x N) mask elements, dilated attention runs as ONE fused
# SDPA call with a multiplicity bias (exact, see `multiplicity_bias`): far fewer kernels
SMALL_N_BIAS_ELEMENTS = 2**24


def validate_branches(segments, dilations) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check ``segments``/``dilations`` and return them as tuples of positive ints."""
    segments = tuple(int(s) for s in segments)
    dilations = tuple(int(r) for r in dilations)
    if not segments or len(segments) != len(dilations):
        raise ValueError(
            f"segments {list(segments)} and dilations {list(dilations)} must be non-empty "
            "lists of the same length"
        )
    if any(s < 1 for s in segments) or any(r < 1 for r in dilations):
        raise ValueError(f"segments {list(segments)} and dilations {list(dilations)} must be >= 1")
    return segments, dilations


def branch_index(n: int, heads: int, segment: int, dilation: int, device) -> tuple:
    """Sparse-segment layout of one branch.

    Returns ``(index, valid, all_valid, n_seg, seg_len)`` where ``index`` is a ``(n_seg * seg_len,
    heads)`` long tensor of sequence positions (clamped into range) and ``valid`` a bool
    tensor of the same shape marking real positions. Head ``h`` belongs to group
    ``h // ceil(heads / r)`` (torchscale pads heads to a multiple of ``r``), and keeps the
    in-segment offsets ``group + r * l``.
    """
    key = (n, heads, segment, dilation, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is not None:
        return hit
    w = min(segment, n)
    n_seg = -(-n // w)
    r = dilation
    seg_len = -(-w // r)
    per_group = -(-heads // r)
    group = torch.arange(heads) // per_group  # (H,)
    offset = group[None, :] + r * torch.arange(seg_len)[:, None]  # (L, H)
    pos = torch.arange(n_seg)[:, None, None] * w + offset[None]  # (S, L, H)
    valid = (offset[None] < w) & (pos < n)
    index = torch.where(valid, pos, torch.zeros_like(pos)).reshape(n_seg * seg_len, heads)
    valid = valid.reshape(n_seg * seg_len, heads)
    out = (index.to(device), valid.to(device), bool(valid.all()), n_seg, seg_len)
    if len(_INDEX_CACHE) > 256:
        _INDEX_CACHE.clear()
    _INDEX_CACHE[key] = out
    return out


def multiplicity_bias(n, heads, segments, dilations, device, dtype):
    """``(H, N, N)`` bias ``log c`` and ``(H, N)`` coverage, ``c[h, q, k]`` = number of branches
    in which query ``q`` sees key ``k`` in head ``h``.

    LongNet's LSE-weighted sum of branch outputs equals one softmax over all keys with
    weights ``c`` (each branch adds its keys' ``exp(score)`` to numerator and denominator),
    i.e. dense attention with the additive bias ``log c`` (``c = 0``: masked).
    """
    key = (n, heads, tuple(segments), tuple(dilations), str(device), dtype)
    hit = _BIAS_CACHE.get(key)
    if hit is not None:
        return hit
    pos = torch.arange(n, device=device)
    count = torch.zeros(heads, n, n, dtype=torch.int16, device=device)
    for segment, r in zip(segments, dilations):
        w = min(segment, n)
        same = (pos // w)[:, None] == (pos // w)[None, :]
        group = torch.arange(heads, device=device) // -(-heads // r)  # (H,)
        sel = (pos % w)[None, :] % r == group[:, None]  # (H, N)
        count += (same[None] & sel[:, :, None] & sel[:, None, :]).to(torch.int16)
    covered = count.diagonal(dim1=1, dim2=2) > 0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bias = torch.where(count > 0, count.to(acc).log(), -1.0e4).to(dtype)
    if sum(b.numel() for b, _ in _BIAS_CACHE.values()) > 2**25:
        _BIAS_CACHE.clear()
    _BIAS_CACHE[key] = (bias, covered)
    return bias, covered


def _dilated_as_biased_dense(q, k, v, segments, dilations, padding_mask):
    b, n, h, d = q.shape
    bias, covered = multiplicity_bias(n, h, segments, dilations, q.device, q.dtype)
    mask = bias[None]
    if padding_mask is not None:
        mask = mask.masked_fill(padding_mask[:, None, None, :], -1.0e4)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    drop = ~covered.T[None, :, :, None]  # (1, N, H, 1): positions no branch covers
    if padding_mask is not None:
        drop = drop | padding_mask[:, :, None, None]
    return out.masked_fill(drop, 0.0)


def dense_attention(q, k, v, padding_mask=None):
    """Full softmax attention with fused SDPA; ``q, k, v`` are ``(B, N, H, D)``."""
    mask = None
    if padding_mask is not None:
        mask = (~padding_mask)[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    out = out.transpose(1, 2)
    if padding_mask is not None:
        out = out.masked_fill(padding_mask[:, :, None, None], 0.0)
    return out


def _branch(q, k, v, padding_mask, segment, dilation, exact_grad):
    """One LongNet branch.

    Returns ``(kind, out, lse, aux)``. ``kind == "view"`` (r = 1, whole segments): ``out``
    is (B, S, H, w, D) and ``lse`` (B, S, H, w), both a free view of the sequence. ``kind
    == "gather"``: ``out`` is (B, H, M, D), ``lse`` (B, H, M) in sparse order and ``aux``
    the (H, M) position index. Invalid sparse slots and padded queries have ``lse = -inf``.
    """
    b, n, h, d = q.shape
    w = min(segment, n)
    if dilation == 1 and n % w == 0:
        n_seg = n // w
        # (B, N, H, D) -> (B*S, H, w, D): a strided view, no copy
        qs, ks, vs = (
            t.view(b, n_seg, w, h, d).transpose(2, 3).reshape(b * n_seg, h, w, d) for t in (q, k, v)
        )
        mask = None
        if padding_mask is not None:
            mask = (~padding_mask).view(b * n_seg, 1, 1, w)
        out, lse = attention_with_lse(qs, ks, vs, mask, exact_grad=exact_grad)
        out, lse = out.reshape(b, n_seg, h, w, d), lse.reshape(b, n_seg, h, w)
        if mask is not None:
            lse = lse.masked_fill(padding_mask.view(b, n_seg, 1, w), float("-inf"))
        return "view", out, lse, None
    index, valid, all_valid, n_seg, seg_len = branch_index(n, h, segment, dilation, q.device)
    index_hm, valid_hm = index.T.contiguous(), valid.T.contiguous()  # (H, M)
    m = index_hm.shape[1]
    heads = torch.arange(h, device=q.device)[:, None]
    # gather straight into (B, H, S*L, D) = (B, H*S, L, D): heads and segments are batch dims
    qs, ks, vs = (t[:, index_hm, heads].view(b, h * n_seg, seg_len, d) for t in (q, k, v))
    key_valid = None
    if padding_mask is not None:
        pm = torch.gather(padding_mask, 1, index_hm.reshape(1, -1).expand(b, -1))
        key_valid = valid_hm[None] & ~pm.view(b, h, m)
    elif not all_valid:
        key_valid = valid_hm[None].expand(b, h, m)
    mask = None if key_valid is None else key_valid.reshape(b, h * n_seg, 1, seg_len)
    out, lse = attention_with_lse(qs, ks, vs, mask, exact_grad=exact_grad)
    out, lse = out.reshape(b, h, m, d), lse.reshape(b, h, m)
    if key_valid is not None:
        lse = lse.masked_fill(~key_valid, float("-inf"))
    return "gather", out, lse, index_hm


def dilated_attention(q, k, v, segments, dilations, padding_mask=None, exact_grad=True):
    """LongNet dilated attention over ``(B, N, H, D)`` tensors; returns ``(B, N, H, D)``.

    ``exact_grad=True`` back-propagates through the branch weights (the LSE); the
    published code treats them as constants, which ``exact_grad=False`` reproduces.
    """
    segments, dilations = validate_branches(segments, dilations)
    b, n, h, d = q.shape
    if padding_mask is not None and not bool(padding_mask.any()):
        padding_mask = None
    if len(segments) == 1 and dilations[0] == 1 and segments[0] >= n:
        return dense_attention(q, k, v, padding_mask)
    if exact_grad and b * h * n * n <= SMALL_N_BIAS_ELEMENTS:
        return _dilated_as_biased_dense(q, k, v, segments, dilations, padding_mask)
    parts = [_branch(q, k, v, padding_mask, s, r, exact_grad) for s, r in zip(segments, dilations)]
    # per position and head: log of the summed softmax denominators over branches, (B, H, N)
    dense_lse = []
    for kind, _out, lse, index_hm in parts:
        if kind == "view":
            dense_lse.append(lse.transpose(1, 2).reshape(b, h, n))
        else:
            target = torch.where(lse.isfinite(), index_hm[None].expand(b, -1, -1), n)
            full = lse.new_full((b, h, n + 1), float("-inf"))
            dense_lse.append(full.scatter(2, target, lse)[..., :n])
    log_z = torch.logsumexp(torch.stack(dense_lse), dim=0)
    log_z = torch.where(log_z.isfinite(), log_z, torch.zeros_like(log_z))
    result = None
    for kind, out, lse, _index in parts:
        if kind == "view":
            n_seg, w = out.shape[1], out.shape[3]
            z = log_z.view(b, h, n_seg, w).transpose(1, 2)
            term = (out * torch.exp(lse - z).unsqueeze(-1).to(out.dtype)).transpose(2, 3)
            term = term.reshape(b, n, h, d)
            result = term if result is None else result + term
    if result is None:
        result = q.new_zeros((b, n, h, d))
    for kind, out, lse, index_hm in parts:
        if kind == "gather":
            weight = torch.exp(lse - torch.gather(log_z, 2, index_hm[None].expand(b, -1, -1)))
            term = out * weight.unsqueeze(-1).to(out.dtype)
            rows = torch.arange(b, device=q.device)[:, None, None]
            heads = torch.arange(h, device=q.device)[None, :, None]
            result = result.index_put((rows, index_hm[None], heads), term, accumulate=True)
    if padding_mask is not None:
        result = result.masked_fill(padding_mask[:, :, None, None], 0.0)
    return result


def attention_flops(n: int, dim: int, segments=None, dilations=None) -> float:
    """Multiply-add FLOPs (x2) of the attention core (QK^T and PV) for one sequence."""
    if segments is None:
        return 4.0 * n * n * dim
    total = 0.0
    for s, r in zip(segments, dilations):
        w = min(s, n)
        n_seg = math.ceil(n / w)
        seg_len = math.ceil(w / r)
        total += 4.0 * n_seg * seg_len * seg_len * dim
    return total
