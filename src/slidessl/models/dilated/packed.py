"""LongNet's branch combine on packed rows: every branch and segment of one length in one
fused kernel call, the branch outputs weighted by the softmax of their log-sum-exps (Ding
et al., 2023, arXiv:2307.02486), exact gradients from one backward kernel call per block.
The rows and the combine's indices come from a :class:`~slidessl.models.dilated.plan.Plan`.
"""

from __future__ import annotations

import functools

import torch

from slidessl.models.dilated.kernels import _bias, _kernel_backward, _kernel_forward

__all__ = ["combine_branches", "packed_dilated_attention"]


class _PackedDilated(torch.autograd.Function):
    """Dilated attention on packed rows, from the kernels to the combined output, with
    exact gradients and no LSE-gradient term of its own.

    ``qkv`` (R, 3, D) holds the rows of every block back to back; block ``i`` is ``(start,
    batch, heads, rows, bias)``. ``plan`` (a :class:`~slidessl.models.dilated.plan.Plan`)
    holds the combine's indices: output position ``p`` (a token and head) is ``sum_i w_pi
    out[rows_of[p, i]]`` with ``w_p = softmax_i(lse[rows_of[p, i]])`` (the LongNet combine;
    ``rows_of = R`` reads an appended ``-inf``: weight 0).

    Forward: one fused kernel call per block, the weights and values gathered, one batched
    matmul. Backward, exact: a row's output gradient is ``dO_r = w_r dR_p`` and, through
    the weights, its LSE gradient is ``g_r = dO_r . (out_r - R_p)``; the fused backward
    kernels compute ``D_r = dO_r . out_r`` from the ``out`` they are given, and the exact
    score gradient needs ``D_r - g_r = dO_r . R_p``, so each block's backward call is given
    the *combined* output ``R_p`` of its rows in place of its own ``out``: one kernel call
    per block, no correction term, and ``out`` need not be kept. ``exact=False`` (the LSE a
    constant, as torchscale) gives the kernels their own ``out`` instead.
    """

    @staticmethod
    def forward(ctx, qkv, blocks, scale, plan, exact):
        d = qkv.shape[-1]
        outs, lses, raws, auxes = [], [], [], []
        for start, bs, h, rows, bias in blocks:
            size = bs * h * rows
            sl = slice(start, start + size)
            q, k, v = (_rows(qkv[:, j], sl, bs, h, rows, d) for j in range(3))
            out, lse, aux = _kernel_forward(q, k, v, bias, scale)
            outs.append(out.reshape(size, d))
            lses.append(lse[..., :rows].reshape(size))
            raws.append(lse)
            auxes.append(aux)
        lses.append(_constant(float("-inf"), lses[0].dtype, lses[0].device))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        lse = torch.cat(lses)
        result, weight = combine_branches(out, lse, plan)
        result = result.view(-1, d)
        kept = result if exact else out
        ctx.save_for_backward(qkv, kept, weight, *raws)
        ctx.blocks, ctx.auxes, ctx.scale, ctx.exact = blocks, auxes, scale, exact
        ctx.gather, ctx.row_slot, ctx.pad_weight = plan.gather, plan.row_slot, plan.pad_weight
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_result):
        qkv, kept, weight, *raws = ctx.saved_tensors
        d = qkv.shape[-1]
        # dO of every row: its position's output gradient times its weight (0 at padding)
        flat = weight.view(-1)
        if ctx.pad_weight:  # every slot holds a row: padding rows read an appended zero
            flat = torch.cat([flat, _constant(0.0, flat.dtype, flat.device)])
        w_rows = flat.index_select(0, ctx.row_slot)
        d_rows = d_result.index_select(0, ctx.gather) * w_rows.unsqueeze(-1)
        o_rows = kept.index_select(0, ctx.gather) if ctx.exact else kept
        sizes = sum(bs * h * rows for _, bs, h, rows, _ in ctx.blocks)
        d_qkv = torch.empty_like(qkv) if sizes == qkv.shape[0] else torch.zeros_like(qkv)
        for (start, bs, h, rows, bias), lse, aux in zip(ctx.blocks, raws, ctx.auxes):
            size = bs * h * rows
            sl = slice(start, start + size)
            q, k, v = (_rows(qkv[:, j], sl, bs, h, rows, d) for j in range(3))
            do, o = (_rows(t, sl, bs, h, rows, d) for t in (d_rows, o_rows))
            dq, dk, dv = _kernel_backward(do, q, k, v, bias, o, lse, aux, ctx.scale)
            # each block's gradients straight into their rows of one (R, 3, D) buffer
            torch.stack([t.reshape(size, d) for t in (dq, dk, dv)], dim=1, out=d_qkv[sl])
        return d_qkv, None, None, None, None


@functools.cache
def _constant(value: float, dtype, device) -> torch.Tensor:
    """A cached one-element tensor (no allocation or fill per call)."""
    return torch.full((1,), value, dtype=dtype, device=device)


def _rows(t, sl, bs, h, rows, d):
    """Rows ``sl`` of an (R, D) tensor (a q, k or v column of the packed rows, or a row
    gradient) as ``(bs, H, L, D)``: a strided view on the CPU (its kernels read strides),
    contiguous on CUDA."""
    view = t[sl].view(bs, h, rows, d)
    return view if t.device.type == "cpu" else view.contiguous()


def combine_branches(out, lse, plan):
    """The LongNet combine ``(T * H, 1, D)``: each (token, head) gathers its
    ``plan.branches`` branch rows of ``out`` (R, D) and weights them by the softmax of their
    ``lse`` (R + 1,); ``plan.rows_of`` points a branch that does not keep the position at
    the final ``-inf`` (weight exactly 0; ``plan.values_of`` reads row 0 there). Also
    returns the weights."""
    nb = plan.branches
    weight = lse.index_select(0, plan.rows_of).view(-1, 1, nb).softmax(-1)
    if not plan.covered:  # a (token, head) that no branch sees: all -inf, output 0
        weight = weight.nan_to_num(0.0)
    if weight.dtype != out.dtype:
        weight = weight.to(out.dtype)
    values = out.index_select(0, plan.values_of).view(-1, nb, out.shape[-1])
    return torch.bmm(weight, values), weight


def _is_bool(mask) -> bool:
    return mask is not None and mask.dtype == torch.bool


def packed_dilated_attention(qkv, blocks, plan, exact_grad=True):
    """Dilated attention ``(T * H, D)`` from packed rows ``qkv`` (R, 3, D): attention inside
    each block ``(start, batch, heads, rows, mask)`` of rows (``mask`` a ``(batch, heads,
    1, rows)`` bool key mask, True = attend, an additive float bias of that shape,
    ``MASK_VALUE`` = masked, or None), then the LSE-weighted combine of ``plan`` (see
    ``_PackedDilated``). ``exact_grad=False``: the LSE is a constant in backward (as
    torchscale)."""
    d = qkv.shape[-1]
    scale = d**-0.5
    if not qkv.is_contiguous():
        qkv = qkv.contiguous()
    pad_to = 1 if qkv.device.type == "cpu" else 16
    kernel_blocks = [
        (start, bs, h, rows, _bias(mask, qkv.dtype, rows, pad_to) if _is_bool(mask) else mask)
        for start, bs, h, rows, mask in blocks
    ]
    return _PackedDilated.apply(qkv, kernel_blocks, scale, plan, bool(exact_grad))
