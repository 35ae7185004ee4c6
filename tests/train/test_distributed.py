"""Scale-out: 2 gloo processes (DDP, FSDP) == 1 process with the same global batch (1e-5)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from slidessl.data.synthetic import make_cohort
from slidessl.train.checkpoint import latest_checkpoint, load_checkpoint
from slidessl.train.config import load_config
from slidessl.train.loop import pretrain

from .conftest import TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, resume: bool = False) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    pretrain(cfg, resume=resume)


def _config(manifest, out, batch, *extra):
    # Adam's eps damps gradients that are zero in exact arithmetic (key biases) but differ in
    # float noise between a 2-rank all-reduce and a single-process sum.
    return load_config(
        "dino",
        [
            *TINY,
            f"data.manifest={manifest}",
            f"out={out}",
            f"train.batch_size={batch}",
            "train.epochs=1",
            "train.steps_per_epoch=2",
            "optim.eps=1e-4",
            "optim.freeze_last_layer_epochs=0",
            "optim.warmup_epochs=0",
            "crops.n_local=1",
            *extra,
        ],
    )


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    manifest = make_cohort(
        tmp_path / "cohort", n_slides=4, seed=5, dim=16, min_tiles=60, max_tiles=120
    )
    single = _config(manifest, tmp_path / "one", batch=2)
    pretrain(single)
    double = _config(manifest, tmp_path / "two", batch=1)
    mp.spawn(_worker, args=(2, _free_port(), double), nprocs=2, join=True)
    a = load_checkpoint(latest_checkpoint(tmp_path / "one" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "two" / "checkpoints"))
    assert a["step"] == b["step"] == 2
    assert a["stats"]["losses"] == pytest.approx(b["stats"]["losses"], abs=1e-5)
    for part in ("student", "teacher"):
        for name, value in a[part].items():
            assert torch.allclose(value, b[part][name], atol=1e-5), (part, name)
    assert torch.allclose(a["centers"]["dino"], b["centers"]["dino"], atol=1e-6)
    assert (tmp_path / "two" / "teacher" / "model.safetensors").is_file()

    # FSDP2 (fully_shard) on the same 2 gloo processes: same exported teacher
    fsdp = _config(manifest, tmp_path / "fsdp", 1, "distributed.strategy=fsdp")
    mp.spawn(_worker, args=(2, _free_port(), fsdp), nprocs=2, join=True)
    assert {p.name for p in (tmp_path / "fsdp" / "checkpoints").iterdir()} == {"ckpt-00000002"}
    ref = load_file(tmp_path / "one" / "teacher" / "model.safetensors")
    got = load_file(tmp_path / "fsdp" / "teacher" / "model.safetensors")
    assert ref.keys() == got.keys()
    for name, value in ref.items():
        assert torch.allclose(value, got[name], atol=1e-5), name


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
@pytest.mark.slow
def test_fsdp_resume_reproduces_uninterrupted_run(tmp_path):
    """Stop a 2-process FSDP run mid-epoch and resume it, every rank from its own shards:
    the same losses and the same exported teacher as a run that was never stopped (DDP
    checkpoints are plain state dicts, resumed as in tests/train/test_pretrain.py)."""
    manifest = make_cohort(
        tmp_path / "cohort", n_slides=4, seed=6, dim=16, min_tiles=60, max_tiles=120
    )
    extra = ["distributed.strategy=fsdp", "train.epochs=2", "train.checkpoint_every=1"]
    full = _config(manifest, tmp_path / "full", 1, *extra)
    mp.spawn(_worker, args=(2, _free_port(), full), nprocs=2, join=True)
    part = _config(manifest, tmp_path / "part", 1, *extra, "train.max_steps=3")
    mp.spawn(_worker, args=(2, _free_port(), part), nprocs=2, join=True)
    rest = _config(manifest, tmp_path / "part", 1, *extra)
    mp.spawn(_worker, args=(2, _free_port(), rest, True), nprocs=2, join=True)
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert a["steps"] == b["steps"] == 4
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    ref = load_file(tmp_path / "full" / "teacher" / "model.safetensors")
    got = load_file(tmp_path / "part" / "teacher" / "model.safetensors")
    assert ref.keys() == got.keys()
    for name, value in ref.items():
        assert torch.allclose(value, got[name], atol=1e-5), name
