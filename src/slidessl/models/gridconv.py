"""Local context on the tile grid: a depthwise k x k convolution over present tiles.

A conditional positional encoding generator (PEG; Chu et al., 2023, "Conditional
Positional Encodings for Vision Transformers", ICLR) applied to a *sparse* grid, as
TransMIL's PPEG does for pathology bags (Shao et al., 2021, NeurIPS) but without padding
the bag into a dense square: each token adds a learned per-channel mix of the tokens in its
k x k neighbourhood **on the slide grid** (not in sequence order); empty cells and padded
tokens contribute nothing. Dilated attention mixes tokens by sequence index, so this gives
every token its true 2-D neighbourhood before the first block — the local arrangement of
tissue (which tile types touch which) that mean pooling cannot see.

Cost: ``k*k`` gathers of ``(B*N, E)``; neighbours are found by one sort and ``k*k``
binary searches, never an N x N or extent-sized table.

Example::

    ctx = GridContext(64, kernel_size=3)
    h = h + ctx(h, coords, padding_mask)      # h (B, N, 64), coords (B, N, 2) int grid
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GridContext", "grid_neighbours"]


def grid_neighbours(coords: torch.Tensor, padding_mask, kernel_size: int) -> torch.Tensor:
    """Flat indices ``(B*N, k*k)`` of each token's grid neighbours; ``B*N`` marks "none".

    Offsets are enumerated row by row over ``dx, dy in [-r, r]``; the centre is included.
    Padded tokens neither have nor are neighbours.
    """
    b, n, _ = coords.shape
    r = kernel_size // 2
    flat = coords.reshape(b * n, 2).to(torch.int64)
    valid = torch.ones(b * n, dtype=torch.bool, device=coords.device)
    if padding_mask is not None:
        valid = ~padding_mask.reshape(b * n)
    lo = flat.min(dim=0).values if b * n else flat.new_zeros(2)
    flat = flat - lo + r  # non-negative with room for the offsets
    side = int(flat.max()) + r + 1 if b * n else 1
    sample = torch.arange(b, device=coords.device).repeat_interleave(n)
    key = (sample * side + flat[:, 0]) * side + flat[:, 1]
    # padded tokens get keys beyond every real one, so no query can land on them
    key = torch.where(valid, key, b * side * side + torch.arange(b * n, device=coords.device))
    sorted_key, order = torch.sort(key)
    out = []
    for dx in range(-r, r + 1):
        for dy in range(-r, r + 1):
            query = (sample * side + flat[:, 0] + dx) * side + flat[:, 1] + dy
            pos = torch.searchsorted(sorted_key, query).clamp_max(b * n - 1)
            hit = (sorted_key[pos] == query) & valid
            out.append(torch.where(hit, order[pos], b * n))
    return torch.stack(out, dim=1)


class GridContext(nn.Module):
    """Depthwise ``kernel_size`` x ``kernel_size`` convolution over the tiles' grid."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"grid_context kernel size must be odd and >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(kernel_size * kernel_size, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # as nn.Conv2d's default for a depthwise kernel: fan_in = k * k
        bound = 1.0 / self.kernel_size
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor, coords: torch.Tensor, padding_mask=None) -> torch.Tensor:
        b, n, e = h.shape
        index = grid_neighbours(coords, padding_mask, self.kernel_size)
        table = torch.cat([h.reshape(b * n, e), h.new_zeros(1, e)], dim=0)
        out = h.new_zeros(b * n, e) + self.bias.to(h.dtype)
        for k in range(index.shape[1]):
            out = out + table[index[:, k]] * self.weight[k].to(h.dtype)
        out = out.reshape(b, n, e)
        if padding_mask is not None:
            out = out.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return out
