"""Packed (varlen) token streams: several inputs back to back with no padding, the layout
``SlideEncoder.forward_packed`` and the packed multi-crop step run on."""

from __future__ import annotations

import functools

import torch

__all__ = ["pack_padded", "segment_mean", "stream_index"]


def pack_padded(t: torch.Tensor, lengths) -> torch.Tensor:
    """The real rows of a right-padded ``(B, N, ...)`` batch back to back, ``(sum(lengths),
    ...)``: row ``i`` contributes its first ``lengths[i]`` entries. ``lengths`` is a list of
    ints (the collate's ``lengths``), so no host sync is needed."""
    lengths = [int(n) for n in lengths]
    b, n = t.shape[:2]
    if len(lengths) != b or max(lengths, default=0) > n or min(lengths, default=0) < 0:
        raise ValueError(f"lengths {lengths} do not fit a padded batch of shape {tuple(t.shape)}")
    idx = torch.cat([i * n + torch.arange(m) for i, m in enumerate(lengths)] or [torch.arange(0)])
    return t.flatten(0, 1).index_select(0, idx.to(t.device))


def segment_mean(x: torch.Tensor, lengths) -> torch.Tensor:
    """``(S, D)`` mean of each of the ``S`` back-to-back runs of ``lengths`` rows of ``x``
    (an empty run: zeros)."""
    reps = torch.as_tensor(lengths, device=x.device)
    seq = torch.arange(len(lengths), device=x.device).repeat_interleave(
        reps, output_size=x.shape[0]
    )
    sums = x.new_zeros(len(lengths), x.shape[1]).index_add(0, seq, x)
    return sums / reps.clamp_min(1)[:, None].to(x.dtype)


@functools.lru_cache(maxsize=64)
def stream_index(lengths: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of a packed stream of inputs of ``lengths`` tiles, each led by its CLS:
    ``order`` (T + S,) the row of ``cat([cls (S), tiles (T)])`` at each stream position,
    and the stream positions of the CLS tokens (S,) and of the tiles (T,) (CPU, cached)."""
    n_in = len(lengths)
    full = torch.as_tensor(lengths, dtype=torch.long) + 1
    cls_rows = torch.cumsum(full, 0) - full
    is_cls = torch.zeros(int(full.sum()), dtype=torch.bool)
    is_cls[cls_rows] = True
    order = torch.empty(len(is_cls), dtype=torch.long)
    order[cls_rows] = torch.arange(n_in)
    order[~is_cls] = n_in + torch.arange(int(full.sum()) - n_in)
    return order, cls_rows, (~is_cls).nonzero()[:, 0]
