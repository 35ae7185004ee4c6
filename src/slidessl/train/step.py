"""One optimizer step over k micro-batches, exactly equivalent to one k-times batch.

The step's path: :func:`optimizer_step` → :func:`forward_backward` (the micro-batch loop:
device transfer, DDP ``no_sync``, autocast, backward) → the wrapped arch's forward →
``SSLMetaArch.compute_loss`` (``slidessl.ssl``: the loss of one micro-batch) → then one
optimizer step, ``update_centers`` and ``update_teacher``.

Each micro-batch's loss is scaled by its share of the slides in the step, so the summed
gradient equals the gradient of the big batch's mean loss; gradients are all-reduced only on
the last micro-step (DDP ``no_sync``); the teacher centres, the schedules and the EMA update
happen once per optimizer step, after all micro-batches. A non-finite loss on any rank or a
non-finite gradient skips the whole step on every rank (gradients, centre sums and the EMA
update are dropped): the loss alone does not tell (see :mod:`slidessl.train.health`).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from slidessl.dtensor import local
from slidessl.train.data import to_device
from slidessl.train.distributed import all_reduce_sum, maybe_no_sync
from slidessl.train.health import grad_culprits, grad_norms
from slidessl.train.optim import apply_schedules, drop_frozen_grads

__all__ = ["autocast_context", "forward_backward", "optimizer_step"]


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CPU or GPU when ``precision == 'bf16'``; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(
    arch: nn.Module,
    micro_batches: list[dict],
    teacher_temp: float,
    *,
    model: nn.Module | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward and backward of the micro-batches of one optimizer step of ``arch``
    (an ``SSLMetaArch``; dinov2's ``forward_backward``, over k micro-batches).

    Each micro-batch's loss is scaled by its share of this rank's slides, so the summed
    gradient is that of the whole local batch's mean loss; ``model`` is this arch as the
    trainer wraps it (DDP: gradients all-reduce on the last micro-batch only). Returns
    ``(sums, finite)``: each loss term times its micro-batch's slides, summed (detached,
    for the slide-weighted mean over ranks), and whether every loss was finite. Centre
    sums accumulate; nothing is updated (``arch.update_centers``, ``arch.update_teacher``).
    """
    model = arch if model is None else model
    device = torch.device(device)
    sizes = [int(b["batch_size"]) for b in micro_batches]
    local_slides = float(sum(sizes))
    sums: dict[str, torch.Tensor] = {}
    finite = True
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        weight = sizes[i] / local_slides if local_slides else 0.0
        with maybe_no_sync(model, sync=i == len(micro_batches) - 1):
            with autocast_context(device, precision):
                loss, logs = model(batch, float(teacher_temp))
            if not torch.isfinite(loss.detach()).all():
                finite = False
            (loss * weight).backward()
        for key, value in logs.items():
            term = value.detach().float() * sizes[i]
            sums[key] = sums[key] + term if key in sums else term
    return sums, finite


def _clip(params, norm: float, max_norm: float | None) -> None:
    """Scale the gradients down to a global norm of ``max_norm`` when ``norm`` is above it
    (FSDP shards are scaled alike, their norm being the whole gradient's)."""
    if max_norm is not None and max_norm > 0 and math.isfinite(norm):
        coef = float(max_norm) / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([local(p.grad) for p in params if p.grad is not None], coef)


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
    drift=None,
) -> dict[str, float]:
    """:func:`forward_backward` over the micro-batches, then one optimizer + centre + EMA
    update - unless a loss on any rank or any gradient is non-finite: then nothing is
    applied (gradients, centre sums and the EMA update are dropped).

    ``model`` is the (possibly DDP-wrapped) ``arch``; ``drift`` a
    :class:`~slidessl.train.health.WeightDrift` whose ``update_ratio`` this step measures.
    Returns the step's logs: the slide-weighted mean of each loss term over all ranks,
    ``grad_norm`` (before clipping), ``slides`` (global), ``finite`` (0.0 when the step was
    skipped) and, for a skipped step, ``skip_reason`` and ``culprits`` (the modules whose
    gradients blew up, with their norms).
    """
    apply_schedules(optimizer, sched["lr"], sched["wd"], bool(sched["last_layer_frozen"]))
    optimizer.zero_grad(set_to_none=True)
    local_slides = float(sum(int(b["batch_size"]) for b in micro_batches))
    world_slides = all_reduce_sum(torch.tensor([local_slides], device=device))
    # Each rank's share: with DDP averaging over ranks, scale so the global sum is the mean.
    world = max(torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1, 1)
    sums, finite = forward_backward(
        arch, micro_batches, sched["teacher_temp"], model=model, device=device, precision=precision
    )
    if sched["last_layer_frozen"]:
        drop_frozen_grads(optimizer)
    named = [(n, p) for n, p in arch.student.named_parameters() if p.grad is not None]
    params = [p for _, p in named]
    total, norms = grad_norms(params)  # identical on every rank after DDP / FSDP reduction
    bad_loss = all_reduce_sum(torch.tensor([0.0 if finite else 1.0], device=device))
    keys = sorted(sums)
    stacked = all_reduce_sum(torch.stack([sums[k] for k in keys]))
    # the step's one host sync: loss flags, gradient norm and the logged loss terms together
    host = torch.cat([x.double().reshape(-1) for x in (world_slides, bad_loss, total, stacked)])
    host = host.cpu().tolist()
    slides, loss_ok, norm = host[0], host[1] == 0, host[2]
    out = {k: v / max(slides, 1.0) for k, v in zip(keys, host[3:])}
    out["slides"] = slides
    out["world"] = float(world)
    out["grad_norm"] = norm

    if not (loss_ok and math.isfinite(norm)):
        out["skip_reason"] = "non-finite loss" if not loss_ok else "non-finite gradient"
        out["culprits"] = grad_culprits(named, norms) if norms else ""
        optimizer.zero_grad(set_to_none=True)
        arch.discard_pending_centers()
        out["finite"] = 0.0
        return out
    _clip(params, norm, clip_grad)
    if drift is not None:
        drift.before_step()
    optimizer.step()
    arch.update_centers()
    arch.update_teacher(float(sched["momentum"]))
    out["finite"] = 1.0
    if drift is not None:
        out["update_ratio"] = drift.update_ratio()
    return out
