"""Prov-GigaPath's published LongNet (torchscale-gml==0.2.3) vs our import, on CPU.

Optional: skipped unless ``torchscale`` (torchscale-gml 0.2.3, installed with --no-deps)
and ``einops`` are importable. Its training-only imports (fairscale's checkpoint wrapper,
timm's drop_path) are replaced by stand-ins, and its GPU-only ``flash_attn_func`` by an
exact math version returning ``(out, lse)``: nothing they do runs in eval mode.
"""

import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("einops")


def _install_stand_ins():
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


_install_stand_ins()
ts_encoder = pytest.importorskip("torchscale.architecture.encoder")
from torchscale.architecture.config import EncoderConfig  # noqa: E402
from torchscale.component import multihead_attention as ts_mha  # noqa: E402
from torchscale.component.dilated_attention import DilatedAttention  # noqa: E402

from slidessl.models.gigapath import gigapath_forward, load_gigapath  # noqa: E402

pytestmark = pytest.mark.reference
E, DEPTH, HEADS, MLP, IN = 64, 2, 16, 128, 32
SEGMENTS = "[1024, 5792, 32768, 185363, 1048576]"


def _flash_math(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):
    """Exact stand-in for flash_attn_func: (b, l, h, d) in, (out, lse (b, h, l)) out."""
    scale = softmax_scale or q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)
    return out, lse


class _Layer(ts_encoder.EncoderLayer):
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


def _mae_rows(flat, dim):
    """Rows ``flat`` of MAE's 1000 x 1000 get_2d_sincos_pos_embed table (CLS excluded)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = flat % 1000, flat // 1000  # meshgrid(grid_w, grid_h) flattened row-major
    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], 1).astype(np.float32)


class _PublishedViT(torch.nn.Module):
    """Prov-GigaPath's LongNetViT forward, rebuilt around the torchscale encoder."""

    def __init__(self, global_pool):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Linear(IN, E)
        self.cls_token = torch.nn.Parameter(0.02 * torch.randn(1, 1, E))
        args = EncoderConfig(
            encoder_layers=DEPTH,
            encoder_embed_dim=E,
            encoder_ffn_embed_dim=MLP,
            encoder_attention_heads=HEADS,
            dilated_ratio="[1, 2, 4, 8, 16]",
            segment_length=SEGMENTS,
            flash_attention=True,
            block_shift=True,
            dropout=0.0,
            drop_path_rate=0.0,
        )
        self.encoder = _LongNet(args)
        self.norm = torch.nn.LayerNorm(E, eps=1e-6)
        self.global_pool = global_pool
        with torch.no_grad():  # non-trivial norms so that every key matters
            for name, p in self.named_parameters():
                if "norm" in name or "layernorm" in name or "_ln" in name:
                    p.add_(0.1 * torch.randn_like(p))

    def forward(self, x, grid, all_layer_embed=False):
        flat = (grid[..., 0] * 1000 + grid[..., 1]).numpy()
        pos = torch.from_numpy(_mae_rows(flat.reshape(-1), E)).view(*flat.shape, E)
        x = self.patch_embed.proj(x) + pos
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        res = self.encoder(src_tokens=None, token_embeddings=x, return_all_hiddens=all_layer_embed)
        states = res["encoder_states"] if all_layer_embed else [res["encoder_out"]]
        if self.global_pool:
            return [self.norm(h[:, 1:].mean(1)) for h in states]
        return [self.norm(h)[:, 0] for h in states]


@pytest.mark.parametrize("n_tiles,global_pool", [(255, False), (255, True), (2047, False)])
def test_matches_published_longnet(tmp_path, monkeypatch, n_tiles, global_pool):
    monkeypatch.setattr(ts_mha, "flash_attn_func", _flash_math)
    torch.manual_seed(n_tiles)
    ref = _PublishedViT(global_pool).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "slide_encoder.pth")
    ours = load_gigapath(
        tmp_path / "slide_encoder.pth",
        global_pool=global_pool,
        depth=DEPTH,
        embed_dim=E,
        mlp_dim=MLP,
        in_dim=IN,
    )
    b = 2 if n_tiles < 1000 else 1
    x = torch.randn(b, n_tiles, IN)
    grid = torch.stack(
        [torch.randint(0, 1000, (b, n_tiles)), torch.randint(0, 1000, (b, n_tiles))], -1
    )
    with torch.no_grad():
        # the long case exercises multi-segment branches; per-layer outputs are checked short
        for all_layers in (False, True) if n_tiles < 1000 else (False,):
            expect = ref(x, grid, all_layers)
            got = gigapath_forward(ours, x, grid, all_layers)
            assert len(got) == len(expect) == (DEPTH + 1 if all_layers else 1)
            for a, e in zip(got, expect):
                rel = ((a - e).norm() / e.norm()).item()
                assert rel < 1e-4, rel
