"""Atomic training checkpoints and RNG state capture.

A checkpoint is written to a temporary file in the target folder, flushed and fsync'ed,
then moved into place with ``os.replace`` (atomic on POSIX), and the folder is fsync'ed, so
a crash mid-write never leaves a truncated ``ckpt-*.pt`` that ``--resume`` would pick up.
Only the last ``keep`` checkpoints are kept.

Files are named ``ckpt-<step:08d>.pt`` and hold a dict with the model, optimizer, grad
scaler, loss centres, step, epoch, sampler position, data-order seed and all RNG states.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from slidessl.atomic import atomic_write

__all__ = [
    "capture_rng_state",
    "capture_run_state",
    "capture_train_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "restore_run_state",
    "restore_train_state",
    "save_checkpoint",
    "seed_everything",
    "worker_seed",
]

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's legacy and torch's global generators (the run's start; a
    resumed run then restores the saved states, :func:`restore_rng_state`)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - legacy global state, seeded too
    torch.manual_seed(seed)


def worker_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """A 32-bit seed derived from ``(seed, epoch, step, rank)`` (independent streams;
    ``step`` may be -1 for a per-epoch stream)."""
    ss = np.random.SeedSequence([int(seed), int(epoch), int(step) + 1, int(rank)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - libraries may use it
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoints in ``folder`` sorted by step (oldest first)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    ckpts = list_checkpoints(folder)
    return ckpts[-1] if ckpts else None


def save_checkpoint(state: dict, folder: str | Path, step: int, keep: int = 3) -> Path:
    """Write ``state`` atomically as ``folder/ckpt-<step>.pt``; delete all but the last ``keep``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = atomic_write(folder / f"ckpt-{int(step):08d}.pt", lambda h: torch.save(state, h))
    if keep > 0:
        for old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, with a clear error if unreadable."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ValueError(f"{path}: not a readable slidessl checkpoint ({exc})") from exc
    if not isinstance(state, dict) or "student" not in state or "step" not in state:
        raise ValueError(f"{path}: not a slidessl training checkpoint (missing student/step)")
    return state


def capture_run_state(
    *, scaler, step, epoch, sampler, guard, monitor, stats, cfg, arch=None, extra=None
) -> dict:
    """The training state besides weights, centres and optimizer: grad scaler, step / epoch
    / position in the data, this process's RNG states, NaN guard, collapse monitor, run
    statistics, the encoder and run configs; ``extra`` maps names to further objects with
    ``state_dict`` (the loss-stall and label monitors)."""
    extra = {f"extra/{k}": v.state_dict() for k, v in (extra or {}).items()}
    encoder = {} if arch is None else getattr(arch.teacher["backbone"], "config", {})
    return {
        **extra,
        "scaler": scaler.state_dict(),
        "step": step,
        "epoch": epoch,
        "sampler": sampler.state_dict(),
        "data_seed": int(cfg["seed"]),
        "global_batch": sampler.global_batch,
        "rng": capture_rng_state(),
        "nan_guard": guard.state_dict(),
        "monitor": monitor.state_dict(),
        "stats": stats.state_dict(),
        "encoder_config": dict(encoder or {}),
        "config": cfg,
    }


def capture_train_state(
    *, arch, optimizer, scaler, step, epoch, sampler, guard, monitor, stats, cfg, extra=None
) -> dict:
    """Everything a resumed run needs to continue exactly: student, teacher, centres,
    optimizer and the rest of :func:`capture_run_state`."""
    run = capture_run_state(
        scaler=scaler,
        step=step,
        epoch=epoch,
        sampler=sampler,
        guard=guard,
        monitor=monitor,
        stats=stats,
        cfg=cfg,
        arch=arch,
        extra=extra,
    )
    return {
        "format": "slidessl-train-1",
        "student": arch.student.state_dict(),
        "teacher": arch.teacher.state_dict(),
        "centers": {k: v.detach().cpu().clone() for k, v in arch.centers().items()},
        "optimizer": optimizer.state_dict(),
        **run,
    }


def restore_run_state(state: dict, *, scaler, guard, monitor, stats, extra=None) -> None:
    """Load the parts of :func:`capture_run_state` that live in objects (not the RNG)."""
    scaler.load_state_dict(state["scaler"])
    guard.load_state_dict(state["nan_guard"])
    monitor.load_state_dict(state["monitor"])
    stats.load_state_dict(state["stats"])
    for key, obj in (extra or {}).items():
        if f"extra/{key}" in state:
            obj.load_state_dict(state[f"extra/{key}"])


def restore_train_state(
    path, device, *, arch, optimizer, scaler, guard, monitor, stats, extra=None
) -> dict:
    """Load ``path`` into the given parts (the inverse of :func:`capture_train_state`);
    returns the state dict for the loop's own fields (step, sampler, global batch)."""
    state = load_checkpoint(path, map_location=device)
    arch.student.load_state_dict(state["student"])
    arch.teacher.load_state_dict(state["teacher"])
    for key, center in arch.centers().items():
        center.copy_(state["centers"][key].to(center.device))
    optimizer.load_state_dict(state["optimizer"])
    restore_run_state(state, scaler=scaler, guard=guard, monitor=monitor, stats=stats, extra=extra)
    restore_rng_state(state["rng"])
    return state
