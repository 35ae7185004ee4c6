"""Prov-GigaPath's published slide encoder, rebuilt around torchscale-gml 0.2.3 for tests.

Imported by the reference tests only after ``pytest.importorskip("einops")`` and
``pytest.importorskip("torchscale")``: torchscale-gml (installed with ``--no-deps``) and
einops are the optional reference packages. Their training-only imports (fairscale's
checkpoint wrapper, timm's drop_path) are replaced by stand-ins, and the GPU-only
``flash_attn_func`` by an exact math version returning ``(out, lse)``; nothing those do
runs in eval mode.

:class:`PublishedLongNetViT` follows ``gigapath/slide_encoder.py`` line by line:
``coords_to_pos`` (``floor(coords / 256)``, ``x * 1000 + y + 1``, no origin shift),
``pos_embed`` rows of MAE's ``get_2d_sincos_pos_embed(E, 1000, cls_token=True)`` (row 0 the
zero CLS row; the 1,000,001-row table is read through :class:`LazyMaeTable`, which computes
the rows asked for and fails past the end as indexing the real table does), CLS plus row 0,
torchscale's LongNet encoder on the tokens in the order given, and the ``global_pool`` /
CLS outcomes of every state.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import torch


def install_stand_ins() -> None:
    if "fairscale.nn" not in sys.modules:
        fairscale, nn_mod = types.ModuleType("fairscale"), types.ModuleType("fairscale.nn")
        nn_mod.checkpoint_wrapper = lambda m, *a, **k: m
        nn_mod.wrap = lambda m, *a, **k: m
        fairscale.nn = nn_mod
        sys.modules.update({"fairscale": fairscale, "fairscale.nn": nn_mod})
    if "timm.models.layers" not in sys.modules:
        try:
            import timm.models.layers  # noqa: F401
        except ImportError:
            timm, models, layers = (
                types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers")
            )
            layers.drop_path = lambda x, p=0.0, training=False: x
            timm.models, models.layers = models, layers
            sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


install_stand_ins()

from torchscale.architecture import encoder as ts_encoder  # noqa: E402
from torchscale.architecture.config import EncoderConfig  # noqa: E402
from torchscale.component import multihead_attention as ts_mha  # noqa: E402
from torchscale.component.dilated_attention import DilatedAttention  # noqa: E402

# LongNetViT.get_optimal_segment_length(262144, 256) and make_longnet_from_name's ratios
SEGMENTS = "[1024, 5792, 32768, 185363, 1048576]"
RATIOS = "[1, 2, 4, 8, 16]"
NGRIDS, TILE = 1000, 256


def flash_math(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):
    """Exact stand-in for flash_attn_func: (b, l, h, d) in, (out, lse (b, h, l)) out."""
    assert dropout == 0.0 and bias is None and not is_causal
    scale = softmax_scale or q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)
    return out, lse


def use_flash_math(monkeypatch) -> None:
    monkeypatch.setattr(ts_mha, "flash_attn_func", flash_math)


class _Layer(ts_encoder.EncoderLayer):  # gigapath/torchscale/model/LongNet.py
    def build_self_attention(self, embed_dim, args):
        return DilatedAttention(
            args,
            embed_dim,
            args.encoder_attention_heads,
            dropout=args.attention_dropout,
            self_attention=True,
            encoder_decoder_attention=False,
            subln=args.subln,
        )


class _LongNet(ts_encoder.Encoder):
    def build_encoder_layer(self, args, depth, is_moe_layer=False, is_encoder_decoder=False):
        return _Layer(args, depth, is_moe_layer=is_moe_layer, is_encoder_decoder=is_encoder_decoder)


def dilated_attention_module(embed_dim, heads, segments: str, ratios: str) -> DilatedAttention:
    """torchscale's DilatedAttention alone (flash path, as LongNet configures it)."""
    args = EncoderConfig(
        encoder_embed_dim=embed_dim,
        encoder_attention_heads=heads,
        dilated_ratio=ratios,
        segment_length=segments,
        flash_attention=True,
    )
    return DilatedAttention(args, embed_dim, heads, self_attention=True, subln=False)


def mae_1d(embed_dim, pos):
    """gigapath/pos_embed.py get_1d_sincos_pos_embed_from_grid, written out."""
    omega = np.arange(embed_dim // 2, dtype=float)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_table(embed_dim, grid_size, cls_token=True):
    """get_2d_sincos_pos_embed, written out (whole table: only for small sizes)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([mae_1d(embed_dim // 2, grid[0]), mae_1d(embed_dim // 2, grid[1])], 1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


class LazyMaeTable:
    """``mae_table(E, 1000, cls_token=True)`` as float32, rows computed when indexed."""

    def __init__(self, embed_dim, grid_size=NGRIDS):
        self.embed_dim, self.grid_size = embed_dim, grid_size
        self.rows = grid_size * grid_size + 1

    def __getitem__(self, pos: torch.Tensor) -> torch.Tensor:
        flat = pos.reshape(-1).numpy().astype(np.int64)
        if flat.size and (flat.max() >= self.rows or flat.min() < -self.rows):
            raise IndexError(f"index {flat.max()} is out of bounds for size {self.rows}")
        flat = np.where(flat < 0, flat + self.rows, flat)
        k = flat - 1  # table row k + 1 is grid cell k; meshgrid(grid_w, grid_h) -> w = k % n
        w = (k % self.grid_size).astype(np.float32)
        h = (k // self.grid_size).astype(np.float32)
        half = self.embed_dim // 2
        emb = np.concatenate([mae_1d(half, w), mae_1d(half, h)], 1)
        emb[flat == 0] = 0.0
        out = torch.from_numpy(emb).float()
        return out.view(*pos.shape, self.embed_dim)


class PublishedLongNetViT(torch.nn.Module):
    """``gigapath.slide_encoder.LongNetViT`` (eval-mode forward), on torchscale-gml."""

    def __init__(
        self,
        in_chans=1536,
        embed_dim=768,
        depth=12,
        mlp_ratio=4,
        heads=16,
        global_pool=False,
        segment_length=SEGMENTS,
        dilated_ratio=RATIOS,
    ):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Linear(in_chans, embed_dim)
        self.tile_size, self.slide_ngrids = TILE, NGRIDS
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = LazyMaeTable(embed_dim)
        args = EncoderConfig(
            encoder_layers=depth,
            encoder_embed_dim=embed_dim,
            encoder_ffn_embed_dim=int(embed_dim * mlp_ratio),
            encoder_attention_heads=heads,
            dilated_ratio=dilated_ratio,
            segment_length=segment_length,
            flash_attention=True,
            block_shift=True,
            dropout=0.25,
            drop_path_rate=0.1,
        )
        self.encoder = _LongNet(args)
        self.norm = torch.nn.LayerNorm(embed_dim, eps=1e-6)
        self.global_pool = global_pool

    def randomize(self, generator: torch.Generator) -> PublishedLongNetViT:
        """Random weights in which every key matters: the published init for linears, plus
        random CLS, biases and LayerNorm affines."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("cls_token"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=generator))
                elif p.ndim == 2:
                    torch.nn.init.xavier_uniform_(p, generator=generator)
                elif "norm" in name or "_ln" in name:
                    base = 1.0 if name.endswith("weight") else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=generator))
        return self.eval()

    def coords_to_pos(self, coords, tile_size: int = TILE):
        coords_ = torch.floor(coords / tile_size)
        pos = coords_[..., 0] * self.slide_ngrids + coords_[..., 1]
        return pos.long() + 1  # add 1 for the cls token

    def states(self, x, coords):
        """torchscale's encoder_states for ``forward(x, coords, all_layer_embed=True)`` and
        its ``encoder_out`` (``forward(x, coords)``)."""
        x = self.patch_embed.proj(x)
        pos = self.coords_to_pos(coords, self.tile_size)
        x = x + self.pos_embed[pos]
        cls_token = self.cls_token + self.pos_embed[torch.zeros(1, 1, dtype=torch.long)]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        res = self.encoder(src_tokens=None, token_embeddings=x, return_all_hiddens=True)
        return res["encoder_states"], res["encoder_out"]

    def outcome(self, x, global_pool=None):
        if self.global_pool if global_pool is None else global_pool:
            return self.norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, x, coords, all_layer_embed=False):
        states, out = self.states(x, coords)
        return [self.outcome(h) for h in (states if all_layer_embed else [out])]

    @torch.no_grad()
    def pipeline(self, tile_embeds, coords) -> dict:
        """``gigapath.pipeline.run_inference_with_slide_encoder`` (float32 on the CPU, no
        autocast) for both ``global_pool`` settings from one encoder pass:
        ``{False: {"layer_0_embed", ..., "last_layer_embed"}, True: {...}}``, plus
        ``"forward"``: ``{False, True}`` -> ``forward(x, coords)[0]``."""
        if len(tile_embeds.shape) == 2:
            tile_embeds, coords = tile_embeds.unsqueeze(0), coords.unsqueeze(0)
        self.eval()
        states, out = self.states(tile_embeds, coords)
        result = {"forward": {}}
        for global_pool in (False, True):
            slide_embeds = [self.outcome(h, global_pool) for h in states]
            outputs = {f"layer_{i}_embed": e for i, e in enumerate(slide_embeds)}
            outputs["last_layer_embed"] = slide_embeds[-1]
            result[global_pool] = outputs
            result["forward"][global_pool] = self.outcome(out, global_pool)
        return result


def published_state_dict(model: PublishedLongNetViT) -> dict:
    """What ``torch.save({"model": model.state_dict()})`` holds for the published model."""
    return {k: v.clone() for k, v in model.state_dict().items()}
