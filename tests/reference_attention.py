"""Exact, loop-based math reference for dense and dilated attention (for the tests; not shipped).

It follows the LongNet definition (Ding et al., 2023, arXiv:2307.02486) literally: for
every branch, segment and head it lists the key positions explicitly, computes a softmax
over the valid ones in the input dtype (use float64 for tests) and combines branches with
their log-sum-exp weights. Slow by design; never used for training.
"""

from __future__ import annotations

import torch

__all__ = ["reference_dilated_attention", "reference_branch"]


def _segment_positions(n, heads, segment, dilation):
    """Yield ``(head, positions)`` for every sparse segment of one branch."""
    w = min(segment, n)
    per_group = -(-heads // dilation)
    for start in range(0, n, w):
        stop = min(start + w, n)
        for h in range(heads):
            group = h // per_group
            pos = list(range(start + group, stop, dilation))
            if pos:
                yield h, pos


def reference_branch(q, k, v, segment, dilation, padding_mask=None):
    """One branch: returns ``out`` (B, N, H, D) and ``lse`` (B, N, H), -inf where uncovered."""
    b, n, h, d = q.shape
    scale = d**-0.5
    out = torch.zeros_like(q)
    lse = torch.full((b, n, h), float("-inf"), dtype=q.dtype, device=q.device)
    for bi in range(b):
        for head, pos in _segment_positions(n, h, segment, dilation):
            pos = torch.tensor(pos, device=q.device)
            if padding_mask is not None:
                pos = pos[~padding_mask[bi, pos]]
            if pos.numel() == 0:
                continue
            qs, ks, vs = q[bi, pos, head], k[bi, pos, head], v[bi, pos, head]
            scores = qs @ ks.T * scale
            row_lse = torch.logsumexp(scores, dim=-1)
            out[bi, pos, head] = torch.softmax(scores, dim=-1) @ vs
            lse[bi, pos, head] = row_lse
    return out, lse


def reference_dilated_attention(q, k, v, segments, dilations, padding_mask=None):
    """LongNet output (B, N, H, D); padded positions are zero."""
    parts = [reference_branch(q, k, v, s, r, padding_mask) for s, r in zip(segments, dilations)]
    lses = torch.stack([lse for _, lse in parts])  # (branches, B, N, H)
    log_z = torch.logsumexp(lses, dim=0)
    log_z = torch.where(log_z.isfinite(), log_z, torch.zeros_like(log_z))
    result = torch.zeros_like(q)
    for out, lse in parts:
        result = result + out * torch.exp(lse - log_z).unsqueeze(-1)
    if padding_mask is not None:
        result = result.masked_fill(padding_mask[:, :, None, None], 0.0)
    return result
