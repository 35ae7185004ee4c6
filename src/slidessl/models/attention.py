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
from typing import NamedTuple

import torch
import torch.nn.functional as F

from slidessl.models.lse import attention_with_lse

__all__ = [
    "branch_layout",
    "dense_attention",
    "dilated_attention",
    "validate_branches",
]

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


def branch_layout(n: int, heads: int, segment: int, dilation: int) -> tuple[int, int, int]:
    """Padded layout of one branch: ``(n_seg, w, w_pad)``.

    The sequence is padded (masked) to ``n_seg * w`` tokens so that segments of ``w =
    min(segment, n)`` tokens are a view, and each segment to ``w_pad = r * ceil(w / r)``
    tokens so that its sparse rows are a ``(L, r)`` view: head ``h`` belongs to group
    ``h // ceil(heads / r)`` (torchscale pads heads to a multiple of ``r``) and keeps the
    in-segment offsets ``group + r * l``, i.e. column ``group`` of that view.
    """
    w = min(segment, n)
    n_seg = -(-n // w)
    return n_seg, w, -(-w // dilation) * dilation


def _head_group(heads: int, dilation: int, device) -> torch.Tensor:
    return torch.arange(heads, device=device) // -(-heads // dilation)


def _pad_segments(x, n_seg, w, w_pad):
    """``(B, N, ...)`` -> ``(B, n_seg, w_pad, ...)``, zero-padded at the end of the sequence
    and of every segment (a view when nothing needs padding)."""
    b, n = x.shape[:2]
    rest = x.shape[2:]
    tail = [0, 0] * len(rest)
    if n_seg * w != n:
        x = F.pad(x, tail + [0, n_seg * w - n])
    x = x.view(b, n_seg, w, *rest)
    if w_pad != w:
        x = F.pad(x, tail + [0, w_pad - w])
    return x


def _unpad_segments(x, n, w):
    """Inverse of `_pad_segments`: ``(B, n_seg, w_pad, ...)`` -> ``(B, N, ...)``."""
    b, n_seg = x.shape[:2]
    if x.shape[2] != w:
        x = x[:, :, :w]
    return x.reshape(b, n_seg * w, *x.shape[3:])[:, :n]


def _sparse_rows(x, r, group):
    """``(B, S, L * r, H, D)`` -> ``(B * S, H, L, D)``: head ``h`` keeps column ``group[h]``
    of the ``(L, r)`` view of its segment. A diagonal (strided view) when the heads split
    evenly into ``r`` groups, one ``index_select`` otherwise; never a sort-based kernel."""
    b, s, wp, h, d = x.shape
    rows = wp // r
    if r == 1:
        sel = x.permute(0, 1, 3, 2, 4)  # (B, S, H, L, D)
    elif h % r == 0:
        diag = x.view(b, s, rows, r, r, h // r, d).diagonal(dim1=3, dim2=4)  # (B,S,L,H/r,D,r)
        sel = diag.permute(0, 1, 5, 3, 2, 4)  # (B, S, r, H/r, L, D)
    else:
        flat = x.reshape(b, s, rows, r * h, d)
        index = group * h + torch.arange(h, device=x.device)
        sel = flat.index_select(3, index).permute(0, 1, 3, 2, 4)
    return sel.reshape(b * s, h, rows, d)


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


class _Piece(NamedTuple):
    """Tokens ``[start, stop)`` of one branch as ``n_seg`` segments of ``w`` tokens, each
    padded to ``w_pad`` (a multiple of ``r``); ``group[h]`` is head ``h``'s offset."""

    start: int
    stop: int
    r: int
    n_seg: int
    w: int
    w_pad: int
    group: torch.Tensor


def _gather(x, p):
    """``(B, N, H, D)`` -> the piece's sparse rows ``(B * S, H, L, D)`` (a view for r = 1)."""
    return _sparse_rows(_pad_segments(x[:, p.start : p.stop], p.n_seg, p.w, p.w_pad), p.r, p.group)


def _scatter_add_(dst, rows, p):
    """In place: ``dst`` (B, N, H, D) += ``rows`` (B, S, L, H, D) at the piece's positions.
    When ``r`` does not divide ``w`` the last ``w mod r`` positions of each segment (the
    padded row) go through a zero buffer of ``r`` positions."""
    b, _n, h, d = dst.shape
    view = dst[:, p.start : p.stop].view(b, p.n_seg, p.w, h, d)
    full = p.w // p.r
    if full:
        _add_rows_(view[:, :, : full * p.r], rows[:, :, :full], p.r, p.group)
    if full * p.r != p.w:
        tail = rows.new_zeros(b, p.n_seg, p.r, h, d)
        _add_rows_(tail, rows[:, :, full:], p.r, p.group)
        view[:, :, full * p.r :].add_(tail[:, :, : p.w - full * p.r])


def _as_rows(t, p):
    """``(B * S, H, L, D)`` kernel layout -> ``(B, S, L, H, D)`` (a view)."""
    bs, h, rows, d = t.shape
    return t.view(bs // p.n_seg, p.n_seg, h, rows, d).transpose(2, 3)


class _GatherPieces(torch.autograd.Function):
    """Sparse rows of every piece for each input: one gradient buffer per input in backward
    (slicing, padding and ``diagonal`` per piece would each allocate a zero-filled gradient
    of the whole input)."""

    @staticmethod
    def forward(ctx, pieces, *xs):
        ctx.pieces, ctx.shapes = pieces, [x.shape for x in xs]
        ctx.like = xs[0].new_empty(0)
        return tuple(_gather(x, p) for p in pieces for x in xs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        k = len(ctx.shapes)
        out = []
        for j, shape in enumerate(ctx.shapes):
            g = ctx.like.new_zeros(shape)
            for i, p in enumerate(ctx.pieces):
                if grads[i * k + j] is not None:
                    _scatter_add_(g, _as_rows(grads[i * k + j], p), p)
            out.append(g)
        return (None, *out)


class _AddRows(torch.autograd.Function):
    """``result`` (B, N, H, D) += one piece's rows ``term`` (B, S, L, H, D), in place.

    Autograd of an in-place add through a view clones the whole gradient of ``result``
    (``CopySlices``) once per piece; here the gradient passes through unchanged and
    ``term``'s gradient is read through the same strided view."""

    @staticmethod
    def forward(ctx, result, term, piece):
        _scatter_add_(result, term, piece)
        ctx.mark_dirty(result)
        ctx.piece = piece
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return grad, _as_rows(_gather(grad, ctx.piece), ctx.piece), None


def _branch(qs, ks, vs, valid, p, exact_grad):
    """One LongNet piece on its sparse rows ``(B * S, H, L, D)`` (see `_gather`).

    ``valid`` is None (every token real) or the piece's bool ``(B|1, stop - start)`` key
    mask. Returns ``out`` (B, S, L, H, D), ``lse`` (B, S, L, H) of the rows each head keeps,
    and ``lse_full`` (B, S, L, r, H) for every position ``(s, l, t)`` of the padded piece:
    ``-inf`` wherever the head does not cover it, at padded positions and at padding.
    """
    bs, h, rows, _d = qs.shape
    b, r = bs // p.n_seg, p.r
    key_valid = None
    if valid is not None or p.w_pad != p.w:
        if valid is None:
            valid = torch.ones(1, p.stop - p.start, dtype=torch.bool, device=qs.device)
        vb = valid.shape[0]
        vp = _pad_segments(valid.to(torch.uint8), p.n_seg, p.w, p.w_pad)
        key_valid = vp.view(vb, p.n_seg, rows, r).index_select(3, p.group).bool()  # (B|1,S,L,H)
        mask = key_valid.permute(0, 1, 3, 2).unsqueeze(3)  # (B|1, S, H, 1, L)
        mask = mask.expand(b, p.n_seg, h, 1, rows).reshape(bs, h, 1, rows)
    else:
        mask = None
    out, lse = attention_with_lse(qs, ks, vs, mask, exact_grad=exact_grad)
    out = _as_rows(out, p)
    lse = lse.view(b, p.n_seg, h, rows).permute(0, 1, 3, 2)
    if key_valid is not None:
        lse = lse.masked_fill(~key_valid, float("-inf"))
    if r > 1:
        covers = torch.arange(r, device=qs.device)[:, None] == p.group[None, :]  # (r, H)
        lse_full = torch.where(covers, lse.unsqueeze(3), float("-inf"))
    else:
        lse_full = lse.unsqueeze(3)
    return out, lse, lse_full


def _add_rows_(dst, src, r, group):
    """In place: ``dst`` (B, S, L * r, H, D), a view of the result, += ``src``
    (B, S, L, H, D) at each head's offset: the inverse of `_sparse_rows`, touching 1/r of
    ``dst`` through a strided view (``index_add_`` when the heads do not split evenly)."""
    b, s, wp, h, d = dst.shape
    rows = wp // r
    if r == 1:
        dst.add_(src)
    elif h % r == 0:
        diag = dst.view(b, s, rows, r, r, h // r, d).diagonal(dim1=3, dim2=4)  # (B,S,L,H/r,D,r)
        diag.add_(src.reshape(b, s, rows, r, h // r, d).permute(0, 1, 2, 4, 5, 3))
    else:
        index = group * h + torch.arange(h, device=dst.device)
        dst.view(b, s, rows, r * h, d).index_add_(3, index, src)


def _pieces(n: int, segment: int) -> list[tuple[int, int, int]]:
    """Split one branch into ``(start, stop, segment)`` pieces: the whole segments (views,
    no padding) and the partial last segment, run as one segment of its own length."""
    w = min(segment, n)
    full = (n // w) * w
    pieces = [(0, full, w)] if full else []
    if full < n:
        pieces.append((full, n, n - full))
    return pieces


def dilated_attention(q, k, v, segments, dilations, padding_mask=None, exact_grad=True):
    """LongNet dilated attention over ``(B, N, H, D)`` tensors; returns ``(B, N, H, D)``.

    ``exact_grad=True`` back-propagates through the branch weights (the LSE); the
    published code treats them as constants, which ``exact_grad=False`` reproduces.
    Each branch runs on its whole segments (views of the sequence) and, apart, on the
    partial last segment (padded to a multiple of ``r``, masked); sparse segments are
    strided views, and each branch's weighted rows are added into the result through the
    same views: no scatter and no full-size intermediate per branch.
    """
    segments, dilations = validate_branches(segments, dilations)
    b, n, h, d = q.shape
    if padding_mask is not None and not bool(padding_mask.any()):
        padding_mask = None
    if len(segments) == 1 and dilations[0] == 1 and segments[0] >= n:
        return dense_attention(q, k, v, padding_mask)
    if exact_grad and b * h * n * n <= SMALL_N_BIAS_ELEMENTS:
        return _dilated_as_biased_dense(q, k, v, segments, dilations, padding_mask)
    pieces = []  # every piece of every branch; a branch's pieces are consecutive
    for seg, r in zip(segments, dilations):
        group = _head_group(h, r, q.device)
        for start, stop, piece_seg in _pieces(n, seg):
            n_seg, w, w_pad = branch_layout(stop - start, h, piece_seg, r)
            pieces.append(_Piece(start, stop, r, n_seg, w, w_pad, group))
    rows = _GatherPieces.apply(pieces, q, k, v)
    valid = None if padding_mask is None else ~padding_mask
    parts = []  # (out, lse, lse_full) per piece
    for i, p in enumerate(pieces):
        pv = None if valid is None else valid[:, p.start : p.stop]
        parts.append(_branch(*rows[3 * i : 3 * i + 3], pv, p, exact_grad))
    # per position and head: log of the summed softmax denominators over branches, (B, N, H)
    per_branch, run = [], []
    for p, (_out, _lse, lse_full) in zip(pieces, parts):
        run.append(_unpad_segments(lse_full.flatten(2, 3), p.stop - p.start, p.w))
        if p.stop == n:
            per_branch.append(run[0] if len(run) == 1 else torch.cat(run, dim=1))
            run = []
    log_z = torch.logsumexp(torch.stack(per_branch), dim=0)
    log_z = torch.where(log_z.isfinite(), log_z, torch.zeros_like(log_z))
    result = q.new_zeros(b, n, h, d, dtype=parts[0][0].dtype)
    for p, (out, lse, _lse_full) in zip(pieces, parts):
        z = _as_rows(_gather(log_z.unsqueeze(-1), p), p).squeeze(-1)  # log_z at the rows
        weight = torch.exp(lse - z)  # (B, S, L, H): 0 at padded rows and at padding
        result = _AddRows.apply(result, out * weight.unsqueeze(-1).to(out.dtype), p)
    if padding_mask is not None:
        result = result.masked_fill(padding_mask[:, :, None, None], 0.0)
    return result


def attention_flops(n: int, dim: int, segments=None, dilations=None) -> float:
    """Multiply-add FLOPs (x2) of the attention core (QK^T and PV) for one sequence.

    Dilated: every whole segment costs ``ceil(w / r)^2`` per head group and the partial last
    segment ``ceil(rest / r)^2`` (it runs as a segment of its own length, see `_pieces`).
    """
    if segments is None:
        return 4.0 * n * n * dim
    total = 0.0
    for s, r in zip(segments, dilations):
        for start, stop, seg in _pieces(n, s):
            w = min(seg, stop - start)
            total += 4.0 * ((stop - start) // w) * math.ceil(w / r) ** 2 * dim
    return total
