"""The slide encoder's options: their defaults, the named presets, and the check that
turns a partial option dict into the full, validated ``SlideEncoder.config``."""

from __future__ import annotations

from slidessl.models.dilated.plan import validate_branches
from slidessl.models.posenc import POS_MODES

__all__ = [
    "DEFAULTS",
    "DEFAULT_DILATIONS",
    "DEFAULT_SEGMENTS",
    "GIGAPATH_DILATIONS",
    "GIGAPATH_SEGMENTS",
    "PRESETS",
    "encoder_config",
]

# Chosen from `slidessl bench attention` (docs/performance.md): 10x fewer attention FLOPs
# than dense at 16k tokens while every token still sees a 1024-token neighbourhood at r=1.
DEFAULT_SEGMENTS = (1024, 4096, 16384, 65536)
DEFAULT_DILATIONS = (1, 4, 8, 16)
GIGAPATH_SEGMENTS = (1024, 5792, 32768, 185363, 1048576)
GIGAPATH_DILATIONS = (1, 2, 4, 8, 16)

DEFAULTS = dict(
    in_dim=1536,
    embed_dim=768,
    depth=12,
    num_heads=16,
    mlp_dim=3072,
    attention="dilated",
    segments=DEFAULT_SEGMENTS,
    dilations=DEFAULT_DILATIONS,
    subln=True,
    subln_init=True,
    encoder_norm=False,
    block_eps=1e-5,
    norm_eps=1e-6,
    pos_mode="xy",
    pool="cls",
    drop_path_rate=0.0,
    dropout=0.0,
    grad_checkpointing=False,
    exact_grad=True,
    grid_context=0,  # odd k > 0: a k x k depthwise conv over the tile grid before the blocks
    input_center=False,  # subtract each input's (slide's or crop's) mean tile feature first
    local_kernel=0,  # odd k >= 3: the first `local_depth` blocks attend to k x k grid neighbours
    local_depth=0,
    pos_bias="none",  # "alibi2d": the global (non-local) blocks get TITAN's 2-D ALiBi bias
    cls_pos=False,  # local blocks: the CLS sees its tiles' positions (relative to its input)
)

PRESETS: dict[str, dict] = {
    # CPU demo / tests: trains in minutes
    "tiny": dict(
        in_dim=64,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_dim=128,
        segments=(64, 256, 1024),
        dilations=(1, 2, 4),
    ),
    "small": dict(in_dim=1536, embed_dim=256, depth=6, num_heads=8, mlp_dim=1024),
    "base": dict(in_dim=1536, embed_dim=768, depth=12, num_heads=16, mlp_dim=3072),
    # Prov-GigaPath slide encoder (gigapath_slide_enc12l768d) layout and positions
    "gigapath": dict(
        in_dim=1536,
        embed_dim=768,
        depth=12,
        num_heads=16,
        mlp_dim=3072,
        segments=GIGAPATH_SEGMENTS,
        dilations=GIGAPATH_DILATIONS,
        encoder_norm=True,
        pos_mode="gigapath",
        drop_path_rate=0.1,
    ),
}


def encoder_config(config: dict) -> dict:
    """The full encoder config: ``config`` over :data:`DEFAULTS`, checked (an unknown option
    or an invalid choice raises ``ValueError`` naming it)."""
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown SlideEncoder option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}"
        )
    cfg = {**DEFAULTS, **config}
    cfg["segments"], cfg["dilations"] = (
        list(t) for t in validate_branches(cfg["segments"], cfg["dilations"])
    )
    if cfg["attention"] not in ("dilated", "dense"):
        raise ValueError(f"attention must be 'dilated' or 'dense', got {cfg['attention']!r}")
    if cfg["pos_mode"] not in POS_MODES:
        raise ValueError(f"pos_mode must be one of {POS_MODES}, got {cfg['pos_mode']!r}")
    if cfg["pos_bias"] not in ("none", "alibi2d"):
        raise ValueError(f"pos_bias must be 'none' or 'alibi2d', got {cfg['pos_bias']!r}")
    if cfg["pool"] not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {cfg['pool']!r}")
    if cfg["embed_dim"] % 4 or cfg["embed_dim"] % cfg["num_heads"]:
        raise ValueError(
            f"embed_dim {cfg['embed_dim']} must be divisible by 4 and by "
            f"num_heads {cfg['num_heads']}"
        )
    return cfg
