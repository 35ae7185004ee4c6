"""AdamW parameter groups: no decay on norms/biases/tokens, layer-wise lr decay, frozen prototypes.

Follows the recipe of BEiT (Bao et al. 2022) and DINOv2 (Oquab et al. 2023): each encoder
block ``i`` (of ``D``) gets ``lr * layer_decay ** (D - i)``; embeddings and tokens (layer 0)
get ``layer_decay ** (D + 1)``; the final norm and the heads get the full lr. Biases, norm
weights, layer-scale gammas and learned tokens get no weight decay. The DINO prototype layer
(``last_layer``) is marked so the trainer can freeze it for the first epoch(s).

Every group carries ``lr_mult`` and ``wd_mult``; :func:`apply_schedules` sets the actual
``lr`` / ``weight_decay`` of each group from the scheduled values once per optimizer step.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = ["apply_schedules", "build_optimizer", "layer_id_for", "param_groups"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_TOKEN_NAMES = ("cls_token", "mask_token", "register", "pos_embed", "gamma", "ls1", "ls2")


def _encoder_depth(backbone: nn.Module) -> int:
    depth = getattr(backbone, "depth", None)
    if depth is None:
        ids = {int(m.group(1)) for n, _ in backbone.named_parameters() if (m := _BLOCK.search(n))}
        depth = max(ids) + 1 if ids else 0
    return int(depth)


def layer_id_for(name: str, depth: int) -> int:
    """Layer index of a backbone parameter: 0 embeddings/tokens, i+1 for ``blocks.i``,
    ``depth + 1`` for anything after the blocks (final norm)."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    leaf = name.split(".")[0]
    if "norm" in leaf or leaf.startswith("head") or leaf.startswith("fc_"):
        return depth + 1
    return 0


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or "norm" in name
        or any(token in name for token in _TOKEN_NAMES)
    )


def param_groups(
    student: nn.ModuleDict, layer_decay: float = 1.0, backbone_key: str = "backbone"
) -> list[dict]:
    """Build AdamW parameter groups for the student's backbone and heads.

    Parameters are grouped by ``(lr_mult, wd_mult, is_last_layer)``; each group also lists
    the parameter ``names`` and the encoder ``layer_id`` (for tests and logging).
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depth = _encoder_depth(student[backbone_key])
    groups: dict[tuple, dict] = {}
    for module_name, module in student.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if module_name == backbone_key:
                layer_id = layer_id_for(name, depth)
            else:
                layer_id = depth + 1
            lr_mult = float(layer_decay ** (depth + 1 - layer_id))
            wd_mult = 0.0 if _no_decay(name, param) else 1.0
            is_last = module_name != backbone_key and "last_layer" in name
            key = (layer_id, wd_mult, is_last)
            group = groups.setdefault(
                key,
                {
                    "params": [],
                    "names": [],
                    "lr_mult": lr_mult,
                    "wd_mult": wd_mult,
                    "is_last_layer": is_last,
                    "layer_id": layer_id,
                },
            )
            group["params"].append(param)
            group["names"].append(f"{module_name}.{name}")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(groups: list[dict], cfg: dict) -> torch.optim.AdamW:
    """AdamW over parameter ``groups`` (:func:`param_groups` of the student); lr and weight
    decay are set per step by the trainer."""
    o = cfg["optim"]
    return torch.optim.AdamW(
        groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=0.0
    )


def apply_schedules(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_frozen: bool
) -> None:
    """Set each group's lr / weight decay from the schedules (prototype layer: lr 0 if frozen)."""
    for group in optimizer.param_groups:
        frozen = last_layer_frozen and group.get("is_last_layer", False)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = wd * group.get("wd_mult", 1.0)


def drop_frozen_grads(optimizer: torch.optim.Optimizer) -> None:
    """Clear gradients of the frozen prototype layer so AdamW leaves weights and moments alone
    (DINO's ``cancel_gradients_last_layer``)."""
    for group in optimizer.param_groups:
        if group.get("is_last_layer", False):
            for p in group["params"]:
                p.grad = None
