"""Metrics sinks (CSV always, TensorBoard when installed), collapse monitors, NaN guard.

Collapse in DINO (Caron et al. 2021, Sec. 5.3) comes in two forms: one prototype dominates
(teacher outputs are one-hot on the same dimension) or the output is uniform. Both make the
teacher's output independent of the input. Computed once per logging step from the teacher
outputs (first global crop) of the last ``monitor.window_slides`` slides:

- ``teacher_entropy``: mean per-sample entropy of the centred, sharpened teacher targets (nats).
- ``teacher_usage``: mutual information between sample and prototype under the targets,
  ``H(mean_i p_i) - mean_i H(p_i)``, divided by its bound ``log(min(K, rows))``: 1 when every
  sample is sharply assigned to its own prototype, 0 when all samples get the same
  distribution (collapse onto one prototype or onto the uniform).
- ``kl_teacher_center``: mean ``KL(softmax(t / T) || softmax(c / T))``, teacher vs its centre;
  0 when every sample outputs the centre (uniform collapse).
- ``cls_std``: std over the batch of L2-normalised teacher CLS embeddings, times sqrt(E):
  about 1 for well-spread embeddings, 0 when all slides map to one vector.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import torch

__all__ = [
    "CollapseMonitor",
    "MetricsWriter",
    "MonitorWindow",
    "NonFiniteGuard",
    "collapse_stats",
]

log = logging.getLogger(__name__)


@torch.no_grad()
def collapse_stats(
    teacher_logits: torch.Tensor,
    center: torch.Tensor | None,
    teacher_temp: float,
    teacher_cls: torch.Tensor,
) -> dict[str, float]:
    """Collapse statistics of one batch (see the module docstring)."""
    t = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
    k = t.shape[1]
    c = torch.zeros(1, k, device=t.device) if center is None else center.float().reshape(1, k)
    probs = torch.softmax((t - c) / teacher_temp, dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean()
    mean_p = probs.mean(0)
    batch_entropy = -(mean_p * torch.log(mean_p.clamp_min(1e-30))).sum()
    denom = math.log(max(min(k, t.shape[0]), 2))
    usage = (batch_entropy - entropy).clamp_min(0.0) / denom
    log_p = torch.log_softmax(t / teacher_temp, dim=-1)
    log_c = torch.log_softmax(c / teacher_temp, dim=-1)
    kl = (log_p.exp() * (log_p - log_c)).sum(-1).mean()
    z = torch.nn.functional.normalize(teacher_cls.float(), dim=-1)
    std = z.std(dim=0).mean() * math.sqrt(z.shape[1]) if z.shape[0] > 1 else torch.tensor(0.0)
    return {
        "teacher_entropy": float(entropy),
        "teacher_usage": float(usage),
        "kl_teacher_center": float(kl),
        "cls_std": float(std),
    }


class MonitorWindow:
    """The teacher outputs of the last ``size`` slides (one global crop each), so collapse
    statistics compare different slides even with one slide per micro-batch."""

    def __init__(self, size: int) -> None:
        self.size = max(int(size), 2)
        self.logits: torch.Tensor | None = None
        self.cls: torch.Tensor | None = None

    def add(self, rows: list[dict[str, torch.Tensor]]) -> None:
        for row in rows:
            lg, cl = row["teacher_logits"], row["teacher_cls"]
            self.logits = lg if self.logits is None else torch.cat([self.logits, lg])[-self.size :]
            self.cls = cl if self.cls is None else torch.cat([self.cls, cl])[-self.size :]
        rows.clear()

    def stats(self, center: torch.Tensor | None, teacher_temp: float) -> dict[str, float]:
        if self.logits is None:
            return {}
        return collapse_stats(self.logits, center, teacher_temp, self.cls)


class CollapseMonitor:
    """Warns (log + counter) when a collapse statistic crosses its threshold."""

    def __init__(self, usage_min: float, kl_min: float, cls_std_min: float) -> None:
        self.thresholds = {
            "teacher_usage": usage_min,
            "kl_teacher_center": kl_min,
            "cls_std": cls_std_min,
        }
        self.warnings: dict[str, int] = {k: 0 for k in self.thresholds}
        self.last: dict[str, float] = {}

    def check(self, stats: dict[str, float], step: int) -> list[str]:
        self.last = dict(stats)
        crossed = []
        for key, low in self.thresholds.items():
            if key in stats and stats[key] < low:
                self.warnings[key] += 1
                crossed.append(key)
                log.warning(
                    "step %d: possible collapse: %s = %.4g < %.4g", step, key, stats[key], low
                )
        return crossed

    def state_dict(self) -> dict:
        return {"warnings": dict(self.warnings), "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.warnings.update(state.get("warnings", {}))
        self.last = dict(state.get("last", {}))


class NonFiniteGuard:
    """Counts skipped optimizer steps (a non-finite loss or gradient); stops the run after
    ``max_count`` with a message naming the loss terms and the modules whose gradients blew
    up. Warns when a finite gradient norm exceeds ``norm_warn`` (None: never)."""

    def __init__(self, max_count: int, norm_warn: float | None = None) -> None:
        self.max_count = int(max_count)
        self.norm_warn = None if norm_warn is None else float(norm_warn)
        self.count = 0
        self.steps: list[int] = []
        self.norm_warnings = 0
        self.last: dict = {}

    def record(self, step: int, res: dict) -> None:
        """A skipped step: ``res`` the step's logs (loss terms, ``grad_norm``,
        ``skip_reason``, ``culprits``)."""
        self.count += 1
        self.steps.append(int(step))
        terms = {k: v for k, v in res.items() if k.endswith("loss")}
        self.last = {
            "step": int(step),
            "reason": res.get("skip_reason", "non-finite loss"),
            "loss_terms": terms,
            "grad_norm": res.get("grad_norm"),
            "culprits": res.get("culprits", ""),
        }
        desc = self._describe()
        log.warning("step %d: %s; step skipped (%d/%d)", step, desc, self.count, self.max_count)
        if self.count >= self.max_count:
            raise FloatingPointError(
                f"stopping: {self.count} optimizer steps were skipped (steps "
                f"{self.steps[-5:]}); the limit is train.max_nan_steps={self.max_count}. "
                f"Last: {desc}. Lower optim.lr, raise optim.warmup_epochs, use "
                "train.precision=fp32 or check the input features for NaN/Inf."
            )

    def _describe(self) -> str:
        last = self.last
        terms = ", ".join(f"{k} {v:.4g}" for k, v in sorted(last["loss_terms"].items()))
        where = f"; gradients blew up in {last['culprits']}" if last["culprits"] else ""
        norm = last["grad_norm"]
        return f"{last['reason']} (loss terms: {terms or 'none'}; grad norm {norm}{where})"

    def check_norm(self, step: int, norm: float) -> bool:
        """Warn (and count) when a finite gradient norm is above the ceiling."""
        if self.norm_warn is None or not math.isfinite(norm) or norm <= self.norm_warn:
            return False
        self.norm_warnings += 1
        log.warning(
            "step %d: gradient norm %.4g above train.grad_norm_warn=%.4g (clipped to "
            "optim.clip_grad before the update; a run of these means the run is blowing up)",
            step,
            norm,
            self.norm_warn,
        )
        return True

    def state_dict(self) -> dict:
        return {"count": self.count, "steps": list(self.steps), "last": dict(self.last),
                "norm_warnings": self.norm_warnings}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state.get("count", 0))
        self.steps = list(state.get("steps", []))
        self.last = dict(state.get("last", {}))
        self.norm_warnings = int(state.get("norm_warnings", 0))


class MetricsWriter:
    """Appends metric rows to ``metrics.csv`` (header from the first row) and TensorBoard."""

    def __init__(self, folder: Path, tensorboard: bool = True, resume: bool = False) -> None:
        self.path = Path(folder) / "metrics.csv"
        self.fields: list[str] | None = None
        if resume and self.path.exists():
            with self.path.open(newline="") as handle:
                header = next(csv.reader(handle), None)
            self.fields = header
        elif self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                log.info("tensorboard not installed; metrics go to %s only", self.path)
            else:
                self.tb = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run rewrites them identically)."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [r for r in rows if int(float(r["step"])) <= step]
        fields = self.fields or (list(rows[0]) if rows else None)
        if fields is None:
            return
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict[str, float]) -> None:
        if self.fields is None:
            self.fields = list(row)
            with self.path.open("w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.fields).writeheader()
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
