"""FSDP checkpoints (torch.distributed.checkpoint folders) survive kill -9 and resume at
another world size: a 2-process gloo run is killed after a checkpoint exists, then resumed
with 1 process and with 2, each from a copy of the killed run's folder.

What is checked: the loaded weights are the saved ones (the whole teacher, heads included,
loaded by one process and compared with the checkpoint's full tensors; the exported teacher
of a resume that takes no step, at 1 and at 2 processes), and each resume continues the run
(step counter, finite losses, new checkpoints; with the same global batch, the same losses
at 1 and 2 processes)."""

import csv
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import slidessl
from slidessl.data.synthetic import make_cohort
from slidessl.train import sharded_checkpoint as dcp_io
from slidessl.train.config import load_config
from slidessl.train.loop import _build_arch, pretrain
from slidessl.train.optim import build_optimizer, param_groups

from .conftest import TINY

SRC = Path(slidessl.__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(manifest, out, batch, *extra) -> list[str]:
    # 200 steps: far more than run before the kill; one checkpoint per step, two kept
    return [
        *TINY,
        f"data.manifest={manifest}",
        f"out={out}",
        f"train.batch_size={batch}",
        "train.epochs=100",
        "train.steps_per_epoch=2",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=2",
        "optim.eps=1e-4",
        "optim.freeze_last_layer_epochs=0",
        "optim.warmup_epochs=0",
        "crops.n_local=1",
        "distributed.strategy=fsdp",
        *extra,
    ]


def _start_two_ranks(overrides: list[str], port: int, logs: Path) -> list[subprocess.Popen]:
    """``slidessl pretrain`` as ranks 0 and 1 of a gloo group (the variables torchrun sets),
    both in one new process group (rank 0's pid), output in ``logs/rank<r>.log``."""
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", WORLD_SIZE="2")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, "-m", "slidessl", "pretrain", "dino", *overrides]
    procs = []
    for rank in (0, 1):
        env.update(RANK=str(rank), LOCAL_RANK=str(rank))
        group = procs[0].pid if procs else 0  # rank 0 leads a new group, rank 1 joins it
        with (logs / f"rank{rank}.log").open("w") as log:
            procs.append(
                subprocess.Popen(cmd, env=dict(env), stdout=log, stderr=log, process_group=group)
            )
    return procs


def _kill_after_first_checkpoint(root: Path, procs: list, limit_s: float = 180.0) -> None:
    start = time.monotonic()
    while not dcp_io.list_checkpoints(root):
        assert procs[0].poll() is None, f"the run exited: see {root.parents[1]}/rank*.log"
        assert time.monotonic() - start < limit_s, "no checkpoint in time"
        time.sleep(0.05)
    os.killpg(procs[0].pid, signal.SIGKILL)  # kill -9, both ranks
    for proc in procs:
        proc.wait()


def _resume_twice(rank: int, world: int, ports: tuple, configs: tuple) -> None:
    """One rank: resume with no further step (its export, kept as ``teacher-loaded/``, is
    the teacher it loaded), then resume again and continue."""
    if world > 1:  # a spawned rank (one process runs in the test's own, as it is)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        torch.set_num_threads(1)
    for i, (port, cfg) in enumerate(zip(ports, configs, strict=True)):
        if world > 1:
            os.environ["MASTER_PORT"] = str(port)
        pretrain(cfg, resume=True)
        out = Path(cfg["out"])
        if i == 0 and rank == 0:
            shutil.copytree(out / "teacher", out / "teacher-loaded")


def _losses(run: Path) -> dict[int, float]:
    with (run / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
@pytest.mark.slow
def test_killed_fsdp_run_resumes_with_one_and_two_processes(tmp_path, caplog):
    manifest = make_cohort(
        tmp_path / "cohort", n_slides=4, seed=7, dim=16, min_tiles=60, max_tiles=120
    )
    killed = tmp_path / "killed"
    procs = _start_two_ranks(_overrides(manifest, killed, 1), _free_port(), tmp_path)
    _kill_after_first_checkpoint(killed / "checkpoints", procs)
    assert not (killed / "summary.json").exists()  # it did not finish
    latest = dcp_io.latest_checkpoint(killed / "checkpoints")
    k = int(latest.name.split("-")[1])
    assert torch.load(latest / dcp_io.STATE_FILE, weights_only=False)["world_size"] == 2
    dcp_to_torch_save(latest, tmp_path / "saved.pt")  # the full tensors, no process group
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)["model"]
    teacher = {n[len("teacher.") :]: v for n, v in saved.items() if n.startswith("teacher.")}
    assert teacher

    # the whole teacher (backbone and heads), loaded by one process from the 2 ranks' shards
    cfg = load_config("dino", _overrides(manifest, killed, 2))
    arch = _build_arch(cfg, 16)
    optimizer = build_optimizer(param_groups(arch.student, 1.0), cfg)
    dcp_io.load_checkpoint(latest, arch=arch, optimizer=optimizer)
    got = arch.teacher.state_dict()
    assert got.keys() == teacher.keys()
    for name, value in teacher.items():
        assert torch.equal(got[name], value), name

    # 1 process (micro-batch 2: the same global batch of 2), then 2 processes, each from a
    # copy of the killed run
    for run in ("one", "two"):
        shutil.copytree(killed, tmp_path / run)
    steps = (k, k + 2)
    one = [load_config("dino", _overrides(manifest, tmp_path / "one", 2, f"train.max_steps={s}"))
           for s in steps]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="slidessl.train.sharded_checkpoint"):
        _resume_twice(0, 1, (None, None), tuple(one))
    assert "saved by 2 process(es), this run has 1: rank 0 re-seeds" in caplog.text
    two = [load_config("dino", _overrides(manifest, tmp_path / "two", 1, f"train.max_steps={s}"))
           for s in steps]  # fmt: skip
    mp.spawn(_resume_twice, args=(2, (_free_port(), _free_port()), tuple(two)), nprocs=2)

    backbone = {n[len("backbone.") :]: v for n, v in teacher.items() if n.startswith("backbone.")}
    losses = {}
    for run in ("one", "two"):
        out = tmp_path / run
        loaded = load_file(out / "teacher-loaded" / "model.safetensors")
        assert loaded.keys() == backbone.keys()
        for name, value in backbone.items():
            assert torch.equal(loaded[name], value), (run, name)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == k + 2  # the step counter continued from k
        losses[run] = _losses(out)
        assert sorted(s for s in losses[run] if s > k) == [k + 1, k + 2]
        assert all(math.isfinite(losses[run][s]) for s in (k + 1, k + 2))
        names = {p.name for p in (out / "checkpoints").iterdir()}
        assert names == {f"ckpt-{k + 1:08d}", f"ckpt-{k + 2:08d}"}
    for s in (k + 1, k + 2):  # the same global batch and data order at 1 and 2 processes
        assert losses["one"][s] == pytest.approx(losses["two"][s], abs=1e-5)
    # steps the killed run logged after its newest complete checkpoint: the same losses
    for s, loss in _losses(killed).items():
        if s > k and s in losses["two"]:
            assert loss == pytest.approx(losses["two"][s], abs=1e-5), s
