import math

import numpy as np
import pytest

from slidessl.train.config import load_config
from slidessl.train.schedules import CosineSchedule, build_schedules


def test_cosine_warmup_endpoints_and_monotone(rng):
    base, final = float(rng.uniform(0.1, 1)), float(rng.uniform(0, 0.05))
    total, warm = int(rng.integers(20, 60)), int(rng.integers(1, 10))
    s = CosineSchedule(base, final, total, warm, 0.0)
    vals = np.array([s(i) for i in range(total + 3)])
    assert vals[0] == 0.0
    assert vals[warm] == pytest.approx(base)
    assert np.all(np.diff(vals[: warm + 1]) > 0)
    assert np.all(np.diff(vals[warm:total]) <= 1e-12)
    assert vals[total] == pytest.approx(final)
    assert vals[-1] == pytest.approx(final)
    mid = warm + (total - warm) // 2
    t = (mid - warm) / (total - warm)
    assert vals[mid] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * t)))


def test_freeze_then_warmup():
    s = CosineSchedule(1.0, 0.0, 10, 2, 0.0, freeze_steps=3)
    assert [s(i) for i in range(3)] == [0.0, 0.0, 0.0]
    assert s(5) == pytest.approx(1.0)


def test_build_schedules_from_config():
    cfg = load_config(
        "dino",
        [
            "train.epochs=4",
            "teacher.warmup_temp_epochs=2",
            "optim.warmup_epochs=1",
            "optim.freeze_last_layer_epochs=1",
        ],
    )
    sch = build_schedules(cfg, steps_per_epoch=5, global_batch=512)
    first, later = sch.at(0), sch.at(12)
    assert first["teacher_temp"] == pytest.approx(cfg["teacher"]["warmup_temp"])
    assert later["teacher_temp"] == pytest.approx(cfg["teacher"]["temp"])
    assert sch.at(5)["lr"] == pytest.approx(cfg["optim"]["lr"] * 512 / 256)  # scale_lr
    assert first["momentum"] == pytest.approx(cfg["teacher"]["momentum"])
    assert sch.at(20)["momentum"] == pytest.approx(cfg["teacher"]["momentum_end"])
    assert sch.at(20)["wd"] == pytest.approx(cfg["optim"]["weight_decay_end"])
    assert first["last_layer_frozen"] == 1.0 and sch.at(5)["last_layer_frozen"] == 0.0
