"""Slide maps: tiles drawn at their grid positions, coloured by what the encoder sees.

Two maps per slide:

- **CLS attention** of the last block, from the encoder's hook
  ``SlideEncoder.last_block_attention``: the last block's input goes through its
  ``self_attn_layer_norm``, ``q_proj`` (CLS row) and ``k_proj`` (tile rows); the map is
  ``softmax(q_cls . k_tile / sqrt(d_head))`` over real tiles, averaged over heads. This is
  the *dense* CLS-to-tile attention: it ignores LongNet's segment / dilation sparsity (under
  which CLS sees only a subset of tiles per branch) and CLS's weight on itself, and is a
  picture of what the last block's queries prefer, not of the exact mixing.
- **PCA** of the final token embeddings: the first three principal components, each scaled
  to [0, 1], used as RGB (the DINOv2 visualisation).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def cls_attention(encoder, x: torch.Tensor, grid: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(attention (N,), tokens (N, E))`` for one slide: x (N, D), grid (N, 2)."""
    encoder.eval()
    attn, tokens = encoder.last_block_attention(x[None], grid[None])
    return attn[0].numpy(), tokens[0].float().numpy()


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """(N, E) -> (N, 3) colours in [0, 1] from the first three principal components."""
    z = tokens - tokens.mean(axis=0)
    if len(z) < 2:
        return np.full((len(z), 3), 0.5)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    comps = z @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(axis=0), comps.max(axis=0)
    return (comps - lo) / np.where(hi > lo, hi - lo, 1.0)


def raster(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Canvas (H, W, C) with ``values`` (N, C) at grid cells; empty cells are NaN."""
    grid = np.asarray(grid) - np.asarray(grid).min(axis=0)
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    w, h = grid.max(axis=0) + 1
    canvas = np.full((h, w, values.shape[1]), np.nan)
    canvas[grid[:, 1], grid[:, 0]] = values
    return canvas


def map_data(encoder, item: dict) -> dict:
    """What a slide map draws, for one slide dict: ``{"slide_id", "grid" (N, 2),
    "attention" (N,) summing to 1, "rgb" (N, 3) in [0, 1]}``."""
    attn, tokens = cls_attention(encoder, item["features"], item["grid"])
    return {
        "slide_id": item["slide_id"],
        "grid": np.asarray(item["grid"], dtype=np.int64),
        "attention": attn.astype(np.float32),
        "rgb": pca_rgb(tokens).astype(np.float32),
    }


def pick_map_items(items: list, n: int) -> list:
    """``n`` slides spread evenly over ``items`` (the first, the last, between)."""
    if n <= 0 or not items:
        return []
    picks = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[int(i)] for i in picks]


def write_maps(path, encoder, items: list, load=None) -> Path | None:
    """Compute the maps of ``items`` with ``encoder`` and store them in ``path`` (``.npz``,
    written atomically), keyed by slide: maps ``path`` already holds are kept, the others
    added. With ``load``, ``items`` are keys (e.g. dataset indices) that ``load`` turns
    into slide dicts (None: skipped), read only when needed. None (nothing written) for an
    encoder without attention blocks (mean pooling, prototypes)."""
    from slidessl.atomic import atomic_write
    from slidessl.eval.embed_io import slide_key

    if not items or not getattr(encoder, "blocks", None):
        return None
    path = Path(path)
    arrays = {}
    if path.exists():
        with np.load(path) as f:
            arrays = {name: f[name] for name in f.files}
    have = {name.rsplit(".", 1)[0] for name in arrays}
    for item in items:
        item = load(item) if load is not None else item
        if item is None or slide_key(item["slide_id"]) in have:
            continue
        data = map_data(encoder, item)
        key = slide_key(data["slide_id"])
        for name in ("grid", "attention", "rgb"):
            arrays[f"{key}.{name}"] = data[name]

    def write(f):
        np.savez(f, **arrays)

    atomic_write(path, write)
    return path


def read_maps(path) -> list[dict]:
    """The maps stored by :func:`write_maps`, in the order written."""
    from slidessl.eval.embed_io import slide_from_key

    with np.load(path) as f:
        names = list(f.files)
        keys = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
        return [
            {
                "slide_id": slide_from_key(k),
                "grid": f[f"{k}.grid"],
                "attention": f[f"{k}.attention"],
                "rgb": f[f"{k}.rgb"],
            }
            for k in keys
        ]


def save_slide_map(data: dict, path, title: str = "") -> dict:
    """Write one PNG (attention | PCA) from :func:`map_data` output; returns summary numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attn, grid = np.asarray(data["attention"], dtype=np.float64), data["grid"]
    rgb = raster(grid, data["rgb"])
    att = raster(grid, attn * len(attn))[..., 0]  # 1 = uniform attention
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    im = axes[0].imshow(att, cmap="magma", interpolation="nearest")
    axes[0].set_title("last-block CLS attention (x uniform)")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    axes[1].imshow(np.nan_to_num(rgb, nan=1.0), interpolation="nearest")
    axes[1].set_title("PCA of token embeddings (RGB)")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title or data["slide_id"])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    ent = float(-(attn * np.log(np.maximum(attn, 1e-30))).sum() / math.log(max(len(attn), 2)))
    return {
        "slide_id": data["slide_id"],
        "path": str(path),
        "n_tiles": len(attn),
        "attention_entropy_norm": ent,
        "attention_max_x_uniform": float(attn.max() * len(attn)),
    }
