import os
import random

import numpy as np
import pytest
import torch

from slidessl.train.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    worker_seed,
)


def _state(step, rng):
    return {"student": {"w": torch.from_numpy(rng.standard_normal(5))}, "step": step}


def test_keeps_last_k_and_latest_is_newest(tmp_path, rng):
    for step in (3, 10, 7, 12):
        save_checkpoint(_state(step, rng), tmp_path, step, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000010.pt", "ckpt-00000012.pt"]
    assert latest_checkpoint(tmp_path).name == "ckpt-00000012.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 12
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_failed_write_leaves_no_partial_file(tmp_path, rng):
    save_checkpoint(_state(1, rng), tmp_path, 1)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"student": Boom(), "step": 2}, tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000001.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    bad = tmp_path / "ckpt-00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="ckpt-00000001.pt"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ValueError, match="not a slidessl training checkpoint"):
        load_checkpoint(other)


def test_rng_state_roundtrip():
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_worker_seeds_are_distinct_and_deterministic():
    seeds = {worker_seed(0, e, s, r) for e in range(3) for s in range(3) for r in range(2)}
    assert len(seeds) == 18
    assert worker_seed(5, 1, 2, 3) == worker_seed(5, 1, 2, 3)
