"""Per-optimizer-step schedules: cosine with linear warm-up (DINO, Caron et al. 2021).

DINO and DINOv2 (Oquab et al. 2023) drive the learning rate, weight decay, teacher EMA
momentum and teacher temperature from precomputed per-iteration values. Schedules here are
pure functions of the optimizer step, so resuming only needs the step count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CosineSchedule", "Schedules", "build_schedules"]


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then a cosine
    from ``base`` to ``final`` over the remaining ``total_steps - warmup_steps``; ``final``
    after the end. With ``freeze_steps`` the value is 0 before the warm-up starts."""

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0
    freeze_steps: int = 0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0 or self.freeze_steps < 0:
            raise ValueError("warmup_steps and freeze_steps must be >= 0")

    def __call__(self, step: int) -> float:
        if step < self.freeze_steps:
            return 0.0
        step -= self.freeze_steps
        if step < self.warmup_steps:
            return self.warmup_start + (self.base - self.warmup_start) * step / self.warmup_steps
        span = max(self.total_steps - self.freeze_steps - self.warmup_steps, 1)
        t = min((step - self.warmup_steps) / span, 1.0)
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Schedules:
    lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    last_layer_free_step: int  # prototype layer trains from this optimizer step on

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": self.lr(step),
            "wd": self.weight_decay(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
            "last_layer_frozen": float(step < self.last_layer_free_step),
        }


def build_schedules(cfg: dict, steps_per_epoch: int, global_batch: int) -> Schedules:
    """Build all schedules from the config for ``epochs * steps_per_epoch`` optimizer steps."""
    o, tea, t = cfg["optim"], cfg["teacher"], cfg["train"]
    total = max(int(t["epochs"]) * steps_per_epoch, 1)
    lr = float(o["lr"])
    if o["scale_lr"]:
        lr = lr * global_batch / float(o["lr_reference_batch"])
    warmup = min(int(round(float(o["warmup_epochs"]) * steps_per_epoch)), total)
    temp_warmup = min(int(round(float(tea["warmup_temp_epochs"]) * steps_per_epoch)), total)
    return Schedules(
        lr=CosineSchedule(lr, float(o["min_lr"]), total, warmup, 0.0),
        weight_decay=CosineSchedule(float(o["weight_decay"]), float(o["weight_decay_end"]), total),
        momentum=CosineSchedule(float(tea["momentum"]), float(tea["momentum_end"]), total),
        # warm-up to the final temperature, then constant (DINO's teacher_temp schedule)
        teacher_temp=CosineSchedule(
            float(tea["temp"]), float(tea["temp"]), total, temp_warmup, float(tea["warmup_temp"])
        ),
        last_layer_free_step=int(round(float(o["freeze_last_layer_epochs"]) * steps_per_epoch)),
    )
