"""Dense and dilated (LongNet) self-attention with key-padding masks.

Dilated attention follows LongNet (Ding et al., 2023, "LongNet: Scaling Transformers to
1,000,000,000 Tokens", arXiv:2307.02486) as implemented in microsoft/torchscale: for each
branch ``(w, r)`` the spatially ordered sequence is cut into segments of ``w`` tokens (one
segment when ``w >= N``); inside a segment head group ``j`` keeps the positions whose offset
``t`` satisfies ``t % r == j``; attention runs inside each sparse segment; the branch outputs
are combined per position and head with weights ``softmax_i(lse_i)``, the softmax
denominators. Unlike the published code, a partial last segment and padded slides are
*masked*: no padded key ever receives softmax mass.

The pieces live in :mod:`slidessl.models.dilated`: ``plan`` (the rows of every branch,
cached per shape), ``kernels`` (the fused kernels and the backend switches), ``lse``
(attention with its log-sum-exp and exact gradients), ``packed`` (every branch in one
autograd function, combined by LSE). This module dispatches between them.

Tensors use the layout ``(B, N, H, D)`` (the natural view of a linear projection); the
``padding_mask`` is ``(B, N)`` bool with True = padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slidessl.models.dilated.kernels import MASK_VALUE
from slidessl.models.dilated.lse import attention_with_lse, packed_attention_available
from slidessl.models.dilated.packed import combine_branches, packed_dilated_attention
from slidessl.models.dilated.plan import (
    multiplicity_bias,
    padded_plan,
    validate_branches,
    varlen_plan,
)

__all__ = [
    "dense_attention",
    "dilated_attention",
    "dilated_attention_qkv",
]

# below this many (batch x heads x N x N) mask elements, dilated attention runs as ONE fused
# SDPA call with a multiplicity bias (exact, see `multiplicity_bias`): far fewer kernels
SMALL_N_BIAS_ELEMENTS = 2**24


def _dilated_as_biased_dense(q, k, v, segments, dilations, padding_mask):
    b, n, h, d = q.shape
    bias, covered = multiplicity_bias(n, h, segments, dilations, q.device, q.dtype)
    mask = bias[None]
    if padding_mask is not None:
        mask = mask.masked_fill(padding_mask[:, None, None, :], MASK_VALUE)
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
        plan = varlen_plan(lengths, h, segments, dilations, qkv.device)
    else:
        if padding_mask is not None and not bool(padding_mask.any()):
            padding_mask = None
        if len(segments) == 1 and dilations[0] == 1 and segments[0] >= n:
            return dense_attention(*qkv.unbind(3), padding_mask)
        if exact_grad and b * h * n * n <= SMALL_N_BIAS_ELEMENTS:
            q, k, v = qkv.unbind(3)
            return _dilated_as_biased_dense(q, k, v, segments, dilations, padding_mask)
        plan = padded_plan(b, n, h, segments, dilations, qkv.device)
    rows = qkv.reshape(b * n * h, 3, d).index_select(0, plan.gather)  # (R, 3, D)
    needs_grad = torch.is_grad_enabled() and qkv.requires_grad
    if packed_attention_available(qkv.device, needs_grad, exact_grad):
        masks = _key_masks(plan, b, h, padding_mask, qkv.dtype, qkv.device)
        blocks = [
            (start, n_seg, h, rows, mask)
            for (rows, n_seg, start, _), mask in zip(plan.classes, masks)
        ]
        result = packed_dilated_attention(rows, blocks, plan, exact_grad)
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
        result, _ = combine_branches(rows_out, lse, plan)
    result = result.view(b, n, h, d)
    if padding_mask is not None:
        result = result.masked_fill(padding_mask[:, :, None, None], 0.0)
    return result
