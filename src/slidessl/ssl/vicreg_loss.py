"""Variance-covariance regulariser on slide vectors (VICReg without its invariance term).

Reference: Bardes, Ponce and LeCun, "VICReg: Variance-Invariance-Covariance Regularization
for Self-Supervised Learning" (ICLR 2022), Eq. 1-4: over a batch ``Z`` (n, d),

- variance ``v(Z) = mean_j max(0, gamma - sqrt(Var(Z_j) + eps))``: every dimension keeps a
  standard deviation of at least ``gamma`` (no dimension collapses);
- covariance ``c(Z) = sum_{i != j} C(Z)_ij^2 / d`` with ``C`` the sample covariance: the
  dimensions decorrelate (the vector is well conditioned, as after whitening).

The loss is ``v(Z) + c(Z) * cov_weight`` with VICReg's ratio ``cov_weight = nu / mu = 1 / 25``
by default. Self-distillation (DINO) supplies the invariance; this term asks the slide
vectors of a micro-batch to use every dimension and to decorrelate them - the label-free
alternative to whitening random-init vectors after the fact. Computed in float32 per
micro-batch (as KoLeo): it needs ``n >= 2``.

Example::

    >>> import torch
    >>> loss = VarianceCovarianceLoss()(torch.randn(16, 64))
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VarianceCovarianceLoss"]


class VarianceCovarianceLoss(nn.Module):
    """``forward(z (n, d)) -> scalar``; needs ``n >= 2``."""

    def __init__(self, gamma: float = 1.0, cov_weight: float = 1.0 / 25, eps: float = 1e-4):
        super().__init__()
        self.gamma, self.cov_weight, self.eps = float(gamma), float(cov_weight), float(eps)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[0] < 2:
            raise ValueError(
                f"VarianceCovarianceLoss needs (n, d) with n >= 2, got {tuple(z.shape)}"
            )
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            n, d = z.shape
            z = z - z.mean(dim=0)
            std = torch.sqrt(z.var(dim=0) + self.eps)
            variance = torch.relu(self.gamma - std).mean()
            cov = (z.T @ z) / (n - 1)
            off = cov - torch.diag(torch.diagonal(cov))
            return variance + self.cov_weight * off.pow(2).sum() / d
