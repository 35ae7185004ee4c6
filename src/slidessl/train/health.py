"""Is the run training? Gradient norms, how far the weights move, whether the loss moves.

A finite loss is not a training that trains: the iBOT recipes once ran for months on
gradient norms of 1e10-1e30 with a finite loss. What a step reports, beside its loss:

- ``grad_norm``: the global L2 norm of the student's gradients before clipping, from one
  fused reduction (``torch._foreach_norm``) and one host sync per step; a non-finite norm
  skips the step (:func:`slidessl.train.step.optimizer_step`), and the modules whose
  gradients blew up are named (:func:`grad_culprits`, on that rare path only).
- ``update_ratio``: ``||theta_after - theta_before|| / ||theta_before||`` of the student
  backbone over one optimizer step (the update-to-weight ratio; ~1e-3 is a healthy AdamW
  step, 0 means nothing trains, above 1e-1 is a blow-up).
- ``weight_dist``: ``||theta - theta_0|| / ||theta_0||`` of the student backbone against its
  initial weights, which are the random init that every evaluation compares against.

:class:`LossStall` warns when the DINO loss has not moved below its step-1 value, or stays
above ``log K`` (a uniform prediction over K prototypes), after a set number of steps.
Under FSDP every norm sums the squares of the local shards over ranks.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import torch

from slidessl.dtensor import is_sharded, local
from slidessl.train.distributed import all_reduce_sum

__all__ = ["LossStall", "WeightDrift", "grad_culprits", "grad_norms"]

log = logging.getLogger(__name__)


def _sum_sq(norms: list[torch.Tensor], sharded: bool, device) -> torch.Tensor:
    """Sum of squares (float64) of per-tensor norms, over ranks when sharded."""
    if not norms:
        return torch.zeros((), dtype=torch.float64, device=device)
    sq = torch.stack([n.to(torch.float64) for n in norms]).square().sum()
    return all_reduce_sum(sq) if sharded else sq


@torch.no_grad()
def grad_norms(params: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(global norm, per-tensor norms)`` of the gradients of ``params`` (those that have
    one), as float64 device tensors: no host sync here. Float64 because a float32 sum of
    squares overflows at norms above ~1e19: the norm is non-finite exactly when some
    gradient entry is."""
    grads = [p.grad for p in params if p.grad is not None]
    shards = [local(g) for g in grads]
    device = shards[0].device if shards else torch.device("cpu")
    norms = list(torch._foreach_norm(shards, 2, dtype=torch.float64)) if shards else []
    return _sum_sq(norms, is_sharded(grads), device).sqrt(), norms


def grad_culprits(named: list[tuple[str, torch.Tensor]], norms, top: int = 3) -> str:
    """The modules whose gradients are non-finite (or, if none is, the largest), named with
    their gradient norm: ``named`` the (name, parameter) pairs of ``norms``' tensors."""
    values = torch.stack([n.to(torch.float64) for n in norms]).cpu().tolist() if norms else []
    by_module: dict[str, float] = {}
    for (name, _), v in zip(named, values):
        module = name.rsplit(".", 1)[0] if "." in name else name
        old = by_module.get(module, 0.0)
        by_module[module] = (
            old if not math.isfinite(old) else (v if not math.isfinite(v) else max(old, v))
        )
    bad = [m for m, v in by_module.items() if not math.isfinite(v)]
    if bad:
        first = bad[:top]
        more = f" (+{len(bad) - top} more)" if len(bad) > top else ""
        return ", ".join(f"{m} ({by_module[m]})" for m in first) + more
    largest = sorted(by_module, key=by_module.get, reverse=True)[:top]
    return ", ".join(f"{m} ({by_module[m]:.3g})" for m in largest)


class WeightDrift:
    """The student backbone's distance from its initial weights and its per-step update."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.sharded = is_sharded(self.params)
        self.init = [local(p.detach()).clone() for p in self.params]
        self._before: list[torch.Tensor] | None = None

    def _relative(self, reference: list[torch.Tensor]) -> float:
        cur = [local(p.detach()) for p in self.params]
        if not cur:
            return 0.0
        device = cur[0].device
        diff = torch._foreach_norm(torch._foreach_sub(cur, reference), 2, dtype=torch.float64)
        num = _sum_sq(list(diff), self.sharded, device)
        ref = torch._foreach_norm(reference, 2, dtype=torch.float64)
        den = _sum_sq(list(ref), self.sharded, device)
        return float((num / den.clamp_min(1e-30)).sqrt())

    @torch.no_grad()
    def distance(self) -> float:
        """``||theta - theta_0|| / ||theta_0||``."""
        return self._relative(self.init)

    @torch.no_grad()
    def before_step(self) -> None:
        """Remember the weights before an optimizer step (for :meth:`update_ratio`)."""
        self._before = [local(p.detach()).clone() for p in self.params]

    @torch.no_grad()
    def update_ratio(self) -> float:
        """``||theta - theta_before|| / ||theta_before||`` since :meth:`before_step`
        (nan when it was not called for this step)."""
        if self._before is None:
            return float("nan")
        ratio = self._relative(self._before)
        self._before = None
        return ratio


class LossStall:
    """Warns when the DINO loss of the last ``window`` logged steps has not moved below its
    value at the first logged step, or stays at or above ``log K``, once ``after`` steps ran
    (``after`` = 0 disables). Counted in ``warnings``; warns once per ``after`` steps."""

    def __init__(self, after: int, out_dim: int, window: int = 10) -> None:
        self.after = int(after)
        self.log_k = math.log(max(int(out_dim), 2))
        self.first: float | None = None
        self.recent: deque[float] = deque(maxlen=window)
        self.warnings = 0
        self._next = self.after

    def check(self, step: int, dino_loss: float) -> str | None:
        if not math.isfinite(dino_loss):
            return None
        if self.first is None:
            self.first = float(dino_loss)
        self.recent.append(float(dino_loss))
        if self.after <= 0 or step < self._next:
            return None
        self._next = step + self.after
        level = sum(self.recent) / len(self.recent)
        if level < self.first and level < self.log_k:
            return None
        self.warnings += 1
        msg = (
            f"step {step}: the DINO loss has not moved: {level:.3f} over the last "
            f"{len(self.recent)} logged steps vs {self.first:.3f} at the first and log K = "
            f"{self.log_k:.3f} (K = dino.out_dim). Check grad_norm and update_ratio in "
            "metrics.csv; lower optim.lr or raise optim.warmup_epochs if updates are huge, "
            "raise them if the weights do not move."
        )
        log.warning(msg)
        return msg

    def state_dict(self) -> dict:
        return {"first": self.first, "recent": list(self.recent), "warnings": self.warnings,
                "next": self._next}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.first = state.get("first")
        self.recent.extend(state.get("recent", []))
        self.warnings = int(state.get("warnings", 0))
        self._next = int(state.get("next", self.after))
