"""Sinkhorn-Knopp normalisation of teacher logits (distributed-aware, in the log domain).

Reference: Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments" (SwAV, NeurIPS 2020), and its use as a centering alternative in Oquab et al.,
"DINOv2: Learning Robust Visual Features without Supervision" (TMLR 2024).

The teacher's ``exp(logits / temp)`` matrix (B samples x K prototypes) is alternately
normalised so that every prototype receives the same total mass and every sample the same;
the result, each row rescaled to sum to one, is a soft assignment per sample. When
``torch.distributed`` is initialised the prototype sums run over all ranks, so the
equipartition holds over the global batch (ranks may hold different numbers of rows, as
for masked iBOT tokens). The constant factors 1/K and 1/B of the usual formulation cancel
and are left out; the work is done with log-sum-exp, so very sharp temperatures give
one-hot rows instead of NaN.

Example::

    >>> import torch
    >>> q = sinkhorn_knopp(torch.randn(8, 16), temp=0.07)
    >>> q.shape, bool(torch.allclose(q.sum(-1), torch.ones(8), atol=1e-5))
    (torch.Size([8, 16]), True)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["sinkhorn_knopp"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _logsumexp_over_samples(log_q: torch.Tensor) -> torch.Tensor:
    """(1, K) log of the per-prototype sum of exp over the rows of every rank."""
    if log_q.shape[0]:
        top = log_q.amax(dim=0, keepdim=True)
    else:
        top = torch.full((1, log_q.shape[1]), float("-inf"), device=log_q.device)
    if _distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (log_q - safe_top).exp_().sum(dim=0, keepdim=True)
    if _distributed():
        dist.all_reduce(total)
    return safe_top + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Soft equipartitioned assignments of ``logits`` (B, K) at temperature ``temp``.

    Returns float32 (B, K), rows summing to one. Every rank must call it when distributed.
    """
    if logits.dim() != 2:
        raise ValueError(f"sinkhorn_knopp expects (B, K) logits, got shape {tuple(logits.shape)}")
    if temp <= 0:
        raise ValueError(f"sinkhorn_knopp temperature must be > 0, got {temp}")
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    # in place on one float32 copy: at most two (B, K) tensors live at once
    log_q = logits.to(torch.float32, copy=True).div_(temp)
    for _ in range(n_iterations):
        log_q.sub_(_logsumexp_over_samples(log_q))  # every prototype: equal mass
        log_q.sub_(torch.logsumexp(log_q, dim=1, keepdim=True))  # every sample: mass one
    return log_q.exp_()
