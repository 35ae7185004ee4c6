"""2-D ALiBi: a per-head attention bias linear in the grid distance between two tiles.

ALiBi (Press et al., 2022, "Train Short, Test Long", ICLR) adds ``-m_h * |i - j|`` to the
attention scores of head ``h``; TITAN (Ding et al., 2024, "Multimodal Whole Slide
Foundation Model for Pathology") uses the Euclidean distance between 2-D tile positions, so
an encoder trained on region crops extrapolates to whole slides. Slopes are ALiBi's
geometric sequence ``m_h = 2^(-8 (h + 1) / H)``: every head a different reach. The bias is
translation-invariant and needs no position table; the CLS token has no position (bias 0 to
and from it).

The bias is computed per block of queries (``chunk`` rows at a time) and never as an
N x N x H tensor for the whole sequence; padded keys are masked.

Example::

    out = alibi_attention(q, k, v, coords, alibi_slopes(4))  # q (B, 1 + N, H, D), CLS first
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["alibi_attention", "alibi_bias", "alibi_slopes"]

CHUNK = 1024


def alibi_slopes(heads: int) -> torch.Tensor:
    """``(H,)`` ALiBi slopes ``2^(-8 (h + 1) / H)``."""
    return torch.pow(2.0, -8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)


def alibi_bias(q_pos, k_pos, slopes, q_cls, k_cls, dtype=torch.float32) -> torch.Tensor:
    """``(B, H, Lq, Lk)`` bias ``-slope_h * ||q_pos - k_pos||``, 0 where either side is a CLS
    (``q_cls`` (B|1, Lq), ``k_cls`` (B|1, Lk) bool), computed in float64, returned in
    ``dtype`` (the attention's)."""
    dist = torch.cdist(q_pos.double(), k_pos.double())  # (B, Lq, Lk)
    dist = dist.masked_fill(q_cls[:, :, None] | k_cls[:, None, :], 0.0)
    return (-slopes.to(dist)[None, :, None, None] * dist[:, None]).to(dtype)


def alibi_attention(q, k, v, coords, slopes, padding_mask=None, chunk: int = CHUNK):
    """Dense attention of ``q, k, v`` ``(B, 1 + N, H, D)`` (CLS first) with the 2-D ALiBi bias
    of ``coords`` ``(B, N, 2)`` grid positions; ``padding_mask`` ``(B, 1 + N)`` True = pad."""
    b, n1, h, d = q.shape
    pos = torch.cat([coords.new_zeros(b, 1, 2), coords], dim=1).double()
    is_cls = torch.zeros(1, n1, dtype=torch.bool, device=q.device)
    is_cls[0, 0] = True
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = []
    for s in range(0, n1, chunk):
        bias = alibi_bias(
            pos[:, s : s + chunk], pos, slopes, is_cls[:, s : s + chunk], is_cls, q.dtype
        )
        if padding_mask is not None:
            bias = bias.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        out.append(F.scaled_dot_product_attention(qh[:, :, s : s + chunk], kh, vh, attn_mask=bias))
    out = torch.cat(out, dim=2).transpose(1, 2)
    if padding_mask is not None:
        out = out.masked_fill(padding_mask[:, :, None, None], 0.0)
    return out
