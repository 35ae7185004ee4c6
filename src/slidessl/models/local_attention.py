"""Neighbourhood attention on the sparse tile grid: each tile attends to its k x k grid
neighbours; the CLS token attends to every tile.

Neighbourhood attention (Hassani et al., 2023, "Neighborhood Attention Transformer", CVPR)
restricted to the tiles that exist: the neighbours of a tile are looked up on the slide
grid (``slidessl.models.gridconv.grid_neighbours``: one sort and ``k*k`` binary searches),
never in sequence order and never through an N x N or extent-sized tensor. Cost and memory
are ``O(N * k * k)``. Scores get a learned relative-position bias per head and per *grid
distance class* (``dx^2 + dy^2``; zero at init, as Swin's table), so the bias is the same
under the flips and quarter turns of the crop augmentations. Empty cells and padded tokens
are never attended; a padded query's output is zero.

Used by the first ``local_depth`` blocks of :class:`~slidessl.models.encoder.SlideEncoder`
(``local_kernel=k``): early blocks see which tissue touches which, later blocks (dense or
dilated) see the slide.

Example::

    attn = NeighbourhoodAttention(64, num_heads=4, kernel_size=5)
    idx = grid_neighbours(coords, padding_mask, 5)       # coords (B, N, 2) grid cells
    y = attn(x, padding_mask, idx)                        # x (B, 1 + N, 64), CLS first
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NeighbourhoodAttention",
    "cls_attention",
    "distance_classes",
    "local_attention",
    "relative_positions",
    "tile_attention",
]


def distance_classes(kernel_size: int) -> torch.Tensor:
    """``(k*k,)`` class of each offset (in `grid_neighbours` order) by ``dx^2 + dy^2``."""
    r = kernel_size // 2
    d2 = torch.tensor([dx * dx + dy * dy for dx in range(-r, r + 1) for dy in range(-r, r + 1)])
    return torch.unique(d2, return_inverse=True)[1]


def tile_attention(q, k, v, index, bias=None) -> torch.Tensor:
    """Each tile's attention over its grid neighbours: ``q, k, v`` ``(M, H, D)`` for ``M``
    tiles, ``index`` ``(M, K)`` rows of ``k``/``v`` (``M`` = no neighbour; every tile is its
    own neighbour, so no row is empty), ``bias`` ``(H, K)``. Returns ``(M, H, D)``."""
    m, h, d = q.shape
    kk = index.shape[1]
    # one gather of keys and values (index_select: its backward is one index_add)
    kv = torch.cat([torch.cat([k, v], dim=-1), k.new_zeros(1, h, 2 * d)])
    near = kv.index_select(0, index.reshape(-1)).view(m, kk, h, 2 * d)
    scores = (q.unsqueeze(1) * near[..., :d]).sum(-1).transpose(1, 2) * d**-0.5  # (M, H, K)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill((index == m)[:, None, :], float("-inf"))
    acc = torch.promote_types(scores.dtype, torch.float32)  # half inputs: softmax in fp32
    probs = torch.softmax(scores.to(acc), dim=-1).to(q.dtype)
    return (probs.transpose(1, 2).unsqueeze(-1) * near[..., d:]).sum(1)


def cls_attention(q, k, v, k_tiles, v_tiles, members, valid, pos_kv=None) -> torch.Tensor:
    """Each CLS token's attention over itself and its member tiles: ``q, k, v`` ``(R, H, D)``
    for ``R`` CLS tokens, ``k_tiles``/``v_tiles`` ``(M, H, D)``, ``members`` ``(R, L)`` tile
    rows, ``valid`` ``(R, L)`` bool (False = padding); ``pos_kv`` ``(R, L, H, 2D)`` is added
    to the members' keys and values (their positions, for the CLS only). Returns
    ``(R, H, D)``."""
    k_m, v_m = k_tiles[members], v_tiles[members]
    if pos_kv is not None:
        d = k_m.shape[-1]
        k_m, v_m = k_m + pos_kv[..., :d], v_m + pos_kv[..., d:]
    keys = torch.cat([k.unsqueeze(1), k_m], dim=1)  # (R, 1 + L, H, D)
    values = torch.cat([v.unsqueeze(1), v_m], dim=1)
    mask = torch.cat([valid.new_ones(len(valid), 1), valid], dim=1)[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask
    )
    return out.squeeze(2)


def local_attention(q, k, v, index, bias=None, padding_mask=None, pos_kv=None):
    """Attention of ``q, k, v`` ``(B, 1 + N, H, D)`` (CLS first) on the grid.

    Tile ``i`` attends to the tiles ``index[i]`` (``(B*N, K)`` flat indices into the
    ``B*N`` tiles, ``B*N`` = no neighbour) with the additive score ``bias`` ``(H, K)``; the
    CLS query attends to the CLS and every real tile of its input. Tiles do not attend to
    the CLS, so a tile's output depends on its neighbourhood only (what lets
    :meth:`SlideEncoder.forward_regions` share tile tokens between regions).
    ``padding_mask`` is ``(B, 1 + N)`` bool, True = padding (the CLS never is); ``pos_kv``
    ``(B, N, H, 2D)``: see `cls_attention`. Returns ``(B, 1 + N, H, D)``.
    """
    b, n1, h, d = q.shape
    n = n1 - 1
    flat = [t[:, 1:].reshape(b * n, h, d) for t in (q, k, v)]
    tiles = tile_attention(*flat, index, bias).reshape(b, n, h, d)
    valid = torch.ones(b, n, dtype=torch.bool, device=q.device)
    if padding_mask is not None:
        tiles = tiles.masked_fill(padding_mask[:, 1:, None, None], 0.0)
        valid = ~padding_mask[:, 1:]
    members = torch.arange(b * n, device=q.device).view(b, n)
    cls = cls_attention(q[:, 0], k[:, 0], v[:, 0], flat[1], flat[2], members, valid, pos_kv)
    return torch.cat([cls.unsqueeze(1), tiles], dim=1)


def relative_positions(coords, members, valid) -> torch.Tensor:
    """``(R, L, 2)`` positions of each group's member tiles relative to the group's lowest
    ``(x, y)`` (``coords`` ``(M, 2)``)."""
    pos = coords[members]
    big = torch.iinfo(pos.dtype).max
    low = pos.masked_fill(~valid.unsqueeze(-1), big).min(dim=1, keepdim=True).values
    return (pos - low).masked_fill(~valid.unsqueeze(-1), 0)


class NeighbourhoodAttention(nn.Module):
    """Multi-head neighbourhood attention with the projections of ``SelfAttention``."""

    def __init__(self, dim, num_heads, kernel_size=3, subln=True, eps=1e-5, cls_pos=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"local attention kernel must be odd and >= 3, got {kernel_size}")
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=eps) if subln else None
        classes = distance_classes(kernel_size)
        self.register_buffer("bias_class", classes, persistent=False)
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, int(classes.max()) + 1))
        # cls_pos: the CLS sees where its tiles lie (2-D sin-cos of their position relative
        # to its input / region, projected onto keys and values); tiles stay position-free
        self.pos_proj = nn.Linear(dim, 2 * dim) if cls_pos else None

    def _pos_kv(self, coords, members, valid):
        if self.pos_proj is None:
            return None
        from slidessl.models.posenc import sincos_2d

        rel = relative_positions(coords, members, valid)
        emb = sincos_2d(rel, self.pos_proj.in_features, "xy").to(self.pos_proj.weight.dtype)
        out = self.pos_proj(emb)  # (R, L, 2E) -> (R, L, H, 2D): keys then values per head
        r, length, _ = out.shape
        h = self.num_heads
        k, v = out.view(r, length, 2, h, -1).unbind(2)
        return torch.cat([k, v], dim=-1)

    def project(self, y):
        """``(..., E)`` -> q, k, v ``(..., H, E / H)``."""
        shape = y.shape[:-1] + (self.num_heads, y.shape[-1] // self.num_heads)
        return (p(y).view(shape) for p in (self.q_proj, self.k_proj, self.v_proj))

    def finish(self, out):
        """``(..., H, D)`` attention output -> ``(..., E)`` through sub-LN and ``out_proj``."""
        out = out.flatten(-2)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)

    def forward_split(self, tiles, cls, neighbours, members, valid, coords=None):
        """Tile tokens ``(M, E)`` of one input and ``R`` CLS tokens ``(R, E)``, CLS ``r``
        attending to the tiles ``members[r]`` (``(R, L)``, ``valid`` marks real entries):
        the outputs ``(M, E)`` and ``(R, E)``."""
        qt, kt, vt = self.project(tiles)
        qc, kc, vc = self.project(cls)
        bias = self.rel_bias[:, self.bias_class]
        out_t = tile_attention(qt, kt, vt, neighbours, bias)
        pos_kv = None if coords is None else self._pos_kv(coords, members, valid)
        out_c = cls_attention(qc, kc, vc, kt, vt, members, valid, pos_kv)
        return self.finish(out_t), self.finish(out_c)

    def forward(self, x, padding_mask=None, neighbours=None, coords=None):
        if neighbours is None:
            raise ValueError("local attention needs the grid neighbour index of the tokens")
        q, k, v = self.project(x)
        bias = self.rel_bias[:, self.bias_class]  # (H, K)
        pos_kv = None
        if self.pos_proj is not None:
            if coords is None:
                raise ValueError("cls_pos local attention needs the tokens' grid coordinates")
            b, n = coords.shape[:2]
            valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
            if padding_mask is not None:
                valid = ~padding_mask[:, 1:]
            members = torch.arange(b * n, device=x.device).view(b, n)
            pos_kv = self._pos_kv(coords.reshape(b * n, 2), members, valid)
        return self.finish(local_attention(q, k, v, neighbours, bias, padding_mask, pos_kv))
