"""Teacher centering with a pending sum, so that k micro-batches equal one k-times batch.

Reference: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers"
(DINO, ICCV 2021), Sec. 3.1: the teacher output is centred by an exponential moving average
of its batch mean, ``c <- m c + (1 - m) mean(t)``, which together with sharpening avoids
collapse.

Here the batch mean is split in two calls: ``accumulate_center`` adds a micro-batch's row sum
and row count to a pending total (the centre does not move), and ``apply_center_update`` —
called once per optimizer step — all-reduces the pending totals across ranks (when
``torch.distributed`` is initialised), applies the EMA with the global mean and clears them.

Example (``DINOLoss`` and ``iBOTPatchLoss`` derive from ``CenteredLoss``)::

    >>> import torch
    >>> c = CenteredLoss(out_dim=4, center_momentum=0.5)
    >>> c.accumulate_center(torch.ones(2, 4)); c.accumulate_center(3 * torch.ones(2, 4))
    >>> c.center.sum().item(), c.pending_count
    (0.0, 4)
    >>> c.apply_center_update(); c.center
    tensor([[1., 1., 1., 1.]])
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from slidessl.ssl.sinkhorn import sinkhorn_knopp

__all__ = ["CenteredLoss"]


class CenteredLoss(nn.Module):
    """Base for losses that centre teacher logits: owns ``center`` (1, K) and the pending sum."""

    def __init__(
        self, out_dim: int, center_momentum: float = 0.9, student_temp: float = 0.1
    ) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = float(student_temp)
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must lie in [0, 1], got {center_momentum}")
        self.out_dim = int(out_dim)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending_sum: torch.Tensor | None = None
        self._pending_count = 0

    def _check_logits(self, t_logits: torch.Tensor, what: str) -> torch.Tensor:
        if t_logits.shape[-1] != self.out_dim:
            raise ValueError(
                f"{type(self).__name__}.{what}: last dimension {t_logits.shape[-1]} "
                f"!= out_dim {self.out_dim}"
            )
        return t_logits.reshape(-1, self.out_dim)

    @torch.no_grad()
    def accumulate_center(self, t_logits: torch.Tensor) -> None:
        """Add the teacher logits (..., K) of one micro-batch to the pending sum."""
        rows = self._check_logits(t_logits, "accumulate_center").float()
        total = rows.sum(dim=0, keepdim=True)
        self._pending_sum = total if self._pending_sum is None else self._pending_sum + total
        self._pending_count += rows.shape[0]

    def discard_pending(self) -> None:
        """Forget what was accumulated since the last update (a skipped, non-finite step)."""
        self._pending_sum = None
        self._pending_count = 0

    @property
    def pending_count(self) -> int:
        """Rows accumulated on this rank since the last ``apply_center_update``."""
        return self._pending_count

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """EMA of the centre with the (all-reduced) pending mean, then clear the pending sum.

        Every rank must call it (it is a collective when distributed); with nothing pending
        anywhere the centre is unchanged.
        """
        device = self.center.device
        total = self._pending_sum
        if total is None:
            total = torch.zeros(1, self.out_dim, device=device)
        total = total.to(device=device, dtype=torch.float32).clone()
        count = torch.tensor([float(self._pending_count)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        self.discard_pending()
        if count.item() == 0:
            return
        mean = (total / count).to(self.center.dtype)
        m = self.center_momentum
        self.center.mul_(m).add_(mean, alpha=1.0 - m)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, t_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Teacher probabilities by Sinkhorn-Knopp over all rows (..., K) of all ranks (row
        counts may differ between ranks), instead of centering; same shape as the input."""
        rows = self._check_logits(t_logits, "sinkhorn_knopp_teacher")
        return sinkhorn_knopp(rows, teacher_temp, n_iterations).reshape(t_logits.shape)

    @torch.no_grad()
    def softmax_center_teacher(self, t_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher probabilities ``softmax((t - center) / teacher_temp)`` (float32, same shape)."""
        self._check_logits(t_logits, "softmax_center_teacher")
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        centred = (t_logits.float() - self.center.float()).div_(teacher_temp)
        return torch.softmax(centred, dim=-1)
