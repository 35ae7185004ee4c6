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
between torch releases (:mod:`slidessl.models.dilated.kernels` wraps them and holds the
switches). The first call on a device type checks them once (a tiny forward and backward
against the explicit math, :func:`private_kernels_ok`); if they fail, one warning says so
and every later call takes the public path: ``scaled_dot_product_attention`` for the
output, the LSE from query-chunked matmuls, exact gradients through the surrogate term
above (:func:`_surrogate_lse`, the one place it is written). ``SLIDESSL_PRIVATE_KERNELS=0``
forces the public path.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from slidessl.models.dilated.kernels import (
    MASK_VALUE,
    _acc,
    _bias,
    _extra_dim_backward,
    _kernel_backward,
    _kernel_bias,
    _kernel_forward,
    _manual,
    get_backend,
    get_lse_grad,
    lse_grad_mode,
    private_kernels_disabled,
    set_backend,
    set_lse_grad,
)

__all__ = [  # the switches are re-exported: the LSE attention's whole API in one module
    "MASK_VALUE",
    "attention_with_lse",
    "get_backend",
    "get_lse_grad",
    "lse_grad_mode",
    "packed_attention_available",
    "private_kernels_ok",
    "set_backend",
    "set_lse_grad",
]

_PRIVATE_OK: dict[str, bool] = {}  # device type -> the private kernels passed their check
_PUBLIC_LSE_CHUNK = 1024  # query rows per matmul of the public LSE


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


def _surrogate_lse(lse, q, k, mask, scale):
    """``lse`` (a constant) plus a term of value 0 whose gradient is the LSE's true one:
    ``d lse_q / d q = scale * sum_j p_qj k_j`` and ``d lse_q / d k_j = scale * p_qj q``, from
    one extra SDPA call with ``V = K`` (``mask`` the additive key bias or None)."""
    pk = F.scaled_dot_product_attention(q.detach(), k.detach(), k, attn_mask=mask, scale=scale)
    t_q = (q * pk.detach()).sum(-1).to(lse.dtype) * scale
    t_k = (q.detach() * pk).sum(-1).to(lse.dtype) * scale
    return lse.detach() + (t_q - t_q.detach()) + (t_k - t_k.detach())


def _fused(q, k, v, key_valid, scale):
    """``(out, lse)`` from the fused kernels, LSE a constant; None off CPU and CUDA."""
    if q.device.type not in ("cpu", "cuda"):
        return None
    out, lse, _aux = _kernel_forward(q, k, v, _kernel_bias(key_valid, q, k), scale)
    return out, lse[..., : q.shape[-2]].to(_acc(q.dtype))


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
        if private_kernels_disabled():
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


def packed_attention_available(device, needs_grad: bool, exact_grad: bool) -> bool:
    """Whether :func:`packed_dilated_attention` can run here (fused kernels working, the
    ``kernel`` LSE-gradient mode or no exact gradient needed, default backend)."""
    device = torch.device(device)
    if get_backend() == "manual" or device.type not in ("cpu", "cuda"):
        return False
    if not private_kernels_ok(device.type):
        return False
    return not (needs_grad and exact_grad and lse_grad_mode(device) != "kernel")


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
        lse = _surrogate_lse(lse, q, k, mask, scale)
    return out, lse


def attention_with_lse(q, k, v, key_valid=None, exact_grad=True):
    """Attention over ``(B, H, L, D)`` tensors; returns ``(out, lse)``.

    ``key_valid`` is a bool ``(B, H|1, 1, L)`` mask, True = the key may be attended. ``lse``
    is float32 ``(B, H, L)``; rows whose keys are all masked get a finite but meaningless
    value (callers mask them out).
    """
    scale = q.shape[-1] ** -0.5
    if get_backend() == "manual":
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
            if get_backend() == "fused":
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
        if get_backend() == "fused":
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
        lse = _surrogate_lse(lse, q, k, mask, scale)
    return out, lse
