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

from slidessl.models.lse import (
    MASK_VALUE,
    attention_with_lse,
    combine_branches,
    packed_attention_available,
    packed_dilated_attention,
)

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

    Segments hold ``w = min(segment, n)`` tokens (``n_seg`` of them, the last one padded),
    each padded to ``w_pad = r * ceil(w / r)`` so that it has ``L = w_pad / r`` sparse rows:
    head ``h`` belongs to group ``h // ceil(heads / r)`` (torchscale pads heads to a
    multiple of ``r``) and keeps the in-segment offsets ``group + r * l``, ``l < L``
    (offsets ``>= w`` are padding, masked).
    """
    w = min(segment, n)
    n_seg = -(-n // w)
    return n_seg, w, -(-w // dilation) * dilation


def _head_group(heads: int, dilation: int, device) -> torch.Tensor:
    return torch.arange(heads, device=device) // -(-heads // dilation)


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


def _pieces(n: int, segment: int) -> list[tuple[int, int, int]]:
    """Split one branch into ``(start, stop, segment)`` pieces: the whole segments (views,
    no padding) and the partial last segment, run as one segment of its own length."""
    w = min(segment, n)
    full = (n // w) * w
    pieces = [(0, full, w)] if full else []
    if full < n:
        pieces.append((full, n, n - full))
    return pieces


class _Plan(NamedTuple):
    """Precomputed indices of every branch over a set of sequences: the ``B`` rows of a
    padded ``(B, N)`` batch, or the sequences of a packed (varlen) token stream.

    Rows: every (segment, head, kept offset) of every piece of every branch of every
    sequence, grouped by their segment length ``L`` (pieces of different branches and
    sequences with the same ``L`` share one attention call; a class whose work is small is
    padded into the next longer one, see ``MERGE_FRACTION``), in the order ``(class,
    sequence, segment, head, l)`` so that each class is a contiguous ``(S, H, L, D)``
    block of the gathered rows; ``R`` rows in all. Padding rows (segment ends, merged
    classes) read their sequence's first position, are masked as keys, and add
    zero-weighted into it.
    """

    classes: tuple  # ((L, S, start_row, all_valid), ...): S segments of every sequence
    gather: torch.Tensor  # (R,) flat (token, head) index each row reads / adds into
    tokens: torch.Tensor  # (R,) flat token of each row (padding lookup)
    valid: torch.Tensor  # (R,) bool: the row is a real position
    rows_of: torch.Tensor  # (T * H * nb,) row of (token, h) in branch i, or R (none)
    values_of: torch.Tensor  # rows_of with R replaced by row 0 (read with weight 0)
    row_slot: torch.Tensor  # (R,) the (token, head, branch) slot of each row; padding rows
    # point at a slot whose weight is 0 (one no branch row fills, or one past the end)
    pad_weight: bool  # no slot is empty: a zero weight is appended for the padding rows
    sentinel: int  # R: the -inf row appended to the LSE
    covered: bool  # every (position, head) is seen by some branch
    biases: dict  # dtype -> (R,) additive key bias of the padding rows (cached)


_PLAN_CACHE: dict = {}
_PIECE_CACHE: dict = {}
# a class of rows is padded into the next longer one when that adds at most this fraction
# of the call's attention FLOPs: one kernel call fewer for a few masked keys
MERGE_FRACTION = 0.05


def _merge_classes(per_class: dict, h: int) -> dict:
    lengths = sorted(per_class)
    cost = {L: sum(p.shape[0] for *_, p, _ in per_class[L]) * h * L * L for L in lengths}
    total = sum(cost.values())
    merged = dict(per_class)
    for small, big in zip(lengths[:-1], lengths[1:]):
        n_seg = sum(p.shape[0] for *_, p, _ in merged[small])
        if n_seg * h * (big * big - small * small) > MERGE_FRACTION * total:
            continue
        pad = big - small
        moved = [
            (s, i, F.pad(p, (0, pad)), F.pad(o, (0, pad), value=False))
            for s, i, p, o in merged[small]
        ]
        merged[big] = sorted(moved + merged[big], key=lambda e: e[0])  # stable: by sequence
        del merged[small]
        total += n_seg * h * (big * big - small * small)
    return merged


def _length_pieces(n: int, h: int, segments, dilations) -> dict:
    """Rows of one sequence of ``n`` tokens: ``{L: [(branch, pos (S, H, L), ok)]}``,
    positions relative to the sequence start (cached per length)."""
    key = (n, h, segments, dilations)
    hit = _PIECE_CACHE.get(key)
    if hit is not None:
        return hit
    per_class: dict[int, list] = {}
    for i, (seg, r) in enumerate(zip(segments, dilations)):
        group = _head_group(h, r, "cpu")  # (H,)
        for start, stop, piece_seg in _pieces(n, seg):
            n_seg, w, w_pad = branch_layout(stop - start, h, piece_seg, r)
            rows = w_pad // r
            offset = group[None, :, None] + r * torch.arange(rows)[None, None, :]  # (1, H, L)
            pos = start + torch.arange(n_seg)[:, None, None] * w + offset  # (S, H, L)
            ok = (offset < w).expand(n_seg, h, rows)
            per_class.setdefault(rows, []).append((i, pos.where(ok, 0), ok))
    if len(_PIECE_CACHE) >= 256:
        _PIECE_CACHE.clear()
    _PIECE_CACHE[key] = per_class
    return per_class


def _build_plan(seqs, h, segments, dilations, device) -> _Plan:
    """``seqs``: ``((offset, n), ...)``, each sequence's first token and length in a
    stream of ``T = offset + n`` (of the last) tokens."""
    nb = len(segments)
    total_tokens = seqs[-1][0] + seqs[-1][1]
    per_class: dict[int, list] = {}  # L -> [(sequence, branch, pos (S, H, L), ok (S, H, L))]
    for s, (_offset, n) in enumerate(seqs):
        for rows, parts in _length_pieces(n, h, segments, dilations).items():
            per_class.setdefault(rows, []).extend((s, i, p, o) for i, p, o in parts)
    per_class = _merge_classes(per_class, h)
    gathers, tokens, valids, classes = [], [], [], []
    rows_of = torch.full((total_tokens * h, nb), -1, dtype=torch.long)
    heads = torch.arange(h)[None, :, None]
    start_row = 0
    for rows in sorted(per_class):
        parts = per_class[rows]
        tok = torch.cat([seqs[s][0] + p for s, _, p, _ in parts])
        ok = torch.cat([o for *_, o in parts])  # (S, H, L)
        branch = torch.cat([torch.full((p.shape[0],), i) for _, i, p, _ in parts])  # (S,)
        n_seg = tok.shape[0]
        flat = tok * h + heads  # (S, H, L)
        gathers.append(flat.flatten())
        tokens.append(tok.flatten())
        sel = ok.flatten()
        valids.append(sel)
        row_ids = start_row + torch.arange(n_seg * h * rows)
        br = branch[:, None, None].expand(n_seg, h, rows).flatten()[sel]
        rows_of[flat.flatten()[sel], br] = row_ids[sel]
        classes.append((rows, n_seg, start_row, bool(ok.all())))
        start_row += n_seg * h * rows
    covered = bool((rows_of >= 0).any(-1).all())
    valid = torch.cat(valids)
    sentinel = start_row
    values_of = rows_of.where(rows_of >= 0, 0)
    filled = rows_of.flatten() >= 0
    empty = (~filled).nonzero()
    # a slot of weight 0 for the padding rows: an unfilled one, else one past the end
    zero_slot = int(empty[0]) if len(empty) else filled.numel()
    row_slot = torch.full((start_row,), zero_slot, dtype=torch.long)
    row_slot[rows_of.flatten()[filled]] = filled.nonzero()[:, 0]
    rows_of = rows_of.where(rows_of >= 0, sentinel)
    return _Plan(
        tuple(classes),
        torch.cat(gathers).to(device),
        torch.cat(tokens).to(device),
        valid.to(device),
        rows_of.flatten().to(device),
        values_of.flatten().to(device),
        row_slot.to(device),
        zero_slot == filled.numel(),
        sentinel,
        covered,
        {},
    )


def _cached_plan(seqs, h, segments, dilations, device) -> _Plan:
    key = (seqs, h, tuple(segments), tuple(dilations), str(device))
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        if len(_PLAN_CACHE) >= 64:
            _PLAN_CACHE.clear()
        plan = _PLAN_CACHE[key] = _build_plan(seqs, h, tuple(segments), tuple(dilations), device)
    return plan


def _plan(b, n, h, segments, dilations, device) -> _Plan:
    """The plan of a padded ``(B, N)`` batch (every row a sequence of ``N`` tokens)."""
    return _cached_plan(tuple((bi * n, n) for bi in range(b)), h, segments, dilations, device)


def _plan_varlen(lengths, h, segments, dilations, device) -> _Plan:
    """The plan of a packed stream of sequences of ``lengths`` tokens, back to back."""
    offsets = [0]
    for n in lengths[:-1]:
        offsets.append(offsets[-1] + n)
    return _cached_plan(tuple(zip(offsets, lengths)), h, segments, dilations, device)


def _row_ok(plan, padding_mask):
    """(R,) bool: the row is a real position of a real (non-padding) token."""
    if padding_mask is None:
        return plan.valid
    return plan.valid & (~padding_mask).flatten().index_select(0, plan.tokens)


def _key_masks(plan, b, h, padding_mask, dtype, device):
    """Per class: the key mask of its rows, as the packed kernels take it (an additive
    float bias on the CPU, bool elsewhere) or None when every key is real."""
    cpu = device.type == "cpu"
    ok = _row_ok(plan, padding_mask)
    if padding_mask is not None:
        flat = torch.where(ok, 0.0, MASK_VALUE).to(dtype) if cpu else ok
    elif cpu:
        flat = plan.biases.get(dtype)
        if flat is None:
            flat = plan.biases[dtype] = torch.where(ok, 0.0, MASK_VALUE).to(dtype)
    else:
        flat = ok
    masks = []
    for rows, n_seg, start, all_valid in plan.classes:
        if padding_mask is None and all_valid:
            masks.append(None)
            continue
        size = n_seg * h * rows
        masks.append(flat[start : start + size].view(n_seg, h, 1, rows))
    return masks


def dilated_attention(q, k, v, segments, dilations, padding_mask=None, exact_grad=True):
    """LongNet dilated attention over ``(B, N, H, D)`` tensors; returns ``(B, N, H, D)``
    (see :func:`dilated_attention_qkv`)."""
    segments, dilations = validate_branches(segments, dilations)
    if len(segments) == 1 and dilations[0] == 1 and segments[0] >= q.shape[1]:
        return dense_attention(q, k, v, padding_mask)
    return dilated_attention_qkv(
        torch.stack([q, k, v], dim=3), segments, dilations, padding_mask, exact_grad
    )


def dilated_attention_qkv(
    qkv, segments, dilations, padding_mask=None, exact_grad=True, lengths=None
):
    """LongNet dilated attention over one ``(B, N, H, 3, D)`` tensor of q, k, v (a fused
    projection's output); returns ``(B, N, H, D)``.

    ``exact_grad=True`` back-propagates through the branch weights (the LSE); the
    published code treats them as constants, which ``exact_grad=False`` reproduces.
    A fixed handful of kernels per call, whatever the number of branches and segments:
    one gather of the sparse rows of q, k and v for every branch (precomputed indices,
    cached per shape); one attention call with LSE per distinct segment length; one
    gather-logsumexp for the branch weights and one ``index_add`` of the weighted rows.
    Each branch runs on its whole segments and, apart, on the partial last segment (its
    own, shorter length); segment padding and padded slides are masked, so no padded key
    receives softmax mass. ``q``, ``k``, ``v`` may be views of one fused projection.

    ``lengths`` (varlen): ``qkv`` is ``(1, T, H, 3, D)``, the tokens of several sequences
    back to back (``lengths`` of them, summing to ``T``, no padding); each attends within
    itself exactly as it would alone, and every branch and sequence of one segment length
    shares one kernel call (what a packed multi-crop step runs).
    """
    segments, dilations = validate_branches(segments, dilations)
    b, n, h, _three, d = qkv.shape
    if lengths is not None:
        lengths = tuple(int(t) for t in lengths)
        if b != 1 or padding_mask is not None or sum(lengths) != n or min(lengths) < 1:
            raise ValueError(
                f"varlen attention takes one (1, T, H, 3, D) stream with positive lengths "
                f"summing to T and no padding_mask; got shape {tuple(qkv.shape)}, "
                f"{len(lengths)} lengths summing to {sum(lengths)}"
            )
        plan = _plan_varlen(lengths, h, segments, dilations, qkv.device)
    else:
        if padding_mask is not None and not bool(padding_mask.any()):
            padding_mask = None
        if len(segments) == 1 and dilations[0] == 1 and segments[0] >= n:
            return dense_attention(*qkv.unbind(3), padding_mask)
        if exact_grad and b * h * n * n <= SMALL_N_BIAS_ELEMENTS:
            q, k, v = qkv.unbind(3)
            return _dilated_as_biased_dense(q, k, v, segments, dilations, padding_mask)
        plan = _plan(b, n, h, segments, dilations, qkv.device)
    rows = qkv.reshape(b * n * h, 3, d).index_select(0, plan.gather)  # (R, 3, D)
    needs_grad = torch.is_grad_enabled() and qkv.requires_grad
    nb = len(segments)
    if packed_attention_available(qkv.device, needs_grad, exact_grad):
        masks = _key_masks(plan, b, h, padding_mask, qkv.dtype, qkv.device)
        blocks = [
            (start, n_seg, h, rows, mask)
            for (rows, n_seg, start, _), mask in zip(plan.classes, masks)
        ]
        combine = (
            plan.gather,
            plan.rows_of,
            plan.values_of,
            plan.row_slot,
            nb,
            plan.covered,
            plan.pad_weight,
        )
        result = packed_dilated_attention(rows, blocks, combine, exact_grad)
    else:  # one call per class through the general path (manual, surrogate, fallback)
        ok = _row_ok(plan, padding_mask)
        outs, lses = [], []
        for n_rows, n_seg, start, _ in plan.classes:
            size = n_seg * h * n_rows
            qs, ks, vs = (rows[start : start + size, j].view(-1, h, n_rows, d) for j in range(3))
            mask = ok[start : start + size].view(n_seg, h, 1, n_rows)
            out, lse_c = attention_with_lse(qs, ks, vs, mask, exact_grad=exact_grad)
            outs.append(out.reshape(size, d))
            lses.append(lse_c.reshape(size))
        tail = lses[0].new_full((1,), float("-inf"))
        rows_out, lse = torch.cat(outs), torch.cat([*lses, tail])
        result, _ = combine_branches(rows_out, lse, plan.rows_of, plan.values_of, nb, plan.covered)
    result = result.view(b, n, h, d)
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
