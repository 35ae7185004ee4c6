"""The fused attention kernels that return the log-sum-exp, and the switches that route
every attention call (one place, as timm's ``use_fused_attn``).

Public ``scaled_dot_product_attention`` does not return the LSE LongNet's branch combine
needs, so slidessl calls the private aten kernels that do (CPU flash kernel, CUDA flash /
memory-efficient kernels): :func:`_kernel_forward` / :func:`_kernel_backward` wrap them,
and :func:`_manual` is the explicit matmul math they are checked against. Their signatures
change between torch releases; :func:`slidessl.models.dilated.lse.private_kernels_ok`
checks them once per device type.

Switches (environment variable, then the setter; read at every call):

- ``SLIDESSL_LSE_BACKEND`` / :func:`set_backend`: ``auto`` (fused where available, falling
  back with a warning), ``fused`` (fused or raise), ``manual`` (explicit matmuls).
- ``SLIDESSL_LSE_GRAD`` / :func:`set_lse_grad`: how exact LSE gradients are computed,
  ``auto`` (``kernel`` on the CPU, ``surrogate`` on CUDA), ``kernel`` or ``surrogate``
  (see :mod:`slidessl.models.dilated.lse`).
- ``SLIDESSL_PRIVATE_KERNELS=0`` (:func:`private_kernels_disabled`): never call the private
  kernels; every call takes the public path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = [
    "MASK_VALUE",
    "get_backend",
    "get_lse_grad",
    "lse_grad_mode",
    "private_kernels_disabled",
    "set_backend",
    "set_lse_grad",
]

MASK_VALUE = -1.0e4  # exp underflows to 0; finite in fp16/bf16
_BACKEND = {"name": os.environ.get("SLIDESSL_LSE_BACKEND", "auto")}
_LSE_GRAD = {"name": os.environ.get("SLIDESSL_LSE_GRAD", "auto")}
_LSE_GRAD_MODES = ("auto", "kernel", "surrogate")


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


def private_kernels_disabled() -> bool:
    """``SLIDESSL_PRIVATE_KERNELS=0``: the private fused kernels are never called."""
    return os.environ.get("SLIDESSL_PRIVATE_KERNELS", "1") == "0"


def _bias(key_valid, dtype, seq_len, pad_to=1):
    """Additive ``(B, H|1, 1, L)`` bias from a bool key mask (True = attend)."""
    lp = -(-seq_len // pad_to) * pad_to
    bias = torch.zeros(key_valid.shape[:-1] + (lp,), dtype=dtype, device=key_valid.device)
    bias[..., :seq_len].masked_fill_(~key_valid, MASK_VALUE)
    return bias[..., :seq_len]


def _acc(dtype):
    """Accumulation dtype for the LSE: float64 stays float64, the rest go to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _manual(q, k, v, key_valid, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid, MASK_VALUE)
    scores = scores.to(_acc(q.dtype))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)
    return torch.matmul(probs, v), lse


def _kernel_bias(key_valid, q, k):
    """The additive key mask the fused kernels take (CUDA's needs a 16-aligned row)."""
    if key_valid is None:
        return None
    return _bias(key_valid, q.dtype, k.shape[-2], pad_to=1 if q.device.type == "cpu" else 16)


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
