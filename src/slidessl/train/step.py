"""One optimizer step over k micro-batches, exactly equivalent to one k-times batch.

Each micro-batch's loss is scaled by its share of the slides in the step, so the summed
gradient equals the gradient of the big batch's mean loss; gradients are all-reduced only on
the last micro-step (DDP ``no_sync``); the teacher centres, the schedules and the EMA update
happen once per optimizer step, after all micro-batches. A non-finite loss on any rank skips
the whole step on every rank (gradients, centre sums and the EMA update are dropped).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from slidessl.train.distributed import all_reduce_sum
from slidessl.train.optim import apply_schedules, drop_frozen_grads

__all__ = ["autocast_context", "optimizer_step"]


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CPU or GPU when ``precision == 'bf16'``; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_gradients(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Global L2 norm of the gradients, scaled down to ``max_norm`` when above it.

    FSDP gradients are disjoint shards (DTensors): their squared norms are summed over
    ranks, so every rank clips with the norm of the whole gradient, as DDP does.
    """
    grads = [_local(p.grad) for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for g in grads:
        sq = sq + g.detach().float().pow(2).sum()
    if any(hasattr(p.grad, "to_local") for p in params if p.grad is not None):
        sq = all_reduce_sum(sq)
    norm = float(sq.sqrt())
    if max_norm is not None and max_norm > 0 and math.isfinite(norm):
        coef = float(max_norm) / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
    return norm


def optimizer_step(
    model: nn.Module,
    arch: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    sched: dict[str, float],
    *,
    device: torch.device,
    precision: str = "fp32",
    clip_grad: float | None = None,
) -> dict[str, float]:
    """``arch.forward_backward`` on every micro-batch, then one optimizer + centre + EMA
    update.

    ``model`` is the (possibly DDP-wrapped) ``arch``. Returns the step's logs: the slide-
    weighted mean of each loss term over all ranks, ``grad_norm``, ``slides`` (global) and
    ``finite`` (0.0 when the step was skipped).
    """
    apply_schedules(optimizer, sched["lr"], sched["wd"], bool(sched["last_layer_frozen"]))
    optimizer.zero_grad(set_to_none=True)
    local_slides = float(sum(int(b["batch_size"]) for b in micro_batches))
    world_slides = all_reduce_sum(torch.tensor([local_slides], device=device))
    # Each rank's share: with DDP averaging over ranks, scale so the global sum is the mean.
    world = max(torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1, 1)
    sums, finite = arch.forward_backward(
        micro_batches, sched["teacher_temp"], model=model, device=device, precision=precision
    )

    flag = all_reduce_sum(torch.tensor([0.0 if finite else 1.0], device=device))
    finite = bool(flag.item() == 0)
    keys = sorted(sums)
    stacked = all_reduce_sum(torch.stack([sums[k] for k in keys]))
    total = world_slides.clamp_min(1.0)
    out = {k: float(v) for k, v in zip(keys, stacked / total)}
    out["slides"] = float(world_slides.item())
    out["world"] = float(world)

    if not finite:
        optimizer.zero_grad(set_to_none=True)
        arch.discard_pending_centers()
        out["finite"] = 0.0
        out["grad_norm"] = float("nan")
        return out
    if sched["last_layer_frozen"]:
        drop_frozen_grads(optimizer)
    params = [p for p in arch.student.parameters() if p.grad is not None]
    norm = clip_gradients(params, clip_grad)
    optimizer.step()
    arch.update_centers()
    arch.update_teacher(float(sched["momentum"]))
    out["finite"] = 1.0
    out["grad_norm"] = norm if math.isfinite(norm) else float("nan")
    return out
