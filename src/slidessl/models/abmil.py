"""Gated-attention multiple-instance learning (ABMIL) over tile features.

Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018:
tiles are projected (``Linear -> ReLU -> Dropout``, 512), scored by the gated attention
``w^T (tanh(V h) * sigmoid(U h))`` (256), softmax-normalised over the slide's real tiles
(padding gets exactly zero weight), and the attention-weighted mean of the projections
goes through a linear classifier. The supervised baseline of the slide-encoder papers
(Prov-GigaPath, CLAM) uses this head.

Example::

    model = GatedABMIL(in_dim=768, n_outputs=1)
    logits, attn = model(x, padding_mask, return_attention=True)  # (B, 1), (B, N)
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _Dropout(nn.Module):
    """Inverted dropout whose masks come from ``generator`` (the global RNG when None), so
    that models trained on several threads at once each draw their own stream."""

    def __init__(self, p: float, generator: torch.Generator | None = None):
        super().__init__()
        self.p, self.generator = float(p), generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep / (1.0 - self.p)


class GatedABMIL(nn.Module):
    """``generator``: the initial weights and every dropout mask are drawn from it (PyTorch's
    default ``nn.Linear`` init), so a training is reproducible whatever runs beside it."""

    def __init__(
        self,
        in_dim: int,
        n_outputs: int = 1,
        proj_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if in_dim < 1 or n_outputs < 1:
            raise ValueError(f"in_dim and n_outputs must be >= 1, got {in_dim}, {n_outputs}")
        self.in_dim, self.n_outputs = in_dim, n_outputs
        drop = _Dropout(dropout, generator)
        self.proj = nn.Sequential(nn.Linear(in_dim, proj_dim), nn.ReLU(), drop)
        self.attn_v = nn.Linear(proj_dim, attn_dim)
        self.attn_u = nn.Linear(proj_dim, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)
        self.attn_dropout = _Dropout(dropout, generator)
        self.head = nn.Linear(proj_dim, n_outputs)
        if generator is not None:
            for m in self.modules():
                if isinstance(m, nn.Linear):  # nn.Linear.reset_parameters, from the generator
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                    bound = 1.0 / math.sqrt(m.in_features)
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor, padding_mask=None, return_attention: bool = False):
        """``x`` (B, N, D), ``padding_mask`` (B, N) bool True = padding -> logits (B, C)."""
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"tile features must be (B, N, {self.in_dim}), got {tuple(x.shape)}")
        if padding_mask is not None:
            if padding_mask.shape != x.shape[:2] or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"padding_mask must be bool {tuple(x.shape[:2])}, got "
                    f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            if padding_mask.all(dim=1).any():
                raise ValueError("a slide in the batch has no tile (all padding)")
        h = self.proj(x)
        gate = torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))
        scores = self.attn_w(self.attn_dropout(gate)).squeeze(-1)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bn,bne->be", attn, h)
        logits = self.head(pooled)
        return (logits, attn) if return_attention else logits
