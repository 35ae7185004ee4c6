"""How many CPUs this process may use, and torch's intra-op threads sized from it.

``os.cpu_count()`` (and torch's default thread count) is the machine's core count; a process
may be allowed far fewer: its CPU affinity (``taskset``, a batch scheduler's cpuset) and its
cgroup's CPU quota (a container with ``--cpus 2``, Kubernetes limits). More intra-op threads
than usable CPUs, or threads that compete with the DataLoader's worker processes, make every
OpenMP barrier wait for a descheduled thread: a 4-step CPU pretraining measured 12x slower
with the default threads while another process used one of two cores.

:func:`configure_threads` sets ``torch.set_num_threads`` to the usable CPUs (shared among
the processes torchrun starts on the machine), unless the user chose (``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS``), and logs what it chose and why; :func:`data_workers` caps DataLoader
workers (one thread each, torch's default in workers) at the usable CPUs minus one. Another
process busy on the same CPUs cannot be seen from here: on a shared machine set
``OMP_NUM_THREADS`` (docs/troubleshooting.md).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["configure_threads", "data_workers", "usable_cpus"]

_CGROUP = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path = _CGROUP) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``); None when unlimited or unreadable."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup_root: Path = _CGROUP) -> tuple[int, str]:
    """``(n, why)``: the CPUs this process may run on - the smaller of its affinity mask and
    its cgroup quota (rounded up) - and where the number came from."""
    try:
        affinity = len(os.sched_getaffinity(0))
        why = f"affinity {affinity}"
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
        why = f"cpu_count {affinity}"
    quota = _cgroup_quota(cgroup_root)
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"{why}, cgroup quota {quota:g}"
    return max(1, affinity), why


def configure_threads(*, share: int = 1, what: str = "slidessl") -> int:
    """Set torch's intra-op threads to the usable CPUs divided among ``share`` processes
    (torchrun's ``LOCAL_WORLD_SIZE``), at least 1; the user's ``OMP_NUM_THREADS`` /
    ``MKL_NUM_THREADS`` win. Returns the thread count and logs the choice."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            n = torch.get_num_threads()
            log.info("%s: %d intra-op threads (%s=%s)", what, n, var, os.environ[var])
            return n
    cpus, why = usable_cpus()
    share = max(1, int(share))
    n = max(1, cpus // share)
    torch.set_num_threads(n)
    log.info(
        "%s: %d intra-op threads (%d usable CPUs: %s; %d process(es) on this machine; "
        "OMP_NUM_THREADS overrides)",
        what,
        n,
        cpus,
        why,
        share,
    )
    return n


def data_workers(requested: int, *, share: int = 1) -> int:
    """DataLoader workers: ``requested``, at most the usable CPUs (per process) minus one
    (the main process), logged when capped."""
    cpus, why = usable_cpus()
    cap = max(0, max(1, cpus // max(1, int(share))) - 1)
    if requested > cap:
        log.info("data.num_workers=%d capped at %d (%d usable CPUs: %s)", requested, cap, cpus, why)
        return cap
    return max(0, int(requested))
