"""Import Prov-GigaPath slide-encoder weights into the ``gigapath`` preset.

Prov-GigaPath (Xu et al., 2024, Nature, "A whole-slide foundation model for digital
pathology from real-world data") publishes ``slide_encoder.pth``: a dict whose ``"model"``
entry is the state dict of its ``LongNetViT`` (torchscale LongNet encoder, MAGNETO sub-LN,
12 layers x 768, 16 heads). Keys map one to one onto :class:`SlideEncoder`:

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

``mask_token`` (iBOT) does not exist there and keeps its zero init. Differences from the
published forward: partial segments and padded slides are masked here (the published code
pads segments with zero keys that receive softmax mass), so outputs agree exactly when the
sequence length (CLS included) needs no padding, e.g. a multiple of 16 below 1024.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from slidessl.models.encoder import SlideEncoder, build_encoder
from slidessl.models.io import load_state_strict

__all__ = ["convert_gigapath_state", "load_gigapath", "gigapath_forward", "pixel_to_grid"]

_RULES = (
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"patch_embed.\1"),
    (re.compile(r"^cls_token$"), "cls_token"),
    (re.compile(r"^encoder\.layers\.(\d+)\.(.+)$"), r"blocks.\1.\2"),
    (re.compile(r"^encoder\.layer_norm\.(weight|bias)$"), r"encoder_norm.\1"),
    (re.compile(r"^norm\.(weight|bias)$"), r"norm.\1"),
)
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


def load_gigapath(path, global_pool: bool = False, map_location="cpu", **overrides):
    """Build the ``gigapath`` preset and load ``slide_encoder.pth`` strictly.

    Any key that is missing, unexpected or of the wrong shape is reported by name in one
    ``ValueError`` that names the file. ``overrides`` reach :func:`build_encoder` (e.g. a
    smaller depth for tests). Returns the encoder in eval mode.
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
    overrides.setdefault("pool", "mean" if global_pool else "cls")
    encoder = build_encoder("gigapath", **overrides)
    own = encoder.state_dict()
    for key in _OURS_ONLY:
        converted.setdefault(key, own[key])
    if unknown:
        raise ValueError(
            f"{path}: unexpected Prov-GigaPath key(s) ({len(unknown)}): "
            + ", ".join(sorted(unknown)[:20])
        )
    load_state_strict(encoder, converted, path)
    return encoder.eval()


def pixel_to_grid(coords: torch.Tensor, tile_size: float = 256.0) -> torch.Tensor:
    """Prov-GigaPath's ``floor(coords / tile_size)`` as long grid positions."""
    return torch.floor(coords.to(torch.float64) / tile_size).long()


def gigapath_forward(encoder: SlideEncoder, x, grid, all_layer_embed: bool = False):
    """The list that Prov-GigaPath's ``LongNetViT.forward`` returns.

    With ``all_layer_embed`` the list holds the embedding input and every block output
    (13 for the published model), each passed through the final norm and pooled (CLS, or
    token mean for ``pool="mean"``); otherwise a one-element list of the pooled output.
    """
    out = encoder.forward_features(x, grid, return_layers=all_layer_embed)
    if not all_layer_embed:
        return [out["pooled"]]
    states = [out["embed"], *out["layers"]]
    if encoder.config["pool"] == "mean":
        return [encoder.norm(h[:, 1:].mean(dim=1)) for h in states]
    return [encoder.norm(h)[:, 0] for h in states]
