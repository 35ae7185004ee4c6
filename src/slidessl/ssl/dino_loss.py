"""DINO self-distillation loss on the CLS logits, with teacher centering or Sinkhorn-Knopp.

References: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers"
(DINO, ICCV 2021), Eq. 1-2 (cross-entropy between a sharpened, centred teacher softmax and
the student softmax over every student/teacher crop pair); Oquab et al., "DINOv2: Learning
Robust Visual Features without Supervision" (TMLR 2024), Sec. 4 (Sinkhorn-Knopp centering).

``forward`` sums, over every (student crop, teacher crop) pair it is given, the batch mean
of ``-sum_k p_t log softmax(s / student_temp)``; which pairs to form (e.g. skipping a crop
against itself) is the caller's choice, as in DINOv2's meta-architecture. The teacher
temperature warm-up is a schedule of the trainer, passed in per call.

Example::

    >>> import torch
    >>> loss_fn = DINOLoss(out_dim=32)
    >>> t = torch.randn(8, 32)
    >>> probs = loss_fn.softmax_center_teacher(t, teacher_temp=0.04)
    >>> loss_fn.accumulate_center(t)          # per micro-batch
    >>> loss = loss_fn([torch.randn(8, 32, requires_grad=True)], [probs])
    >>> loss_fn.apply_center_update()         # once per optimizer step
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slidessl.ssl.centering import CenteredLoss

__all__ = ["DINOLoss"]


class DINOLoss(CenteredLoss):
    """Cross-entropy between teacher probabilities and student logits (B, K)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__(out_dim, center_momentum, student_temp)

    def forward(
        self, student_logits_list: list[torch.Tensor], teacher_probs_list: list[torch.Tensor]
    ) -> torch.Tensor:
        if not student_logits_list or not teacher_probs_list:
            raise ValueError("DINOLoss needs at least one student and one teacher tensor")
        total = None
        for s in student_logits_list:
            self._check_logits(s, "forward (student)")
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_probs_list:
                if t.shape != s.shape:
                    raise ValueError(
                        f"DINOLoss: teacher shape {tuple(t.shape)} != student shape "
                        f"{tuple(s.shape)}"
                    )
                term = -(t.float() * log_p).sum(dim=-1).mean()
                total = term if total is None else total + term
        return total
