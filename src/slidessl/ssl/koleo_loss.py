"""KoLeo regulariser: spread the student CLS embeddings uniformly within a batch.

Reference: Sablayrolles et al., "Spreading vectors for similarity search" (ICLR 2019),
the Kozachenko-Leonenko differential-entropy estimator, as used on the student CLS token in
Oquab et al., "DINOv2" (TMLR 2024): ``-mean_i log(||x_i - x_nn(i)|| + eps)`` over the
L2-normalised embeddings, ``nn(i)`` the nearest other sample (largest cosine).

Example::

    >>> import torch
    >>> loss = KoLeoLoss()(torch.randn(16, 64))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """``forward(student_cls (B, E)) -> scalar``; needs B >= 2. Computed in float32."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, student_cls: torch.Tensor) -> torch.Tensor:
        if student_cls.dim() != 2 or student_cls.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss needs (B, E) embeddings with B >= 2, got {tuple(student_cls.shape)}"
            )
        with torch.autocast(device_type=student_cls.device.type, enabled=False):
            x = F.normalize(student_cls.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                sims = x @ x.t()
                sims.fill_diagonal_(-2.0)  # below any cosine: never pick oneself
                nearest = sims.argmax(dim=1)
            dist = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)
            return -torch.log(dist + self.eps).mean()
