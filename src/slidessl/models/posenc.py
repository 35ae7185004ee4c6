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
past the table (``gx >= 1000``) continue the formula instead of failing, which is what
slidessl's own encoders with ``pos_mode="gigapath"`` want (origin-free grids of any size).

The faithful Prov-GigaPath path (``gigapath:PATH``, :mod:`slidessl.models.gigapath`) calls
:func:`check_gigapath_table` first: positions outside the published 1000 x 1000 table are
an error there unless the caller opts in to extrapolation.
"""

from __future__ import annotations

import torch

__all__ = ["sincos_1d", "sincos_2d", "check_gigapath_table", "POS_MODES", "GIGAPATH_NGRIDS"]

POS_MODES = ("xy", "gigapath", "none")
GIGAPATH_NGRIDS = 1000  # Prov-GigaPath's ``slide_ngrids``: a 1000 x 1000 table
_GIGAPATH_NGRIDS = GIGAPATH_NGRIDS


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


def check_gigapath_table(grid: torch.Tensor, extrapolate: bool = False) -> int:
    """Check integer positions ``(gx, gy)`` against Prov-GigaPath's 1000 x 1000 table.

    Returns the number of positions outside it. Negative positions always raise
    ``ValueError``; positions with ``gx >= 1000`` or ``gy >= 1000`` raise unless
    ``extrapolate``. There the published model either fails (flat index ``gx * 1000 + gy``
    past the table's end) or silently reads another cell's row (``gy >= 1000`` wraps into
    ``gx``); with ``extrapolate`` :func:`sincos_2d` computes the table's formula at the flat
    index, which equals the published row wherever the published table has one and
    continues the formula past its end.
    """
    if grid.shape[-1] != 2 or grid.is_floating_point():
        raise ValueError(
            f"positions must be integer (..., 2) (gx, gy), got {grid.dtype} {tuple(grid.shape)}"
        )
    if grid.numel() == 0:
        return 0
    if bool((grid < 0).any()):
        raise ValueError(
            f"{int((grid < 0).any(-1).sum())} negative positions: Prov-GigaPath's table starts "
            "at (0, 0) (its positions are floor(coords / 256) with no origin shift)"
        )
    outside = (grid >= GIGAPATH_NGRIDS).any(-1)
    n_out = int(outside.sum())
    if n_out and not extrapolate:
        gx, gy = int(grid[..., 0].max()), int(grid[..., 1].max())
        raise ValueError(
            f"{n_out} of {outside.numel()} tiles fall outside Prov-GigaPath's "
            f"{GIGAPATH_NGRIDS} x {GIGAPATH_NGRIDS} position table (largest position x {gx}, "
            f"y {gy}, in 256-px tiles; the published model fails or reads another cell's row "
            "there): check the coordinate units, or opt in to extrapolating the sin-cos "
            "formula (--gigapath-extrapolate)"
        )
    return n_out
