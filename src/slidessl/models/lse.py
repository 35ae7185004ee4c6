"""Softmax attention that also returns the log-sum-exp (softmax denominator) per query.

LongNet combines its branches with the log-sum-exp of each branch's scores
(Ding et al., 2023, arXiv:2307.02486). Public ``scaled_dot_product_attention`` does not
return it, so this module calls the fused kernels that do (CPU flash kernel, CUDA flash /
memory-efficient kernels) and falls back to an explicit matmul path elsewhere.

The fused kernels treat the LSE as a constant in backward. With ``exact_grad=True`` the
missing term is restored by a surrogate whose value is the LSE and whose gradient is the
true one: ``d lse_q / d q = scale * sum_j p_qj k_j`` and ``d lse_q / d k_j = scale * p_qj q``,
both obtained from one extra SDPA call with ``V = K``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

__all__ = ["attention_with_lse", "set_backend", "get_backend"]

_MASK_VALUE = -1.0e4  # large enough that exp underflows to 0, finite in fp16/bf16
_BACKEND = {"name": os.environ.get("SLIDESSL_LSE_BACKEND", "auto")}


def set_backend(name: str) -> None:
    """Choose the LSE attention backend: ``"auto"`` (fused where available) or ``"manual"``."""
    if name not in ("auto", "fused", "manual"):
        raise ValueError(f"unknown attention backend {name!r}; use auto, fused or manual")
    _BACKEND["name"] = name


def get_backend() -> str:
    return _BACKEND["name"]


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


def _fused(q, k, v, key_valid, scale):
    if q.device.type == "cpu":
        bias = None if key_valid is None else _bias(key_valid, q.dtype, k.shape[-2])
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
        return out, lse.to(_acc(q.dtype))
    if q.device.type == "cuda":
        length = k.shape[-2]
        if key_valid is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            res = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, False, False, scale=scale
            )
            return res[0], res[1][..., : q.shape[-2]].to(_acc(q.dtype))
        bias = None
        if key_valid is not None:
            bias = _bias(key_valid, q.dtype, length, pad_to=16)
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[-2], length)
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=scale
        )
        return res[0], res[1][..., : q.shape[-2]].to(_acc(q.dtype))
    return None


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
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if exact_grad and needs_grad:
        mask = None if key_valid is None else _bias(key_valid, q.dtype, k.shape[-2])
        pk = F.scaled_dot_product_attention(q.detach(), k.detach(), k, attn_mask=mask, scale=scale)
        t_q = (q * pk.detach()).sum(-1).to(lse.dtype) * scale
        t_k = (q.detach() * pk).sum(-1).to(lse.dtype) * scale
        lse = lse.detach() + (t_q - t_q.detach()) + (t_k - t_k.detach())
    return out, lse
