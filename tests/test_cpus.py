"""Threads and DataLoader workers sized from the CPUs this process may use."""

import logging

import pytest
import torch

from slidessl import cpus


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus._cgroup_quota(tmp_path) == pytest.approx(1.5)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus._cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus._cgroup_quota(v1) == pytest.approx(3.0)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus._cgroup_quota(v1) is None
    assert cpus._cgroup_quota(tmp_path / "absent") is None


def test_quota_below_affinity_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    n, why = cpus.usable_cpus(tmp_path)
    assert n == 3 and "affinity 8" in why and "quota 2.5" in why
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.usable_cpus(tmp_path)[0] == 8


def test_threads_and_workers_follow_a_patched_cpu_count(monkeypatch, threads, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpus, "usable_cpus", lambda *a: (3, "affinity 3"))
    with caplog.at_level(logging.INFO, logger="slidessl.cpus"):
        assert cpus.configure_threads(what="embed") == 3
    assert torch.get_num_threads() == 3
    assert "embed: 3 intra-op threads (3 usable CPUs: affinity 3" in caplog.text
    assert cpus.configure_threads(share=2) == 1  # two torchrun processes on 3 CPUs
    assert cpus.data_workers(4) == 2 and cpus.data_workers(1) == 1
    monkeypatch.setattr(cpus, "usable_cpus", lambda *a: (1, "affinity 1"))
    assert cpus.configure_threads() == 1
    with caplog.at_level(logging.INFO, logger="slidessl.cpus"):
        assert cpus.data_workers(2) == 0
    assert "data.num_workers=2 capped at 0" in caplog.text


def test_the_users_omp_num_threads_wins(monkeypatch, threads, caplog):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(cpus, "usable_cpus", lambda *a: (16, "affinity 16"))
    with caplog.at_level(logging.INFO, logger="slidessl.cpus"):
        assert cpus.configure_threads() == 1
    assert torch.get_num_threads() == 1 and "OMP_NUM_THREADS=1" in caplog.text
