"""Collate per-slide multi-crop views into padded, crop-major batches with key-padding masks.

Rows are crop-major (as in DINOv2's collate): rows ``[0:B]`` are crop 0 of every slide,
``[B:2B]`` crop 1, and so on, so ``tensor.chunk(G)`` splits a batch by crop. Crops of
different lengths are right-padded; ``padding_mask`` is True on padding, padded features
and coordinates are zero and padded tokens are never masked for iBOT.

Example::

    >>> import torch
    >>> def crop(n, d=4):
    ...     return {"features": torch.randn(n, d), "coords": torch.zeros(n, 2, dtype=torch.long),
    ...             "ibot_mask": torch.zeros(n, dtype=torch.bool)}
    >>> views = [{"slide_id": s, "global": [crop(5), crop(3)], "local": [crop(2)]}
    ...          for s in ("a", "b")]
    >>> batch = collate_views(views + [None])
    >>> batch["global"]["features"].shape, batch["local"]["padding_mask"].shape
    (torch.Size([4, 5, 4]), torch.Size([2, 2]))
"""

from __future__ import annotations

import torch

__all__ = ["collate_views", "pad_crops"]


def pad_crops(
    crops: list[dict],
    pad_to_multiple: int = 1,
    feature_dim: int | None = None,
    with_mask: bool = False,
) -> dict:
    """Stack crops ``{"features" (n, D), "coords" (n, 2)[, "ibot_mask" (n,), "center" (D,)]}``
    with padding (``center``, the crop's slide mean, is stacked when every crop has one);
    ``lengths`` lists each row's real tiles."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    dims = {int(c["features"].shape[1]) for c in crops}
    if feature_dim is not None:
        dims.add(int(feature_dim))
    if len(dims) > 1:
        raise ValueError(f"crops have different feature dimensions {sorted(dims)}")
    d = dims.pop() if dims else 0
    length = max((len(c["features"]) for c in crops), default=0)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    b = len(crops)
    dtype = crops[0]["features"].dtype if crops else torch.float32
    out = {
        "features": torch.empty(b, length, d, dtype=dtype),  # padding zeroed below
        "coords": torch.zeros(b, length, 2, dtype=torch.long),
        "padding_mask": torch.ones(b, length, dtype=torch.bool),
        # real tiles per row, as ints: what a packed (varlen) encoder call needs, no sync
        "lengths": [len(c["features"]) for c in crops],
    }
    if with_mask:
        out["ibot_mask"] = torch.zeros(b, length, dtype=torch.bool)
    shuffled = bool(crops) and all("shuffled_coords" in c for c in crops)
    if shuffled:
        out["shuffled_coords"] = torch.zeros(b, length, 2, dtype=torch.long)
    if crops and all("center" in c for c in crops):
        out["center"] = torch.stack([c["center"] for c in crops])
    for i, c in enumerate(crops):
        n = len(c["features"])
        if len(c["coords"]) != n:
            raise ValueError(f"crop {i}: {n} feature rows but {len(c['coords'])} coordinates")
        out["features"][i, :n] = c["features"]
        out["features"][i, n:] = 0
        out["coords"][i, :n] = c["coords"]
        out["padding_mask"][i, :n] = False
        if shuffled:
            out["shuffled_coords"][i, :n] = c["shuffled_coords"]
        if with_mask:
            if "ibot_mask" not in c:
                raise ValueError(f"crop {i}: global crops need an 'ibot_mask'")
            out["ibot_mask"][i, :n] = c["ibot_mask"]
    return out


def collate_views(views: list[dict | None], pad_to_multiple: int = 1) -> dict | None:
    """Batch of the per-slide outputs of ``MultiCrop``; ``None`` entries (skipped slides) drop.

    Returns ``None`` when every entry is ``None``. Every slide must have the same number
    of global and of local crops and the same feature dimension.
    """
    views = [v for v in views if v is not None]
    if not views:
        return None
    n_global, n_local = len(views[0]["global"]), len(views[0]["local"])
    for v in views:
        if (len(v["global"]), len(v["local"])) != (n_global, n_local):
            raise ValueError(
                f"slide {v.get('slide_id')}: {len(v['global'])} global / {len(v['local'])} "
                f"local crops, but slide {views[0].get('slide_id')} has {n_global} / {n_local}"
            )
    dim = int(views[0]["global"][0]["features"].shape[1])
    by_crop_g = [v["global"][k] for k in range(n_global) for v in views]
    by_crop_l = [v["local"][k] for k in range(n_local) for v in views]
    return {
        "global": pad_crops(by_crop_g, pad_to_multiple, dim, with_mask=True),
        "local": pad_crops(by_crop_l, pad_to_multiple, dim),
        "slide_ids": [v.get("slide_id") for v in views],
        "n_global": n_global,
        "n_local": n_local,
        "batch_size": len(views),
    }
