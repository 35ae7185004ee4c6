"""Sinkhorn-Knopp normalisation of teacher logits (distributed-aware).

Reference: Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments" (SwAV, NeurIPS 2020), and its use as a centering alternative in Oquab et al.,
"DINOv2: Learning Robust Visual Features without Supervision" (TMLR 2024).

The teacher's ``exp(logits / temp)`` matrix (B samples x K prototypes) is alternately
normalised so that every prototype receives the same total mass (``1/K``) and every sample
carries mass ``1/B``; the result, rescaled by ``B``, is a soft assignment per sample (each
row sums to one). When ``torch.distributed`` is initialised the sums run over all ranks, so
the equipartition holds over the global batch.

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


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor,
    temp: float,
    n_iterations: int = 3,
    n_samples: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft equipartitioned assignments of ``logits`` (B, K) at temperature ``temp``.

    ``n_samples`` is the number of rows over all ranks; by default the local row count is
    all-reduced (so ranks may hold different numbers of rows, e.g. masked iBOT tokens).
    Returns float32 (B, K), rows summing to one.
    """
    if logits.dim() != 2:
        raise ValueError(f"sinkhorn_knopp expects (B, K) logits, got shape {tuple(logits.shape)}")
    if temp <= 0:
        raise ValueError(f"sinkhorn_knopp temperature must be > 0, got {temp}")
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    scaled = logits.float() / temp
    # Subtracting the global maximum cancels in the normalisation and keeps exp() finite.
    top = scaled.max() if scaled.numel() else torch.tensor(float("-inf"), device=scaled.device)
    top = _all_reduce(top.clone(), dist.ReduceOp.MAX if _distributed() else None)
    q = torch.exp(scaled - top).t()  # (K, B)
    k = q.shape[0]
    if n_samples is None:
        total = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    else:
        total = torch.as_tensor(n_samples, dtype=torch.float32, device=q.device)
    q /= _all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # every prototype gets mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # every sample gets mass 1/B
        q /= total
    q *= total
    return q.t()
