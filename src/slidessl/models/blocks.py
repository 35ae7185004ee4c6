"""Transformer blocks of the slide encoder (pre-norm, optional MAGNETO sub-LN).

Module names follow torchscale's encoder layer (``self_attn.{q,k,v,out}_proj``,
``self_attn.inner_attn_ln``, ``self_attn_layer_norm``, ``ffn.{fc1,fc2,ffn_layernorm}``,
``final_layer_norm``) so that Prov-GigaPath weights map one to one. Sub-LN is MAGNETO
(Wang et al., 2022, "Foundation Transformers", arXiv:2210.06423): an extra LayerNorm
before the attention output projection and before ``fc2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slidessl.models.alibi import alibi_attention, alibi_slopes
from slidessl.models.attention import dense_attention, dilated_attention_qkv
from slidessl.models.local_attention import NeighbourhoodAttention
from slidessl.models.presets import Attention, EncoderConfig, PosBias

__all__ = ["DropPath", "SelfAttention", "FeedForward", "Block"]


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016, "Deep Networks with Stochastic Depth")."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x, lengths=None):
        """``lengths``: ``x`` is a packed ``(1, T, E)`` stream of sequences of these lengths,
        each dropped or kept as a whole (one draw per sequence)."""
        if not self.training or self.p == 0.0:
            return x
        if lengths is None:
            keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        else:
            draws = x.new_empty(len(lengths)).bernoulli_(1.0 - self.p)
            reps = torch.as_tensor(lengths, device=x.device)
            keep = draws.repeat_interleave(reps, output_size=x.shape[1])[None, :, None]
        return x * keep / (1.0 - self.p)


class SelfAttention(nn.Module):
    """Multi-head self-attention, dense (``segments=None``) or LongNet dilated."""

    def __init__(
        self,
        dim,
        num_heads,
        segments=None,
        dilations=None,
        subln=True,
        eps=1e-5,
        exact_grad=True,
        alibi=False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if alibi and segments is not None:
            raise ValueError(
                "2-D ALiBi is implemented for dense attention only: set attention='dense' "
                "(or pos_bias='none' for dilated attention)"
            )
        self.num_heads = num_heads
        self.alibi = bool(alibi)
        if self.alibi:
            self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)
        self.segments = None if segments is None else list(segments)
        self.dilations = None if dilations is None else list(dilations)
        self.exact_grad = exact_grad
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=eps) if subln else None

    def qkv(self, x) -> torch.Tensor:
        """One GEMM for q, k and v: ``(B, N, H, 3, D)``, the three projections' weights
        interleaved per head (the parameters keep torchscale's q/k/v_proj names)."""
        b, n, e = x.shape
        h = self.num_heads
        w = torch.stack(
            [m.weight.view(h, e // h, e) for m in (self.q_proj, self.k_proj, self.v_proj)], 1
        )
        bias = torch.stack(
            [m.bias.view(h, e // h) for m in (self.q_proj, self.k_proj, self.v_proj)], 1
        )
        return F.linear(x, w.view(3 * e, e), bias.view(3 * e)).view(b, n, h, 3, e // h)

    def forward(self, x, padding_mask=None, coords=None, lengths=None):
        """``lengths``: ``x`` is a packed ``(1, T, E)`` stream of sequences of these lengths
        (varlen: each attends within itself; dense attention is one segment per sequence)."""
        b, n, e = x.shape
        qkv = self.qkv(x)
        if lengths is not None:
            if self.alibi:
                raise ValueError("2-D ALiBi attention does not take a packed (varlen) stream")
            segments = self.segments or [max(lengths)]
            out = dilated_attention_qkv(
                qkv, segments, self.dilations or [1], None, self.exact_grad, lengths
            )
        elif self.segments is not None and not self.alibi:
            out = dilated_attention_qkv(
                qkv, self.segments, self.dilations, padding_mask, exact_grad=self.exact_grad
            )
        elif self.alibi:
            if coords is None:
                raise ValueError("2-D ALiBi attention needs the tokens' grid coordinates")
            out = alibi_attention(*qkv.unbind(3), coords, self.slopes, padding_mask)
        else:
            out = dense_attention(*qkv.unbind(3), padding_mask)
        out = out.reshape(b, n, e)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)


class FeedForward(nn.Module):
    """``fc1 -> GELU -> [LayerNorm] -> fc2`` (torchscale's FFN with sub-LN)."""

    def __init__(self, dim, hidden, subln=True, eps=1e-5, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps) if subln else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = self.fc1(x)
        if y.dtype != torch.float32:  # GELU in float32, as torchscale
            y = F.gelu(y.float()).to(y.dtype)
        else:
            y = F.gelu(y)
        if self.ffn_layernorm is not None:
            y = self.ffn_layernorm(y)
        y = self.fc2(y)
        return self.dropout(y) if self.dropout.p > 0 else y


class Block(nn.Module):
    """Pre-norm block ``layer`` (0-based) of an encoder of config ``cfg``: ``x + attn(LN(x))``,
    then ``x + ffn(LN(x))``. The first ``cfg.local_depth`` blocks attend to grid
    neighbourhoods (`NeighbourhoodAttention`), the others globally (`SelfAttention`: dense,
    dilated, or with 2-D ALiBi); ``drop_path`` is this block's stochastic-depth rate."""

    def __init__(self, cfg: EncoderConfig, layer: int = 0, drop_path: float = 0.0):
        super().__init__()
        dim, heads, eps = cfg.embed_dim, cfg.num_heads, cfg.block_eps
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.local = layer < cfg.local_depth
        if self.local:
            self.self_attn = NeighbourhoodAttention(
                dim, heads, cfg.local_kernel, cfg.subln, eps, cfg.cls_pos
            )
        else:
            dilated = cfg.attention == Attention.dilated
            self.self_attn = SelfAttention(
                dim,
                heads,
                cfg.segments if dilated else None,
                cfg.dilations if dilated else None,
                cfg.subln,
                eps,
                cfg.exact_grad,
                cfg.pos_bias == PosBias.alibi2d,
            )
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, cfg.mlp_dim, cfg.subln, eps, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, padding_mask=None, neighbours=None, coords=None, lengths=None
    ) -> torch.Tensor:
        """``neighbours``: the grid neighbour index a local block needs; ``coords`` (B, N, 2):
        the tiles' grid positions a 2-D ALiBi block needs (each ignored otherwise);
        ``lengths``: ``x`` is a packed (1, T, E) stream of sequences (see `SelfAttention`)."""
        if self.local:
            if lengths is not None:
                raise ValueError("local (neighbourhood) blocks do not take a packed stream")
            y = self.self_attn(self.self_attn_layer_norm(x), padding_mask, neighbours, coords)
        else:
            y = self.self_attn(self.self_attn_layer_norm(x), padding_mask, coords, lengths)
        if self.dropout.p > 0:
            y = self.dropout(y)
        x = x + self.drop_path(y, lengths)
        x = x + self.drop_path(self.ffn(self.final_layer_norm(x)), lengths)
        return x

    def cls_attention(self, x: torch.Tensor, padding_mask=None) -> torch.Tensor:
        """``(B, N)`` float32: the dense softmax attention of the CLS query over the tile keys
        for this block's input ``x`` (B, 1+N, E) (CLS first), averaged over heads; padded
        tiles (``padding_mask`` (B, N) True) get none. Dense whatever the block's attention:
        LongNet's segment / dilation sparsity and the CLS's weight on itself are left out."""
        hn = self.self_attn_layer_norm(x)
        b, _, e = hn.shape
        heads = self.self_attn.num_heads
        q = self.self_attn.q_proj(hn[:, :1]).view(b, 1, heads, e // heads)
        k = self.self_attn.k_proj(hn[:, 1:]).view(b, -1, heads, e // heads)
        logits = torch.einsum("bqhd,bnhd->bhn", q, k) / math.sqrt(e // heads)
        if padding_mask is not None:
            logits = logits.masked_fill(padding_mask[:, None, :], float("-inf"))
        return torch.softmax(logits.float(), dim=-1).mean(dim=1)

    def forward_split(self, tiles, cls, neighbours, members, valid, coords=None):
        """A local block on the tile tokens ``(M, E)`` of one input and ``R`` CLS tokens
        ``(R, E)``, each attending to its own member tiles (see
        ``NeighbourhoodAttention.forward_split``); returns the new ``(tiles, cls)``."""
        if not self.local:
            raise ValueError("forward_split needs a local (neighbourhood-attention) block")
        yt, yc = self.self_attn.forward_split(
            self.self_attn_layer_norm(tiles),
            self.self_attn_layer_norm(cls),
            neighbours,
            members,
            valid,
            coords,
        )
        tiles, cls = (
            tiles + self.drop_path(self.dropout(yt)),
            cls + self.drop_path(self.dropout(yc)),
        )
        tiles = tiles + self.drop_path(self.ffn(self.final_layer_norm(tiles)))
        cls = cls + self.drop_path(self.ffn(self.final_layer_norm(cls)))
        return tiles, cls
