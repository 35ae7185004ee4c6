"""FSDP training checkpoints through ``torch.distributed.checkpoint`` (DCP), resumable at
any number of processes.

Under ``distributed.strategy=fsdp`` a checkpoint is a folder ``ckpt-<step:08d>/`` in
``OUT/checkpoints/``:

- the DCP files (``.metadata`` and one ``__<rank>_0.distcp`` per saving rank) of
  ``{"model": ..., "optim": ...}``: the meta-architecture's state (student, teacher, the
  loss centres) and AdamW's state, keyed by parameter name (``get_state_dict``); every rank
  writes its own shards, and DCP reshards them on load for whatever layout the loading run
  has (2 processes -> 1, 1 -> 4, or the same);
- ``train_state.pt``, written by rank 0: step, epoch, sampler position, global batch, the
  grad scaler, NaN guard, monitors, run statistics, the configs
  (:func:`slidessl.train.checkpoint.capture_run_state`), the world size that saved, and the
  RNG states of every rank (gathered to rank 0).

Atomic: every rank writes into ``ckpt-<step>.tmp/``; after a barrier (every shard on disk)
rank 0 adds ``train_state.pt``, renames the folder to ``ckpt-<step>/`` and syncs the parent
folder. A run killed mid-save leaves at most a ``.tmp`` folder, which resume ignores and the
next save (or a fresh run) removes. Only the last ``keep`` folders are kept.

RNG on resume: with the world size that saved, rank ``r`` restores rank ``r``'s saved
python / numpy / torch (/ CUDA) states, so the run continues exactly. With another world
size the per-rank streams have no counterpart: every rank re-seeds python, numpy and torch
from ``(seed, step, rank)`` (:func:`resume_seed`) and logs it. Weights, optimizer moments,
centres, step, schedules and data order do not depend on it (the slide order is a function
of the seed, the epoch and the global batch); only stochastic layers (drop-path) do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from slidessl.atomic import atomic_write, fsync_dir
from slidessl.train.checkpoint import (
    capture_rng_state,
    restore_rng_state,
    restore_run_state,
    seed_everything,
)

__all__ = [
    "STATE_FILE",
    "incomplete_checkpoints",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_train_state",
    "resume_seed",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
FORMAT = "slidessl-dcp-1"
_NAME = re.compile(r"^ckpt-(\d{8})$")
_TMP = re.compile(r"^ckpt-(\d{8})\.tmp$")
_RESEED_TAG = 0x52455345  # keeps resume seeds apart from the data workers' seeds


def _folders(root: str | Path, pattern: re.Pattern) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found) if p.is_dir()]


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete DCP checkpoint folders in ``root``, oldest first."""
    return [
        p
        for p in _folders(root, _NAME)
        if (p / ".metadata").is_file() and (p / STATE_FILE).is_file()
    ]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def incomplete_checkpoints(root: str | Path) -> list[Path]:
    """``ckpt-<step>.tmp/`` folders: saves that a killed run did not finish."""
    return _folders(root, _TMP)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group that it assumes one process: that is
    the intent here (a run of one process), so that warning is silenced, for this only."""
    with warnings.catch_warnings():
        if not _dist():
            warnings.filterwarnings(
                "ignore", message="torch.distributed is disabled", category=UserWarning
            )
        yield


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _all_rng_states() -> list[dict]:
    """Every rank's RNG states, in rank order (on every rank)."""
    mine = capture_rng_state()
    if not _dist():
        return [mine]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def save_checkpoint(
    root: str | Path, step: int, keep: int, *, arch, optimizer, run_state: dict
) -> Path:
    """Write ``root/ckpt-<step>/`` (collective: every rank calls it); keep the last ``keep``.

    ``run_state`` is :func:`slidessl.train.checkpoint.capture_run_state` (rank 0's is
    written; its ``rng`` is replaced by the list of every rank's states).
    """
    root = Path(root)
    rank = dist.get_rank() if _dist() else 0
    world = dist.get_world_size() if _dist() else 1
    final, tmp = root / f"ckpt-{int(step):08d}", root / f"ckpt-{int(step):08d}.tmp"
    rng = _all_rng_states()
    if rank == 0:  # any other .tmp folder is a save that a killed run did not finish
        for stale in incomplete_checkpoints(root):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    _barrier()
    # get_state_dict fills an empty optimizer state (a zero-lr step on zero gradients): saved
    # as such, but the running optimizer is given its empty state back (no step taken yet)
    fresh = not optimizer.state
    model_state, optim_state = get_state_dict(arch, optimizer)
    with _quiet_single_process():
        dcp.save(
            {"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=not _dist()
        )
    if fresh:
        optimizer.state.clear()
    _barrier()  # every rank's shards are on disk
    if rank == 0:
        side = {**run_state, "format": FORMAT, "world_size": world, "rng": rng}
        atomic_write(tmp / STATE_FILE, lambda h: torch.save(side, h))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()  # every rank sees the renamed folder
    return final


def load_checkpoint(path: str | Path, *, arch, optimizer) -> dict:
    """Load ``path``'s model and optimizer state into ``arch`` / ``optimizer`` (resharded
    for this run's layout; collective); return its ``train_state.pt``."""
    path = Path(path)
    try:
        side = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ValueError(f"{path}: not a readable slidessl checkpoint ({exc})") from exc
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        raise ValueError(f"{path}: not a slidessl DCP checkpoint (no {FORMAT} {STATE_FILE})")
    model_state, optim_state = get_state_dict(arch, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=not _dist())
    set_state_dict(
        arch, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return side


def resume_seed(seed: int, step: int, rank: int) -> int:
    """The 32-bit seed of rank ``rank`` resumed at ``step`` under another world size."""
    ss = np.random.SeedSequence([int(seed), int(step), int(rank), _RESEED_TAG])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def restore_train_state(
    path, device=None, *, arch, optimizer, scaler, guard, monitor, stats, extra=None
) -> dict:
    """Load ``path`` into the given parts (the inverse of :func:`save_checkpoint`) and set
    this rank's RNG (its saved stream, or a re-seed under another world size); returns
    ``train_state.pt`` for the loop's own fields (step, sampler, global batch). ``device``
    is unused (DCP loads into the tensors where they live): the signature of
    :func:`slidessl.train.checkpoint.restore_train_state`."""
    side = load_checkpoint(path, arch=arch, optimizer=optimizer)
    restore_run_state(side, scaler=scaler, guard=guard, monitor=monitor, stats=stats, extra=extra)
    rank = dist.get_rank() if _dist() else 0
    world = dist.get_world_size() if _dist() else 1
    saved = side["rng"]
    if len(saved) == world:
        restore_rng_state(saved[rank])
    else:
        seed = resume_seed(side["data_seed"], side["step"], rank)
        seed_everything(seed)
        log.info(
            "%s was saved by %d process(es), this run has %d: rank %d re-seeds its RNG "
            "(python, numpy, torch) with %d from (seed %d, step %d, rank %d) instead of "
            "restoring a saved stream",
            path,
            len(saved),
            world,
            rank,
            seed,
            side["data_seed"],
            side["step"],
            rank,
        )
    return side
