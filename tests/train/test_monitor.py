import csv
import math

import pytest
import torch

from slidessl.train.monitor import CollapseMonitor, MetricsWriter, NonFiniteGuard, collapse_stats


def test_healthy_batch_has_high_usage_and_spread():
    torch.manual_seed(0)
    k, b = 64, 32
    logits = torch.randn(b, k) * 3
    stats = collapse_stats(logits, torch.zeros(1, k), 0.1, torch.randn(b, 16))
    assert stats["teacher_usage"] > 0.5
    assert stats["kl_teacher_center"] > 0.5
    assert 0.5 < stats["cls_std"] < 1.5


def test_dominant_dimension_collapse_detected():
    k, b = 64, 16
    logits = torch.zeros(b, k)
    logits[:, 5] = 50.0
    cls = torch.ones(b, 16) + 1e-4 * torch.randn(b, 16)
    stats = collapse_stats(logits, torch.zeros(1, k), 0.1, cls)
    assert stats["teacher_usage"] < 0.01
    assert stats["cls_std"] < 0.01
    mon = CollapseMonitor(0.05, 1e-3, 0.2)
    crossed = mon.check(stats, step=3)
    assert "teacher_usage" in crossed and "cls_std" in crossed
    assert mon.warnings["teacher_usage"] == 1


def test_uniform_collapse_kl_to_center_is_zero():
    k = 32
    center = torch.randn(1, k)
    logits = center.repeat(8, 1)
    stats = collapse_stats(logits, center, 0.07, torch.randn(8, 4))
    assert abs(stats["kl_teacher_center"]) < 1e-5
    assert stats["teacher_entropy"] == pytest.approx(math.log(k), rel=1e-4)


def test_nonfinite_guard_stops_after_limit():
    guard = NonFiniteGuard(2)
    guard.record(4, {"loss": float("nan")})
    with pytest.raises(FloatingPointError, match="max_nan_steps=2"):
        guard.record(9, {"loss": float("inf")})
    assert guard.count == 2 and guard.steps == [4, 9]


def test_metrics_csv_resume_truncates(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        w.write({"step": step, "loss": 1.0 / step})
    w.close()
    w = MetricsWriter(tmp_path, tensorboard=False, resume=True)
    w.truncate_after(3)
    w.write({"step": 4, "loss": 9.0})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["loss"]) == 9.0


def test_tensorboard_events_written_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    w = MetricsWriter(tmp_path, tensorboard=True)
    w.write({"step": 1, "loss": 2.5, "lr": 1e-3})
    w.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
