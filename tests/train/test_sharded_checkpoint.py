"""DCP checkpoint folders in one process: round trip, last K kept, unfinished saves ignored,
the RNG rule (own stream at the saving world size, else re-seeded from (seed, step, rank))."""

import logging

import torch

from slidessl.train import sharded_checkpoint as dcp_io
from slidessl.train.checkpoint import capture_run_state, seed_everything
from slidessl.train.distributed import SlideShardSampler
from slidessl.train.loop import _build_arch
from slidessl.train.monitor import CollapseMonitor, NonFiniteGuard
from slidessl.train.optim import build_optimizer, param_groups
from slidessl.train.summary import RunStats


def _parts(cfg, seed):
    cfg = {**cfg, "seed": seed}
    arch = _build_arch(cfg, 16)
    optimizer = build_optimizer(param_groups(arch.student, 1.0), cfg)
    return cfg, arch, optimizer


def _objects():
    return {
        "scaler": torch.amp.GradScaler("cpu", enabled=False),
        "guard": NonFiniteGuard(3),
        "monitor": CollapseMonitor(0.05, 0.01, 0.2),
        "stats": RunStats(),
    }


def _step(arch, optimizer, rng):
    """One AdamW step on random gradients, an EMA step and a centre change."""
    for p in arch.student.parameters():
        if p.requires_grad:
            p.grad = torch.from_numpy(rng.standard_normal(tuple(p.shape))).float()
    optimizer.step()
    arch.update_teacher(0.9)
    arch.dino_loss.center.copy_(torch.from_numpy(rng.standard_normal((1, 64))).float())


def _save(root, step, cfg, arch, optimizer, keep=2):
    objects = _objects()
    objects["stats"].losses = [float(step)]
    run = capture_run_state(
        step=step, epoch=0, sampler=SlideShardSampler(8, 2), cfg=cfg, arch=arch, **objects
    )
    return dcp_io.save_checkpoint(root, step, keep, arch=arch, optimizer=optimizer, run_state=run)


def test_round_trip_keeps_last_k_and_ignores_unfinished_saves(tmp_path, tiny_cfg, rng):
    cfg, arch, optimizer = _parts(tiny_cfg("dino"), 0)
    root = tmp_path / "checkpoints"
    (root / "ckpt-00000009.tmp").mkdir(parents=True)  # a save a killed run did not finish
    for step in (1, 2, 3):
        _step(arch, optimizer, rng)
        _save(root, step, cfg, arch, optimizer)
    assert [p.name for p in dcp_io.list_checkpoints(root)] == ["ckpt-00000002", "ckpt-00000003"]
    assert not dcp_io.incomplete_checkpoints(root)  # removed by the next save
    (root / "ckpt-00000004.tmp").mkdir()
    latest = dcp_io.latest_checkpoint(root)
    assert latest.name == "ckpt-00000003"
    assert sorted(p.name for p in latest.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "train_state.pt",
    ]

    _, other, other_opt = _parts(tiny_cfg("dino"), 1)  # other weights, no optimizer state
    side = dcp_io.restore_train_state(latest, None, arch=other, optimizer=other_opt, **_objects())
    assert side["step"] == 3 and side["world_size"] == 1 and side["stats"]["losses"] == [3.0]
    want, got = arch.state_dict(), other.state_dict()
    assert want.keys() == got.keys() and "dino_loss.center" in got
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    for p, q in zip(arch.student.parameters(), other.student.parameters(), strict=True):
        a, b = optimizer.state.get(p, {}), other_opt.state.get(q, {})
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_rng_own_stream_or_reseeded(tmp_path, tiny_cfg, caplog):
    cfg, arch, optimizer = _parts(tiny_cfg("dino"), 0)
    root = tmp_path / "checkpoints"
    seed_everything(11)
    path = _save(root, 5, cfg, arch, optimizer)
    after_save = torch.rand(4)
    assert not optimizer.state  # saving before any step leaves the optimizer as it was
    seed_everything(12)
    dcp_io.restore_train_state(path, arch=arch, optimizer=optimizer, **_objects())
    assert torch.equal(torch.rand(4), after_save)  # the saving world size: its own stream

    side = torch.load(path / dcp_io.STATE_FILE, weights_only=False)
    side["rng"] = side["rng"] * 2  # as if saved by 2 processes
    torch.save(side, path / dcp_io.STATE_FILE)
    with caplog.at_level(logging.INFO, logger="slidessl.train.sharded_checkpoint"):
        dcp_io.restore_train_state(path, arch=arch, optimizer=optimizer, **_objects())
    assert "saved by 2 process(es), this run has 1: rank 0 re-seeds" in caplog.text
    got = torch.rand(4)
    seed_everything(dcp_io.resume_seed(cfg["seed"], 5, 0))
    assert torch.equal(got, torch.rand(4))
    assert dcp_io.resume_seed(0, 5, 0) != dcp_io.resume_seed(0, 5, 1)
