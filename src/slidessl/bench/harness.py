"""The benchmark harness: mean wall time of ``repeats`` calls (``torch.utils.benchmark``),
the measured matmul peak every ratio refers to, peak memory, and the table formatting the
benchmarks share.

Every number a benchmark prints is a ratio measured in the same run: dilated vs dense time,
and achieved FLOP/s as a fraction of a square-matmul peak measured first on the same device
and dtype.
"""

from __future__ import annotations

import resource
import time

import torch
from torch.utils import benchmark

__all__ = [
    "DTYPES",
    "device_name",
    "fmt",
    "frac",
    "matmul_peak",
    "peak_mem",
    "reset_mem",
    "sync",
    "timeit",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats, warmup=True):
    """Mean wall time of ``repeats`` calls of ``fn``, measured by
    ``torch.utils.benchmark.Timer`` (which synchronises the accelerator and makes two
    warm-up calls first, with the current intra-op thread count). ``warmup=False``
    (``slidessl bench encoder --no-warmup``, for slow CPUs) times the first calls instead,
    synchronising the same way."""
    repeats = max(1, int(repeats))
    if warmup:
        timer = benchmark.Timer(
            stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
        )
        return timer.timeit(number=repeats).mean
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def matmul_peak(device, dtype, size=None, repeats=3) -> float:
    """Measured FLOP/s of a square matmul (the 'peak' every ratio refers to)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sec = timeit(lambda: a @ b, device, repeats)
    return 2.0 * size**3 / sec


def frac(flops, sec, peak):
    return None if sec is None else flops / sec / peak


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_mem(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_mem(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
