"""2-D sin-cos positional encodings computed on the fly from integer grid coordinates.

``"xy"`` mode: the first half of the channels encodes ``gx`` and the second half ``gy``,
each half as ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 1 / 10000^(i / (d/4))``
(the 1-D formula of MAE, He et al., 2022, "Masked Autoencoders Are Scalable Vision
Learners"). No table: any slide size works.

``"gigapath"`` mode reproduces Prov-GigaPath's values (Xu et al., 2024, Nature, "A
whole-slide foundation model for digital pathology from real-world data"): it indexes
MAE's ``get_2d_sincos_pos_embed`` table of a 1000 x 1000 grid with ``gx * 1000 + gy``, so
the first half of the channels encodes ``k % 1000`` (``gy`` for ``gy < 1000``) and the
second half ``k // 1000`` (``gx``). Here the same value is computed directly; positions
past the table (``gx >= 1000``) continue the formula instead of failing.
"""

from __future__ import annotations

import torch

__all__ = ["sincos_1d", "sincos_2d", "POS_MODES"]

POS_MODES = ("xy", "gigapath", "none")
_GIGAPATH_NGRIDS = 1000


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """``pos`` (...,) integer or float -> (..., dim) float64 ``[sin, cos]`` features."""
    if dim % 2:
        raise ValueError(f"sin-cos encoding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = pos.to(torch.float64).unsqueeze(-1) * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def sincos_2d(coords: torch.Tensor, dim: int, mode: str = "xy") -> torch.Tensor:
    """``coords`` (B, N, 2) integer grid ``(gx, gy)`` -> (B, N, dim) float32 encodings."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos encoding needs a dimension divisible by 4, got {dim}")
    if coords.shape[-1] != 2:
        raise ValueError(f"coords must end in 2 (gx, gy), got shape {tuple(coords.shape)}")
    if coords.is_floating_point():
        raise ValueError("coords must be integer grid positions (tile units), got floats")
    gx, gy = coords[..., 0].long(), coords[..., 1].long()
    if mode == "xy":
        first, second = gx, gy
    elif mode == "gigapath":
        flat = gx * _GIGAPATH_NGRIDS + gy
        first, second = flat % _GIGAPATH_NGRIDS, flat // _GIGAPATH_NGRIDS
    elif mode == "none":
        return torch.zeros(coords.shape[:-1] + (dim,), device=coords.device)
    else:
        raise ValueError(f"unknown position mode {mode!r}; choose from {POS_MODES}")
    emb = torch.cat([sincos_1d(first, dim // 2), sincos_1d(second, dim // 2)], dim=-1)
    return emb.float()
