"""Arrangement contrast: a slide vector must tell its crop from the same tiles shuffled.

Composition is what self-distillation of crops keeps most easily (docs/evaluation.md: the
longer DINO / iBOT train on these crops, the less of the tissue arrangement their token-mean
vectors keep). This term asks for the opposite: for each student global crop ``x`` it builds
``shuffle(x)`` - the same tiles with their grid positions permuted among them, so the same
composition with a random arrangement - and, against the teacher's vector ``t`` of the
slide's *other* global crop (the real arrangement, seen elsewhere), scores

``softplus((cos(s, t) - cos(z, t)) / temperature)``

with ``z`` and ``s`` the student's vectors of ``x`` and ``shuffle(x)``: the two-way InfoNCE
(van den Oord et al., 2018, "Representation learning with contrastive predictive coding")
whose only negative is the shuffled crop. Nothing but the arrangement tells ``x`` from
``shuffle(x)``; a pretext of the jigsaw family (Noroozi and Favaro, ECCV 2016) on the tile
grid. Mean over crops; computed in float32.

Example::

    >>> import torch
    >>> loss = ArrangementLoss()(torch.randn(8, 64), torch.randn(8, 64), torch.randn(8, 64))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ArrangementLoss", "shuffle_positions"]


class ArrangementLoss(nn.Module):
    """``forward(real (N, E), shuffled (N, E), target (N, E)) -> scalar``."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"arrange.temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, real, shuffled, target) -> torch.Tensor:
        if not (real.shape == shuffled.shape == target.shape) or real.dim() != 2:
            raise ValueError(
                f"ArrangementLoss needs three (N, E) tensors, got {tuple(real.shape)}, "
                f"{tuple(shuffled.shape)}, {tuple(target.shape)}"
            )
        with torch.autocast(device_type=real.device.type, enabled=False):
            t = F.normalize(target.float().detach(), dim=-1)
            pos = (F.normalize(real.float(), dim=-1) * t).sum(-1)
            neg = (F.normalize(shuffled.float(), dim=-1) * t).sum(-1)
            return F.softplus((neg - pos) / self.temperature).mean()


def shuffle_positions(coords: torch.Tensor, padding_mask: torch.Tensor, generator=None):
    """``coords`` (B, N, 2) with each row's real tiles' positions permuted among them
    (padding untouched): the same tiles, a random arrangement."""
    b, n, _ = coords.shape
    keys = torch.rand(b, n, generator=generator, device=coords.device)
    keys = keys.masked_fill(padding_mask, 2.0)  # padding sorts last and stays in place
    perm = keys.argsort(dim=1)
    out = coords.clone()
    real = ~padding_mask
    for i in range(b):
        m = int(real[i].sum())
        out[i, :m] = coords[i, perm[i, :m]]
    return out
