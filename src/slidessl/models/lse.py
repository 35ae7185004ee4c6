"""Softmax attention that also returns the log-sum-exp (softmax denominator) per query.

LongNet combines its branches with the log-sum-exp of each branch's scores
(Ding et al., 2023, arXiv:2307.02486). Public ``scaled_dot_product_attention`` does not
return it, so this module calls the fused kernels that do (CPU flash kernel, CUDA flash /
memory-efficient kernels) and falls back to an explicit matmul path elsewhere.

The fused kernels treat the LSE as a constant in backward. ``exact_grad=True`` restores the
missing term in one of two ways (``set_lse_grad``):

- ``kernel`` (default on the CPU): an autograd function that calls the fused backward
  kernel itself with a corrected softmax-backward term. With ``g = dL/dlse`` the score
  gradient is ``dS_qj = p_qj (dO_q . v_j - D_q + g_q)``; the kernels compute
  ``D_q = dO_q . O_q`` from the ``out`` they are given, so passing
  ``O'_q = O_q - g_q dO_q / |dO_q|^2`` (or, where ``dO_q = 0``, an extra zero head
  dimension carrying ``-g``) makes one backward call exact: no extra forward, no extra
  backward.
- ``surrogate`` (default on CUDA until ``benchmarks/gpu_check.sh`` has verified the kernel
  path there): a term whose value is the LSE and whose gradient is the true one,
  ``d lse_q / d q = scale * sum_j p_qj k_j`` and ``d lse_q / d k_j = scale * p_qj q``,
  from one extra SDPA call with ``V = K``.

The fused kernels that return the LSE are private aten operators whose signatures change
between torch releases. The first call on a device type checks them once (a tiny forward
and backward against the explicit math, :func:`private_kernels_ok`); if they fail, one
warning says so and every later call takes the public path: ``scaled_dot_product_attention``
for the output, the LSE from query-chunked matmuls, exact gradients through the surrogate
term above. ``SLIDESSL_PRIVATE_KERNELS=0`` forces the public path.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "MASK_VALUE",
    "attention_with_lse",
    "combine_branches",
    "get_backend",
    "get_lse_grad",
    "lse_grad_mode",
    "packed_attention_available",
    "packed_dilated_attention",
    "private_kernels_ok",
    "set_backend",
    "set_lse_grad",
]

MASK_VALUE = _MASK_VALUE = -1.0e4  # exp underflows to 0; finite in fp16/bf16
_BACKEND = {"name": os.environ.get("SLIDESSL_LSE_BACKEND", "auto")}
_LSE_GRAD = {"name": os.environ.get("SLIDESSL_LSE_GRAD", "auto")}
_LSE_GRAD_MODES = ("auto", "kernel", "surrogate")
_PRIVATE_OK: dict[str, bool] = {}  # device type -> the private kernels passed their check
_PUBLIC_LSE_CHUNK = 1024  # query rows per matmul of the public LSE


def set_backend(name: str) -> None:
    """Choose the LSE attention backend: ``"auto"`` (fused where available) or ``"manual"``."""
    if name not in ("auto", "fused", "manual"):
        raise ValueError(f"unknown attention backend {name!r}; use auto, fused or manual")
    _BACKEND["name"] = name


def get_backend() -> str:
    return _BACKEND["name"]


def set_lse_grad(name: str) -> None:
    """How exact LSE gradients are computed: ``"auto"`` (``kernel`` on the CPU,
    ``surrogate`` on CUDA), ``"kernel"`` or ``"surrogate"``; see the module docstring."""
    if name not in _LSE_GRAD_MODES:
        raise ValueError(f"unknown LSE gradient mode {name!r}; use one of {_LSE_GRAD_MODES}")
    _LSE_GRAD["name"] = name


def get_lse_grad() -> str:
    return _LSE_GRAD["name"]


def lse_grad_mode(device) -> str:
    """The LSE-gradient mode in effect on ``device`` (``auto`` resolved)."""
    name = _LSE_GRAD["name"]
    if name == "auto":
        return "kernel" if device.type == "cpu" else "surrogate"
    return name


def _bias(key_valid, dtype, seq_len, pad_to=1):
    """Additive ``(B, H|1, 1, L)`` bias from a bool key mask (True = attend)."""
    lp = -(-seq_len // pad_to) * pad_to
    bias = torch.zeros(key_valid.shape[:-1] + (lp,), dtype=dtype, device=key_valid.device)
    bias[..., :seq_len].masked_fill_(~key_valid, _MASK_VALUE)
    return bias[..., :seq_len]


def _acc(dtype):
    """Accumulation dtype for the LSE: float64 stays float64, the rest go to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _manual(q, k, v, key_valid, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid, _MASK_VALUE)
    scores = scores.to(_acc(q.dtype))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)
    return torch.matmul(probs, v), lse


def _kernel_bias(key_valid, q, k):
    """The additive key mask the fused kernels take (CUDA's needs a 16-aligned row)."""
    if key_valid is None:
        return None
    return _bias(key_valid, q.dtype, k.shape[-2], pad_to=1 if q.device.type == "cpu" else 16)


def _fused(q, k, v, key_valid, scale):
    """``(out, lse)`` from the fused kernels, LSE a constant; None off CPU and CUDA."""
    if q.device.type not in ("cpu", "cuda"):
        return None
    out, lse, _aux = _kernel_forward(q, k, v, _kernel_bias(key_valid, q, k), scale)
    return out, lse[..., : q.shape[-2]].to(_acc(q.dtype))


def _kernel_forward(q, k, v, bias, scale):
    """Fused forward that also returns what its backward kernel needs: ``(out, lse, aux)``."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
        return out, lse, None
    if bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )
        return res[0], res[1], ("flash",) + tuple(res[2:8])
    full = None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[-2], -1)
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, full, True, 0.0, False, scale=scale
    )
    return res[0], res[1], ("efficient", full, res[2], res[3])


def _kernel_backward(d_out, q, k, v, bias, out, lse, aux, scale):
    if aux is None:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            d_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
        )
    if aux[0] == "flash":
        cum_q, cum_k, max_q, max_k, seed, offset = aux[1:]
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            d_out,
            q,
            k,
            v,
            out,
            lse,
            cum_q,
            cum_k,
            max_q,
            max_k,
            0.0,
            False,
            seed,
            offset,
            scale=scale,
        )
    _, full, seed, offset = aux
    res = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        d_out,
        q,
        k,
        v,
        full,
        out,
        lse,
        seed,
        offset,
        0.0,
        [True, True, True, False],
        False,
        scale=scale,
    )
    return res[:3]


class _KernelLse(torch.autograd.Function):
    """Fused attention returning ``(out, lse)`` with exact gradients through both, from ONE
    call of the fused backward kernel (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        out, lse, aux = _kernel_forward(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.aux, ctx.scale = aux, scale
        return out, lse[..., : q.shape[-2]].to(_acc(q.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_lse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        aux, scale = ctx.aux, ctx.scale
        if d_out is None:
            d_out = torch.zeros_like(out)
        d_out = d_out.contiguous() if q.device.type != "cpu" else d_out
        if d_lse is None:
            dq, dk, dv = _kernel_backward(d_out, q, k, v, bias, out, lse, aux, scale)
            return dq, dk, dv, None, None
        acc = _acc(q.dtype)
        g = d_lse.to(acc)
        if q.device.type == "cpu":
            norm2 = d_out.to(acc).square().sum(-1)
            shift = torch.where(norm2 > 1e-30, g / norm2.clamp_min(1e-30), 0.0)
            if not bool(((norm2 <= 1e-30) & (g != 0)).any()):
                out_c = out - (shift.unsqueeze(-1) * d_out.to(acc)).to(out.dtype)
                dq, dk, dv = _kernel_backward(d_out, q, k, v, bias, out_c, lse, aux, scale)
                return dq, dk, dv, None, None
        dq, dk, dv = _extra_dim_backward(d_out, q, k, v, bias, out, lse, aux, scale, g)
        return dq, dk, dv, None, None


def _extra_dim_backward(d_out, q, k, v, bias, out, lse, aux, scale, g):
    """Exact everywhere: extra zero head dims (8 for the CUDA kernels' alignment); the first
    carries dO = 1 and O = -g, so D_q = dO_q . O_q - g_q; scores are unchanged."""
    d = q.shape[-1]
    extra = 1 if q.device.type == "cpu" else 8
    q2, k2, v2, o2, do2 = (F.pad(t, (0, extra)) for t in (q, k, v, out, d_out))
    o2[..., d] = -g.to(out.dtype)
    do2[..., d] = 1.0
    dq, dk, dv = _kernel_backward(do2, q2, k2, v2, bias, o2, lse, aux, scale)
    return dq[..., :d], dk[..., :d], dv[..., :d]


class _PackedDilated(torch.autograd.Function):
    """Dilated attention on packed rows, from the kernels to the combined output, with
    exact gradients and no LSE-gradient term of its own.

    ``qkv`` (R, 3, D) holds the rows of every block back to back; block ``i`` is ``(start,
    batch, heads, rows, bias)``. ``combine = (gather, rows_of, values_of, row_slot, nb,
    covered, pad_weight)`` (the plan's indices, ``attention._Plan``): output position ``p``
    (a token and head) is ``sum_i w_pi out[rows_of[p, i]]`` with ``w_p =
    softmax_i(lse[rows_of[p, i]])`` (the LongNet combine; ``rows_of = R`` reads an appended
    ``-inf``: weight 0).

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
    def forward(ctx, qkv, blocks, scale, combine, exact):
        gather, rows_of, values_of, row_slot, nb, covered, pad_weight = combine
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
        result, weight = combine_branches(out, lse, rows_of, values_of, nb, covered)
        result = result.view(-1, d)
        kept = result if exact else out
        ctx.save_for_backward(qkv, kept, weight, *raws)
        ctx.blocks, ctx.auxes, ctx.scale, ctx.exact = blocks, auxes, scale, exact
        ctx.gather, ctx.row_slot, ctx.pad_weight = gather, row_slot, pad_weight
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


_CONSTANTS: dict = {}


def _constant(value: float, dtype, device) -> torch.Tensor:
    """A cached one-element tensor (no allocation or fill per call)."""
    key = (value, dtype, str(device))
    hit = _CONSTANTS.get(key)
    if hit is None:
        hit = _CONSTANTS[key] = torch.full((1,), value, dtype=dtype, device=device)
    return hit


def _rows(t, sl, bs, h, rows, d):
    """Rows ``sl`` of an (R, D) tensor (a q, k or v column of the packed rows, or a row
    gradient) as ``(bs, H, L, D)``: a strided view on the CPU (its kernels read strides),
    contiguous on CUDA."""
    view = t[sl].view(bs, h, rows, d)
    return view if t.device.type == "cpu" else view.contiguous()


def combine_branches(out, lse, rows_of, values_of, nb, covered):
    """The LongNet combine ``(T * H, 1, D)``: each (token, head) gathers its ``nb`` branch
    rows of ``out`` (R, D) and weights them by the softmax of their ``lse`` (R + 1,);
    ``rows_of`` points a branch that does not keep the position at the final ``-inf``
    (weight exactly 0; ``values_of`` reads row 0 there). Also returns the weights."""
    weight = lse.index_select(0, rows_of).view(-1, 1, nb).softmax(-1)
    if not covered:  # a (token, head) that no branch sees: all -inf, output 0
        weight = weight.nan_to_num(0.0)
    if weight.dtype != out.dtype:
        weight = weight.to(out.dtype)
    return torch.bmm(weight, out.index_select(0, values_of).view(-1, nb, out.shape[-1])), weight


def packed_attention_available(device, needs_grad: bool, exact_grad: bool) -> bool:
    """Whether :func:`packed_dilated_attention` can run here (fused kernels working, the
    ``kernel`` LSE-gradient mode or no exact gradient needed, default backend)."""
    device = torch.device(device)
    if _BACKEND["name"] == "manual" or device.type not in ("cpu", "cuda"):
        return False
    if not private_kernels_ok(device.type):
        return False
    return not (needs_grad and exact_grad and lse_grad_mode(device) != "kernel")


def _is_bool(mask) -> bool:
    return mask is not None and mask.dtype == torch.bool


def packed_dilated_attention(qkv, blocks, combine, exact_grad=True):
    """Dilated attention ``(T * H, D)`` from packed rows ``qkv`` (R, 3, D): attention inside
    each block ``(start, batch, heads, rows, mask)`` of rows (``mask`` a ``(batch, heads,
    1, rows)`` bool key mask, True = attend, an additive float bias of that shape,
    ``MASK_VALUE`` = masked, or None), then the LSE-weighted combine of ``combine`` (see
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
    return _PackedDilated.apply(qkv, kernel_blocks, scale, combine, bool(exact_grad))


def _check_private(device_type: str) -> None:
    """Raise unless the private kernels run and match the explicit math on a tiny input."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 9, 8, generator=gen).to(device_type).requires_grad_() for _ in range(3)
    )
    valid = torch.ones(1, 1, 1, 9, dtype=torch.bool, device=device_type)
    valid[..., -2:] = False
    scale = 8**-0.5
    # float32 whatever autocast the first call runs under (bf16 math would fail the match)
    with torch.enable_grad(), torch.autocast(device_type, enabled=False):
        out, lse = _KernelLse.apply(q, k, v, _kernel_bias(valid, q, k), scale)
        grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
        ref_out, ref_lse = _manual(q, k, v, valid, scale)
        ref = torch.autograd.grad(ref_out.sum() + ref_lse.sum(), (q, k, v))
    for got, want in zip((out, lse, *grads), (ref_out, ref_lse, *ref)):
        if not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-4):
            raise RuntimeError("results differ from the explicit attention math")


def private_kernels_ok(device_type: str) -> bool:
    """Whether the private fused kernels work on this torch and device type (checked once
    per process; a failure warns once and routes every later call to the public path)."""
    if device_type not in _PRIVATE_OK:
        if os.environ.get("SLIDESSL_PRIVATE_KERNELS", "1") == "0":
            _PRIVATE_OK[device_type] = False
            return False
        try:
            _check_private(device_type)
            _PRIVATE_OK[device_type] = True
        except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
            _PRIVATE_OK[device_type] = False
            warnings.warn(
                f"torch {torch.__version__}: the private fused attention kernels slidessl "
                f"uses for the exact LSE do not work on {device_type} ({type(exc).__name__}: "
                f"{exc}); using public scaled_dot_product_attention (exact, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
    return _PRIVATE_OK[device_type]


def _public(q, k, v, key_valid, scale, exact_grad, needs_grad):
    """Public-API ``(out, lse)``: SDPA for ``out``; the LSE from query-chunked matmuls (no
    autograd graph of the scores), with the exact gradient from the surrogate term."""
    mask = None if key_valid is None else _bias(key_valid, q.dtype, k.shape[-2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    acc = _acc(q.dtype)
    with torch.no_grad():
        parts = []
        for lo in range(0, q.shape[-2], _PUBLIC_LSE_CHUNK):
            scores = torch.matmul(q[..., lo : lo + _PUBLIC_LSE_CHUNK, :], k.transpose(-1, -2))
            scores = scores.to(acc).mul_(scale)
            if mask is not None:
                scores = scores + mask.to(acc)
            parts.append(torch.logsumexp(scores, dim=-1))
        lse = torch.cat(parts, dim=-1)
    if exact_grad and needs_grad:
        pk = F.scaled_dot_product_attention(q.detach(), k.detach(), k, attn_mask=mask, scale=scale)
        t_q = (q * pk.detach()).sum(-1).to(acc) * scale
        t_k = (q.detach() * pk).sum(-1).to(acc) * scale
        lse = lse + (t_q - t_q.detach()) + (t_k - t_k.detach())
    return out, lse


def attention_with_lse(q, k, v, key_valid=None, exact_grad=True):
    """Attention over ``(B, H, L, D)`` tensors; returns ``(out, lse)``.

    ``key_valid`` is a bool ``(B, H|1, 1, L)`` mask, True = the key may be attended. ``lse``
    is float32 ``(B, H, L)``; rows whose keys are all masked get a finite but meaningless
    value (callers mask them out).
    """
    scale = q.shape[-1] ** -0.5
    if _BACKEND["name"] == "manual":
        return _manual(q, k, v, key_valid, scale)
    if q.device.type != "cpu":  # the CPU kernel reads strided inputs; keep CUDA conservative
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if q.device.type in ("cpu", "cuda") and not private_kernels_ok(q.device.type):
        return _public(q, k, v, key_valid, scale, exact_grad, needs_grad)
    if (
        exact_grad
        and needs_grad
        and q.device.type in ("cpu", "cuda")
        and lse_grad_mode(q.device) == "kernel"
    ):
        try:
            return _KernelLse.apply(q, k, v, _kernel_bias(key_valid, q, k), scale)
        except RuntimeError as exc:
            if _BACKEND["name"] == "fused":
                raise
            warnings.warn(
                f"fused attention with exact LSE gradients failed on {q.device} ({exc}); "
                "using the surrogate path",
                RuntimeWarning,
                stacklevel=2,
            )
    res = None
    try:
        res = _fused(q, k, v, key_valid, scale)
    except RuntimeError as exc:
        if _BACKEND["name"] == "fused":
            raise
        warnings.warn(
            f"fused attention with LSE failed on {q.device} ({exc}); using the "
            "explicit matmul path",
            RuntimeWarning,
            stacklevel=2,
        )
    if res is None:
        return _manual(q, k, v, key_valid, scale)
    out, lse = res
    if exact_grad and needs_grad:
        mask = None if key_valid is None else _bias(key_valid, q.dtype, k.shape[-2])
        pk = F.scaled_dot_product_attention(q.detach(), k.detach(), k, attn_mask=mask, scale=scale)
        t_q = (q * pk.detach()).sum(-1).to(lse.dtype) * scale
        t_k = (q.detach() * pk).sum(-1).to(lse.dtype) * scale
        lse = lse.detach() + (t_q - t_q.detach()) + (t_k - t_k.detach())
    return out, lse
