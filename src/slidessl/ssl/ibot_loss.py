"""iBOT masked-token loss: the student predicts the teacher's patch distribution on masked tokens.

Reference: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022),
Eq. 2 (masked image modelling by self-distillation of patch tokens), as used in Oquab et
al., "DINOv2" (TMLR 2024). Here the "patches" are the tiles of a slide crop, masked in 2-D
blocks on the tile grid (``slidessl.data.masking``).

Each masked token contributes ``-sum_k p_t log softmax(s / student_temp)``; a sample's
tokens are averaged (weight ``1 / n_masked(sample)``) and the sum is divided by the number of
samples in the batch, masked or not (DINOv2's ``forward_masked``).

Example::

    >>> import torch
    >>> loss_fn = iBOTPatchLoss(out_dim=32)
    >>> masks = torch.zeros(2, 10, dtype=torch.bool); masks[0, :4] = True
    >>> t = torch.randn(4, 32)                                   # teacher logits, masked tokens
    >>> probs = loss_fn.softmax_center_teacher(t, teacher_temp=0.04)
    >>> loss = loss_fn.forward_masked(torch.randn(4, 32), probs, masks)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slidessl.ssl.centering import CenteredLoss

__all__ = ["head_in_chunks", "iBOTPatchLoss"]


@torch.no_grad()
def head_in_chunks(head: nn.Module, tokens: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """``head(tokens)`` for (M, D) tokens, ``chunk`` rows at a time (no gradient): the head's
    hidden activations never exist for more than ``chunk`` tokens at once."""
    if not chunk or tokens.shape[0] <= chunk:
        return head(tokens)
    return torch.cat([head(part) for part in tokens.split(int(chunk))])


class iBOTPatchLoss(CenteredLoss):  # noqa: N801 - the paper's spelling
    """Patch-token self-distillation on masked tokens; same centre API as ``DINOLoss``."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__(out_dim, center_momentum, student_temp)

    def _token_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if s.shape != t.shape:
            raise ValueError(
                f"iBOTPatchLoss: student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}"
            )
        self._check_logits(s, "forward")
        return (t.float() * F.log_softmax(s.float() / self.student_temp, dim=-1)).sum(dim=-1)

    def forward(
        self,
        student_patch_logits: torch.Tensor,
        teacher_patch_probs: torch.Tensor,
        masks: torch.Tensor,
    ) -> torch.Tensor:
        """Dense form: logits/probs (B, N, K), ``masks`` (B, N) bool (True = masked token)."""
        if masks.shape != student_patch_logits.shape[:-1]:
            raise ValueError(
                f"iBOTPatchLoss: masks shape {tuple(masks.shape)} does not match tokens "
                f"{tuple(student_patch_logits.shape[:-1])}"
            )
        per_token = self._token_loss(student_patch_logits, teacher_patch_probs)
        m = masks.float()
        per_sample = (per_token * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
        return -per_sample.mean()

    def forward_masked(
        self,
        student_patch_logits: torch.Tensor,
        teacher_patch_probs: torch.Tensor,
        masks: torch.Tensor,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed form: logits/probs (M, K) of the masked tokens, in ``masks.nonzero()`` order.

        ``masks`` is (B, N) bool; ``M`` must equal ``masks.sum()``. ``masks_weight`` (M,)
        overrides the per-token weight ``1 / n_masked(sample)``.
        """
        if masks.dim() != 2 or masks.dtype != torch.bool:
            raise ValueError(
                f"iBOTPatchLoss: masks must be (B, N) bool, got {masks.dtype} {tuple(masks.shape)}"
            )
        n_masked = int(masks.sum())
        if student_patch_logits.shape[0] != n_masked:
            raise ValueError(
                f"iBOTPatchLoss: {student_patch_logits.shape[0]} masked logits but masks hold "
                f"{n_masked} masked tokens"
            )
        per_token = self._token_loss(student_patch_logits, teacher_patch_probs)
        return -(per_token * self._weights(masks, masks_weight)).sum() / masks.shape[0]

    @staticmethod
    def _weights(masks: torch.Tensor, masks_weight: torch.Tensor | None) -> torch.Tensor:
        if masks_weight is not None:
            return masks_weight
        per_sample = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
        return (1.0 / per_sample).expand_as(masks)[masks]

    def forward_head_masked(
        self,
        head: nn.Module,
        student_tokens: torch.Tensor,
        teacher_patch_probs: torch.Tensor,
        masks: torch.Tensor,
        chunk: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward_masked(head(student_tokens), ...)`` with bounded memory: the head and the
        log-softmax run ``chunk`` tokens at a time under activation checkpointing, so neither
        the (M, K) student logits nor their log-softmax are kept for backward (each chunk is
        recomputed in backward). Same value and gradients as the unchunked form."""
        n = student_tokens.shape[0]
        if not chunk or n <= chunk:
            return self.forward_masked(
                head(student_tokens), teacher_patch_probs, masks, masks_weight
            )
        if n != int(masks.sum()) or teacher_patch_probs.shape[0] != n:
            raise ValueError(
                f"iBOTPatchLoss: {n} student tokens, {teacher_patch_probs.shape[0]} teacher rows, "
                f"masks hold {int(masks.sum())} masked tokens"
            )
        weights = self._weights(masks, masks_weight)

        def part(x, t, w):
            return (self._token_loss(head(x), t) * w).sum()

        total = student_tokens.new_zeros((), dtype=torch.float32)
        for lo in range(0, n, int(chunk)):
            sl = slice(lo, lo + int(chunk))
            args = (student_tokens[sl], teacher_patch_probs[sl], weights[sl])
            if torch.is_grad_enabled():
                total = total + checkpoint(part, *args, use_reentrant=False)
            else:
                total = total + part(*args)
        return -total / masks.shape[0]
