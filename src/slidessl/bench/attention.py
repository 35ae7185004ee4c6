"""``slidessl bench attention``: dense SDPA vs dilated attention per sequence length."""

from __future__ import annotations

import functools

import torch

from slidessl.bench.harness import DTYPES, device_name, fmt, frac, matmul_peak, timeit
from slidessl.models.attention import dense_attention, dilated_attention
from slidessl.models.dilated.plan import attention_flops
from slidessl.models.presets import (
    DEFAULT_DILATIONS,
    DEFAULT_SEGMENTS,
    GIGAPATH_DILATIONS,
    GIGAPATH_SEGMENTS,
)

__all__ = ["bench_attention"]


def bench_attention(
    ns, dim=768, heads=16, dtype="float32", device="cpu", repeats=2, dense_limit_s=60.0, out=print
) -> list[dict]:
    """Time dense SDPA and dilated attention (GigaPath and default branches) per length."""
    device = torch.device(device)
    dt = DTYPES[dtype]
    peak = matmul_peak(device, dt)
    out(
        f"device {device_name(device)}, dtype {dtype}, dim {dim}, heads {heads}, "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s (measured)"
    )
    configs = {
        "gigapath": (GIGAPATH_SEGMENTS, GIGAPATH_DILATIONS),
        "default": (DEFAULT_SEGMENTS, DEFAULT_DILATIONS),
    }
    rows, dense_est = [], None
    header = (
        f"{'N':>7} {'dense ms':>10} {'gp ms':>9} {'ours ms':>9} {'dense/gp':>9} "
        f"{'dense/ours':>10} {'dense %pk':>9} {'gp %pk':>7} {'ours %pk':>8}"
    )
    out(header)
    for n in ns:
        q, k, v = (
            torch.randn(1, n, heads, dim // heads, device=device, dtype=dt) for _ in range(3)
        )
        row = {"n": n}
        with torch.no_grad():
            if dense_est is None or dense_est(n) <= dense_limit_s:
                row["dense_s"] = timeit(
                    functools.partial(dense_attention, q, k, v), device, repeats
                )
                t_ref, n_ref = row["dense_s"], n
                dense_est = lambda m, t=t_ref, r=n_ref: t * (m / r) ** 2  # noqa: E731
            else:
                row["dense_s"] = None
                row["dense_skipped_est_s"] = dense_est(n)
            for name, (segs, dils) in configs.items():
                fn = functools.partial(dilated_attention, q, k, v, segs, dils)
                row[f"{name}_s"] = timeit(fn, device, repeats)
        row["dense_frac"] = frac(attention_flops(n, dim), row["dense_s"], peak)
        for name, (segs, dils) in configs.items():
            row[f"{name}_frac"] = frac(attention_flops(n, dim, segs, dils), row[f"{name}_s"], peak)
        rows.append(row)
        out(_attention_line(row))
    skipped = [r["n"] for r in rows if r["dense_s"] is None]
    if skipped:
        out(
            f"dense skipped for N={skipped}: estimated (N^2 from the last measured length) "
            f"above --dense-limit {dense_limit_s:.0f}s; ratios there use that estimate"
        )
    return rows


def _attention_line(r):
    dense = r["dense_s"] if r["dense_s"] is not None else r.get("dense_skipped_est_s")
    mark = "" if r["dense_s"] is not None else "~"
    return (
        f"{r['n']:>7} {mark + fmt(1e3 * dense, '.1f'):>10} {1e3 * r['gigapath_s']:>9.1f} "
        f"{1e3 * r['default_s']:>9.1f} {mark + fmt(dense / r['gigapath_s'], '.2f'):>9} "
        f"{mark + fmt(dense / r['default_s'], '.2f'):>10} "
        f"{fmt(r['dense_frac'] and 100 * r['dense_frac'], '.0f'):>9} "
        f"{100 * r['gigapath_frac']:>7.0f} {100 * r['default_frac']:>8.0f}"
    )
