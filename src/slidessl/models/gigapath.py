"""Prov-GigaPath's slide encoder: weight import and its published forward.

Prov-GigaPath (Xu et al., 2024, Nature, "A whole-slide foundation model for digital
pathology from real-world data") publishes ``slide_encoder.pth``: a dict whose ``"model"``
entry is the state dict of its ``LongNetViT`` (torchscale LongNet encoder, MAGNETO sub-LN,
16 heads, MLP ratio 4; the released weights are ``gigapath_slide_enc12l768d``, 12 layers x
768; ``gigapath_slide_enc24l1024d`` and ``gigapath_slide_enc12l1536d`` are the other
registered sizes). :func:`load_gigapath` reads depth, width, MLP width and input width from
the checkpoint itself. Keys map one to one onto :class:`SlideEncoder`:

=========================================  ==========================
Prov-GigaPath                              slidessl
=========================================  ==========================
``patch_embed.proj.{weight,bias}``         ``patch_embed.*``
``cls_token``                              ``cls_token``
``encoder.layers.{i}.<rest>``              ``blocks.{i}.<rest>``
``encoder.layer_norm.*``                   ``encoder_norm.*``
``norm.*``                                 ``norm.*``
``pos_embed`` (fixed sin-cos, if present)  recomputed on the fly
=========================================  ==========================

``mask_token`` (iBOT) does not exist there and keeps its random init (N(0, 0.02)).

Two position conventions exist in slidessl; this module implements the second:

- slidessl's own encoders (``SlideEncoder.forward``): tokens in spatial order (Hilbert),
  origin-free integer grid positions, padding masked everywhere;
- the published Prov-GigaPath forward (:func:`gigapath_forward`, used by ``slidessl embed
  gigapath:PATH``): tokens in the order given (the file's rows), positions
  ``floor(coords / 256)`` in the file's own frame (no origin shift) looked up in the
  1000 x 1000 MAE sin-cos table at row ``gx * 1000 + gy + 1``, CLS plus the table's zero
  row 0, and LongNet exactly as torchscale computes it: every branch pads its partial
  segments with zero keys (and zero values) that take part in the softmax
  (:func:`published_dilated_attention`).

Example::

    enc = load_gigapath("slide_encoder.pth")
    grid = pixel_to_grid(coords_px)                    # floor(coords / 256), file order
    outs = gigapath_forward(enc, x, grid, all_layer_embed=True)   # 13 vectors (B, 768)
    last = outs[-1]                                    # the pipeline's "last_layer_embed"
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from slidessl.models.attention import dense_attention
from slidessl.models.dilated.lse import attention_with_lse
from slidessl.models.encoder import SlideEncoder, build_encoder
from slidessl.models.io import load_state_strict
from slidessl.models.posenc import check_gigapath_table, sincos_2d

__all__ = [
    "GIGAPATH_HEADS",
    "GIGAPATH_TILE_PX",
    "PUBLISHED_ARCHS",
    "convert_gigapath_state",
    "gigapath_arch",
    "gigapath_forward",
    "gigapath_pool",
    "load_gigapath",
    "pixel_to_grid",
    "published_arch_name",
    "published_dilated_attention",
    "published_states",
]

log = logging.getLogger(__name__)

GIGAPATH_TILE_PX = 256  # LongNetViT.tile_size: one position = 256 px at the tiling level
GIGAPATH_HEADS = 16  # every LongNet_*_dim config behind a registered slide encoder
# timm names registered in gigapath/slide_encoder.py: (depth, width); MLP ratio 4 for all
PUBLISHED_ARCHS = {
    "gigapath_slide_enc12l768d": (12, 768),
    "gigapath_slide_enc24l1024d": (24, 1024),
    "gigapath_slide_enc12l1536d": (12, 1536),
}
_TORCHSCALE_NOT_COVERED = -1.0e8  # torchscale's lse fill where a head skips a position

_RULES = (
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"patch_embed.\1"),
    (re.compile(r"^cls_token$"), "cls_token"),
    (re.compile(r"^encoder\.layers\.(\d+)\.(.+)$"), r"blocks.\1.\2"),
    (re.compile(r"^encoder\.layer_norm\.(weight|bias)$"), r"encoder_norm.\1"),
    (re.compile(r"^norm\.(weight|bias)$"), r"norm.\1"),
)
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_DERIVED = ("pos_embed",)  # fixed buffers recomputed here
_OURS_ONLY = ("mask_token",)


def convert_gigapath_state(state: dict, source="slide_encoder.pth") -> tuple[dict, list[str]]:
    """Rename Prov-GigaPath keys; returns ``(state, unknown_keys)``."""
    out, unknown = {}, []
    for key, value in state.items():
        if key in _DERIVED:
            continue
        for pattern, repl in _RULES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def gigapath_arch(state: dict, source="slide_encoder.pth") -> dict:
    """The architecture of a Prov-GigaPath state dict, as :func:`build_encoder` overrides.

    Depth (number of ``encoder.layers.{i}``), width and tile-feature width
    (``patch_embed.proj.weight``), MLP width (``fc1``), sub-LN and the encoder LayerNorm come
    from the keys and shapes; the head count cannot (it is not in any weight's shape) and is
    16, that of every registered Prov-GigaPath slide encoder.
    """
    w = state.get("patch_embed.proj.weight")
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise ValueError(
            f"{source}: no 'patch_embed.proj.weight' matrix: not a Prov-GigaPath slide "
            "encoder state dict"
        )
    layers = sorted({int(m.group(1)) for key in state if (m := _LAYER.match(key))})
    if layers != list(range(len(layers))):
        raise ValueError(
            f"{source}: encoder layers are numbered {layers}, not 0..{len(layers) - 1}"
        )
    embed_dim, in_dim = (int(s) for s in w.shape)
    fc1 = state.get("encoder.layers.0.ffn.fc1.weight")
    return dict(
        in_dim=in_dim,
        embed_dim=embed_dim,
        depth=len(layers),
        num_heads=GIGAPATH_HEADS,
        mlp_dim=int(fc1.shape[0]) if isinstance(fc1, torch.Tensor) else 4 * embed_dim,
        subln=not layers or "encoder.layers.0.self_attn.inner_attn_ln.weight" in state,
        encoder_norm="encoder.layer_norm.weight" in state,
    )


def published_arch_name(cfg: dict) -> str | None:
    """The registered timm name of an architecture (``gigapath_arch`` dict or encoder
    config), or None."""
    for name, (depth, width) in PUBLISHED_ARCHS.items():
        if (cfg["depth"], cfg["embed_dim"], cfg["mlp_dim"]) == (depth, width, 4 * width):
            return name
    return None


def load_gigapath(path, global_pool: bool = False, map_location="cpu", **overrides):
    """Build a slide encoder of the checkpoint's architecture and load it strictly.

    The architecture is read from the checkpoint (:func:`gigapath_arch`); ``overrides``
    reach :func:`build_encoder` and win (e.g. ``num_heads`` for a non-published model). Any
    key that is missing, unexpected or of the wrong shape is reported by name in one
    ``ValueError`` that names the file. ``global_pool`` sets ``pool="mean"``. Returns the
    encoder in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Prov-GigaPath slide_encoder.pth not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / unsafe pickles
        raise ValueError(f"{path}: cannot read the checkpoint ({exc})") from exc
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with a 'model' state dict")
    converted, unknown = convert_gigapath_state(state, path)
    if unknown:
        raise ValueError(
            f"{path}: unexpected Prov-GigaPath key(s) ({len(unknown)}): "
            + ", ".join(sorted(unknown)[:20])
        )
    cfg = {**gigapath_arch(state, path), **overrides}
    cfg.setdefault("pool", "mean" if global_pool else "cls")
    encoder = build_encoder("gigapath", **cfg)
    own = encoder.state_dict()
    for key in _OURS_ONLY:
        converted.setdefault(key, own[key])
    load_state_strict(encoder, converted, path)
    c = encoder.config
    log.info(
        "%s: Prov-GigaPath slide encoder %s: %d layers x %d, %d heads, MLP %d, %d-dim tiles",
        path,
        published_arch_name(c) or "(not a registered size)",
        c["depth"],
        c["embed_dim"],
        c["num_heads"],
        c["mlp_dim"],
        c["in_dim"],
    )
    return encoder.eval()


def pixel_to_grid(coords: torch.Tensor, tile_size: float = GIGAPATH_TILE_PX) -> torch.Tensor:
    """Prov-GigaPath's ``floor(coords / tile_size)`` as long grid positions (no origin shift)."""
    return torch.floor(coords.to(torch.float64) / tile_size).long()


def published_dilated_attention(q, k, v, segments, dilations) -> torch.Tensor:
    """LongNet dilated attention as torchscale-gml 0.2.3 computes it; ``(B, N, H, D)`` in/out.

    Per branch ``(w, r)``: ``w = min(w, N)``; the sequence is zero-padded to whole segments
    of ``w`` and each segment to a multiple of ``r``; head ``h`` keeps the offsets
    ``h // ceil(H / r) + r * l``; the zero rows are keys and values like any other (score
    0, so they take softmax mass and shrink the output; no mask). Outputs go back by
    concatenating the padded segments and cutting at ``N``, as torchscale does (which
    shifts later segments when ``r`` does not divide ``w``: only for branches with more
    than one such segment, e.g. ``w = 185363, r = 8`` past 185,363 tokens). Branches are
    combined with weights ``softmax_branch(lse)``; a position a head skips gets
    ``lse = -1e8``, and so does an exact ``lse == 0``, as there.

    For inference (no gradient through the weights, as published). Use
    :func:`slidessl.models.attention.dilated_attention` for training: it masks padding.
    """
    b, n, h, d = q.shape
    outs, lses = [], []
    for segment, r in zip(segments, dilations):
        w = min(int(segment), n)
        n_seg, rows, hp = -(-n // w), -(-w // r), -(-h // r) * r

        def sparse(t, w=w, n_seg=n_seg, rows=rows, r=r, hp=hp):
            """(B, N, H, D) -> (B * S, H, L, D): zero-pad sequence, segments and heads, then
            head group j keeps column j of each segment's (L, r) view (a diagonal)."""
            t = F.pad(t, (0, 0, 0, 0, 0, n_seg * w - n)).view(b, n_seg, w, h, d)
            t = F.pad(t, (0, 0, 0, hp - h, 0, rows * r - w))
            t = t.view(b, n_seg, rows, r, r, hp // r, d).diagonal(dim1=3, dim2=4)
            t = t.permute(0, 1, 5, 3, 2, 4).reshape(b * n_seg, hp, rows, d)
            return t[:, :h]

        out, lse = attention_with_lse(sparse(q), sparse(k), sparse(v), None, exact_grad=False)
        lse = lse.masked_fill(lse == 0, _TORCHSCALE_NOT_COVERED)
        out = F.pad(out, (0, 0, 0, 0, 0, hp - h)).view(b, n_seg, r, hp // r, rows, d)
        lse = F.pad(lse, (0, 0, 0, hp - h), value=_TORCHSCALE_NOT_COVERED)
        lse = lse.view(b, n_seg, r, hp // r, rows)
        dense = out.new_zeros(b, n_seg, rows, r, r, hp // r, d)
        dense.diagonal(dim1=3, dim2=4).copy_(out.permute(0, 1, 4, 3, 5, 2))
        lse_dense = lse.new_full((b, n_seg, rows, r, r, hp // r), _TORCHSCALE_NOT_COVERED)
        lse_dense.diagonal(dim1=3, dim2=4).copy_(lse.permute(0, 1, 4, 3, 2))
        outs.append(dense.view(b, n_seg * rows * r, hp, d)[:, :n, :h])
        lses.append(lse_dense.view(b, n_seg * rows * r, hp)[:, :n, :h])
    weights = torch.softmax(torch.stack(lses), dim=0)  # (branches, B, N, H)
    result = outs[0] * weights[0].unsqueeze(-1).to(outs[0].dtype)
    for out, weight in zip(outs[1:], weights[1:]):
        result = result + out * weight.unsqueeze(-1).to(out.dtype)
    return result


def _published_block(blk, x: torch.Tensor) -> torch.Tensor:
    """One torchscale ``EncoderLayer`` (pre-norm, sub-LN) with the published attention."""
    attn = blk.self_attn
    y = blk.self_attn_layer_norm(x)
    b, n, e = y.shape
    heads = attn.num_heads
    q, k, v = (p(y).view(b, n, heads, e // heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if attn.segments is None:
        o = dense_attention(q, k, v)
    else:
        o = published_dilated_attention(q, k, v, attn.segments, attn.dilations)
    o = o.reshape(b, n, e)
    if attn.inner_attn_ln is not None:
        o = attn.inner_attn_ln(o)
    x = x + attn.out_proj(o)
    return x + blk.ffn(blk.final_layer_norm(x))


def published_states(
    encoder: SlideEncoder, x: torch.Tensor, grid: torch.Tensor, extrapolate: bool = False
) -> list[torch.Tensor]:
    """torchscale's ``encoder_states`` of ``LongNetViT.forward``: the block input and every
    block's raw output, each ``(B, 1 + N, E)`` with the CLS token first.

    ``x`` (B, N, in_dim) and ``grid`` (B, N, 2) integer table positions ``(gx, gy)``
    (:func:`pixel_to_grid`), tokens in the order given. Positions outside the 1000 x 1000
    table raise ``ValueError`` unless ``extrapolate`` (see
    :func:`slidessl.models.posenc.check_gigapath_table`).
    """
    encoder._check(x, grid, None, None)
    if encoder.grid_context is not None or any(getattr(b, "local", False) for b in encoder.blocks):
        raise ValueError(
            "the published Prov-GigaPath forward has no grid context and no local attention "
            "blocks; this encoder has one"
        )
    check_gigapath_table(grid, extrapolate)
    h = encoder.patch_embed(x) + sincos_2d(grid, encoder.embed_dim, "gigapath").to(x.dtype)
    cls = encoder.cls_token.to(h.dtype)  # + pos_embed[:, :1], the table's zero row
    h = torch.cat([cls.expand(h.shape[0], -1, -1), h], dim=1)
    states = [h]
    for blk in encoder.blocks:
        h = _published_block(blk, h)
        states.append(h)
    return states


def gigapath_pool(encoder: SlideEncoder, h: torch.Tensor, global_pool: bool) -> torch.Tensor:
    """``LongNetViT``'s outcome of one state: ``norm(mean of the tile tokens)`` with
    ``global_pool``, else ``norm(h)`` at the CLS token."""
    if global_pool:
        return encoder.norm(h[:, 1:].mean(dim=1))
    return encoder.norm(h)[:, 0]


def gigapath_forward(
    encoder: SlideEncoder,
    x,
    grid,
    all_layer_embed: bool = False,
    global_pool: bool | None = None,
    extrapolate: bool = False,
) -> list[torch.Tensor]:
    """The list that Prov-GigaPath's ``LongNetViT.forward(x, coords, all_layer_embed)`` returns.

    With ``all_layer_embed`` (what ``gigapath.pipeline.run_inference_with_slide_encoder``
    calls, ``layer_{i}_embed``): the block input and every block output, pooled (no encoder
    LayerNorm: torchscale keeps the states before it), ``depth + 1`` vectors; its last is
    the pipeline's ``last_layer_embed``. Otherwise one vector, pooled after the encoder
    LayerNorm (``encoder_out``). ``global_pool`` defaults to the encoder's ``pool == "mean"``.
    ``grid`` holds table positions, e.g. ``pixel_to_grid(coords)``.
    """
    if global_pool is None:
        global_pool = encoder.config["pool"] == "mean"
    states = published_states(encoder, x, grid, extrapolate)
    if all_layer_embed:
        return [gigapath_pool(encoder, h, global_pool) for h in states]
    last = states[-1] if encoder.encoder_norm is None else encoder.encoder_norm(states[-1])
    return [gigapath_pool(encoder, last, global_pool)]
