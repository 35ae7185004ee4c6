"""Run statistics, the teacher export and the final summary (``summary.json`` + printout)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

__all__ = ["RunStats", "export_teacher", "full_state_module", "write_summary"]


class RunStats:
    """Per-step losses and timings of a run (carried through checkpoints on resume)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.terms: dict[str, list[float]] = {}
        self.data_time = 0.0
        self.step_time = 0.0
        self.slides = 0.0
        self.last_monitors: dict[str, float] = {}
        self.skipped_reads = 0
        self.grad_norms: list[float] = []
        self.last: dict[str, float] = {}

    def add(self, res: dict, data_time: float, step_time: float) -> None:
        self.losses.append(float(res.get("loss", float("nan"))))
        self.grad_norms.append(float(res.get("grad_norm", float("nan"))))
        if "weight_dist" in res:
            self.last["weight_dist"] = float(res["weight_dist"])
        for key, value in res.items():
            if key.endswith("_loss"):
                self.terms.setdefault(key, []).append(float(value))
        self.data_time += data_time
        self.step_time += step_time
        self.slides += float(res.get("slides", 0.0))

    def state_dict(self) -> dict:
        return {
            "losses": list(self.losses),
            "terms": {k: list(v) for k, v in self.terms.items()},
            "data_time": self.data_time,
            "step_time": self.step_time,
            "slides": self.slides,
            "last_monitors": dict(self.last_monitors),
            "skipped_reads": self.skipped_reads,
            "grad_norms": list(self.grad_norms),
            "last": dict(self.last),
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state["losses"])
        self.terms = {k: list(v) for k, v in state["terms"].items()}
        self.data_time, self.step_time = state["data_time"], state["step_time"]
        self.slides = state["slides"]
        self.last_monitors = dict(state.get("last_monitors", {}))
        self.skipped_reads = int(state.get("skipped_reads", 0))
        self.grad_norms = list(state.get("grad_norms", []))
        self.last = dict(state.get("last", {}))


def full_state_module(module: torch.nn.Module) -> torch.nn.Module:
    """A plain (unsharded) copy of an FSDP-sharded encoder; the module itself otherwise.

    Collective under FSDP: every rank must call it.
    """
    state = module.state_dict()
    if not any(hasattr(v, "full_tensor") for v in state.values()):
        return module
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    plain = type(module)(**module.config)
    plain.load_state_dict(full)
    return plain


def export_teacher(arch, folder: Path, is_main: bool = True) -> Path:
    """Write the teacher backbone with ``models.io.save_encoder`` (safetensors + config.json)."""
    from slidessl.models.io import save_encoder

    encoder = full_state_module(arch.teacher["backbone"])
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        save_encoder(encoder, folder)
    return folder


def _median(values: list[float]) -> float | None:
    finite = sorted(v for v in values if math.isfinite(v))
    return finite[len(finite) // 2] if finite else None


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def _label_line(labels) -> str:
    if labels is None or not labels.history:
        return ""
    step, last = labels.history[-1]
    return (
        f"\n  label monitor ({labels.task.name}, k-NN AUROC): {last:.4f} at step {step} vs "
        f"{labels.init:.4f} at step 0 (random init)"
    )


def _window_mean(values: list[float], first: bool) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan")
    n = max(1, len(finite) // 10)
    part = finite[:n] if first else finite[-n:]
    return sum(part) / len(part)


def write_summary(
    out: Path,
    stats: RunStats,
    monitor,
    guard,
    skipped: list,
    step: int,
    stop_at: int,
    cfg: dict,
    memory=None,
    health: dict | None = None,
) -> dict:
    """Write ``summary.json`` and print a short human summary; returns the dict. ``memory``:
    the step's peak-memory estimate (:class:`slidessl.train.memory.MemoryEstimate`);
    ``health``: the loss-stall monitor (``loss_stall``) and the label monitor
    (``label_monitor``, when configured)."""
    health = health or {}
    stall, labels = health.get("loss_stall"), health.get("label_monitor")
    summary = {
        "steps": step,
        "planned_steps": stop_at,
        "slides_seen": stats.slides,
        "loss_first": stats.losses[0] if stats.losses else None,
        "loss_last": stats.losses[-1] if stats.losses else None,
        "loss_first_10pct_mean": _window_mean(stats.losses, True),
        "loss_last_10pct_mean": _window_mean(stats.losses, False),
        "loss_terms_last": {k: v[-1] for k, v in stats.terms.items() if v},
        "monitors_last": dict(stats.last_monitors),
        "collapse_warnings": dict(monitor.warnings),
        "collapse_thresholds": dict(monitor.thresholds),
        "nan_steps": guard.count,
        "nan_last": dict(guard.last),
        "grad_norm_warnings": guard.norm_warnings,
        "grad_norm_median": _median(stats.grad_norms),
        "grad_norm_max": max(stats.grad_norms, default=None),
        "loss_stall_warnings": stall.warnings if stall is not None else None,
        "weight_dist_last": stats.last.get("weight_dist"),
        "label_monitor": None
        if labels is None
        else {
            "task": labels.task.name,
            "k": labels.k,
            "init": labels.init,
            "history": labels.history,
        },  # fmt: skip
        "skipped_bad_slides": len(skipped),
        "skipped_reads": stats.skipped_reads,
        "skipped_slides": [{"slide_id": str(s[0]), "reason": str(s[1])} for s in skipped],
        "train_time_s": stats.step_time,
        "data_wait_frac": stats.data_time / stats.step_time if stats.step_time else None,
        "slides_per_s": stats.slides / stats.step_time if stats.step_time else None,
        "teacher": str(out / "teacher"),
        "recipe": cfg.get("_meta", {}).get("recipe"),
        "memory_estimate_gib": memory.total / 2**30 if memory is not None else None,
        "losses": stats.losses,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    mons = ", ".join(f"{k}={v:.3g}" for k, v in summary["monitors_last"].items())
    warned = {k: v for k, v in summary["collapse_warnings"].items() if v}
    print(
        f"pretrain done: {step}/{stop_at} steps, {stats.slides:.0f} slides, "
        f"{stats.step_time:.1f} s ({summary['slides_per_s'] or 0:.2f} slides/s, "
        f"data wait {100 * (summary['data_wait_frac'] or 0):.1f}%)\n"
        f"  loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} "
        f"(mean of first/last 10%: {summary['loss_first_10pct_mean']:.4f} -> "
        f"{summary['loss_last_10pct_mean']:.4f})\n"
        f"  monitors: {mons or 'n/a'}; collapse warnings: {warned or 'none'}\n"
        f"  grad norm median {_fmt(summary['grad_norm_median'])}, max "
        f"{_fmt(summary['grad_norm_max'])}; weight distance from init "
        f"{_fmt(summary['weight_dist_last'])}{_label_line(labels)}\n"
        f"  non-finite steps skipped: {guard.count}; bad slides skipped: {len(skipped)} "
        f"(+{stats.skipped_reads} failed reads)\n"
        f"  teacher: {out / 'teacher'}  summary: {out / 'summary.json'}"
    )
    return summary
