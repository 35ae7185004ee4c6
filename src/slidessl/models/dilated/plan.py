"""Where dilated attention's rows come from: the branch layout of LongNet (Ding et al.,
2023, arXiv:2307.02486) turned into index tensors, computed once per shape and cached.

For each branch ``(w, r)`` the spatially ordered sequence is cut into segments of ``w``
tokens (one segment when ``w >= N``; the partial last segment runs as a segment of its own
length); inside a segment head group ``j`` keeps the positions whose offset ``t`` satisfies
``t % r == j``. A :class:`Plan` lists every kept (position, head) of every branch as one
row, grouped by segment length so that each group is one attention call, and the indices
that combine the branch outputs back into positions. :func:`multiplicity_bias` is the same
layout as one dense additive bias (the small-N path).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from slidessl.models.dilated.kernels import MASK_VALUE

__all__ = [
    "Plan",
    "attention_flops",
    "branch_layout",
    "multiplicity_bias",
    "padded_plan",
    "validate_branches",
    "varlen_plan",
]

# a class of rows is padded into the next longer one when that adds at most this fraction
# of the call's attention FLOPs: one kernel call fewer for a few masked keys
MERGE_FRACTION = 0.05


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
    return _multiplicity_bias(n, heads, tuple(segments), tuple(dilations), device, dtype)


@functools.lru_cache(maxsize=4)  # each up to SMALL_N_BIAS_ELEMENTS: 64 MiB in float32
def _multiplicity_bias(n, heads, segments, dilations, device, dtype):
    pos = torch.arange(n, device=device)
    count = torch.zeros(heads, n, n, dtype=torch.int16, device=device)
    for segment, r in zip(segments, dilations):
        w = min(segment, n)
        same = (pos // w)[:, None] == (pos // w)[None, :]
        group = _head_group(heads, r, device)  # (H,)
        sel = (pos % w)[None, :] % r == group[:, None]  # (H, N)
        count += (same[None] & sel[:, :, None] & sel[:, None, :]).to(torch.int16)
    covered = count.diagonal(dim1=1, dim2=2) > 0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bias = torch.where(count > 0, count.to(acc).log(), MASK_VALUE).to(dtype)
    return bias, covered


def _pieces(n: int, segment: int) -> list[tuple[int, int, int]]:
    """Split one branch into ``(start, stop, segment)`` pieces: the whole segments (views,
    no padding) and the partial last segment, run as one segment of its own length."""
    w = min(segment, n)
    full = (n // w) * w
    pieces = [(0, full, w)] if full else []
    if full < n:
        pieces.append((full, n, n - full))
    return pieces


class Plan(NamedTuple):
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
    branches: int  # nb: the number of branches
    biases: dict  # dtype -> (R,) additive key bias of the padding rows (cached)


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


@functools.lru_cache(maxsize=256)
def _length_pieces(n: int, h: int, segments, dilations) -> dict:
    """Rows of one sequence of ``n`` tokens: ``{L: [(branch, pos (S, H, L), ok)]}``,
    positions relative to the sequence start (cached per length)."""
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
    return per_class


@functools.lru_cache(maxsize=64)
def _build_plan(seqs, h, segments, dilations, device) -> Plan:
    """``seqs``: ``((offset, n), ...)``, each sequence's first token and length in a
    stream of ``T = offset + n`` (of the last) tokens; ``segments``, ``dilations`` tuples."""
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
    return Plan(
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
        nb,
        {},
    )


def padded_plan(b, n, h, segments, dilations, device) -> Plan:
    """The plan of a padded ``(B, N)`` batch (every row a sequence of ``N`` tokens)."""
    seqs = tuple((bi * n, n) for bi in range(b))
    return _build_plan(seqs, h, tuple(segments), tuple(dilations), device)


def varlen_plan(lengths, h, segments, dilations, device) -> Plan:
    """The plan of a packed stream of sequences of ``lengths`` tokens, back to back."""
    offsets = [0]
    for n in lengths[:-1]:
        offsets.append(offsets[-1] + n)
    return _build_plan(tuple(zip(offsets, lengths)), h, tuple(segments), tuple(dilations), device)


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
