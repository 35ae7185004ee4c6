"""GPU check: both benchmarks in bf16 up to 100k tokens, then one summary table.

Run through ``benchmarks/gpu_check.sh``. Without CUDA it runs the same code on the CPU at
toy sizes (``--dry``) so the script itself is tested before a GPU is spent on it. Each
stage is guarded: a failure prints its reason and the remaining stages still run.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

from slidessl.bench.attention import bench_attention
from slidessl.bench.encoder import bench_encoder, encoder_step
from slidessl.models.dilated.kernels import set_lse_grad
from slidessl.models.encoder import build_encoder


def _stage(name, fn):
    print(f"== {name} ==", flush=True)
    try:
        return fn()
    except Exception:  # a failed stage must not cost the rest of the (paid) GPU run
        print(f"{name} FAILED:")
        traceback.print_exc(file=sys.stdout)
        return None


def profile_step(preset, n, device, dtype, rows=18):
    """Top operators/kernels of one eager forward+backward (after two warm-up steps) in
    each LSE-gradient mode: where the step's device time goes."""
    device = torch.device(device)
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    activities = [torch.profiler.ProfilerActivity.CPU]
    key = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        key = "self_device_time_total"
    encoder = build_encoder(preset).to(device).train()
    for mode in ("surrogate", "kernel"):
        set_lse_grad(mode)
        step = encoder_step(encoder, n, device, dt, int(n**0.5) + 1)
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"-- {preset} N={n} batch 1, LSE gradients {mode}, sorted by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))
    set_lse_grad("auto")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="CPU, toy sizes (checks the script)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry
    if not cuda and not args.dry:
        print("gpu_check: CUDA not available; use --dry for a CPU rehearsal")
        return 0
    if cuda:
        device, dtype, preset, repeats = "cuda", "bfloat16", "gigapath", 3
        att_n = [1024, 4096, 8192, 16384, 32768, 65536, 100000]
        enc_n, batches = [2048, 8192], [1, 4, 8]
        mem_n = [4096, 8192, 16384, 32768, 65536, 100000]
    else:
        device, dtype, preset, repeats = "cpu", "float32", "tiny", 1
        att_n, enc_n, batches, mem_n = [256, 1024], [256], [1, 2], [256, 512]
    att = _stage(
        "bench attention",
        lambda: bench_attention(att_n, 768, 16, dtype, device, repeats, dense_limit_s=30.0),
    )
    enc = _stage(
        "bench encoder",
        lambda: bench_encoder(
            preset, enc_n, mem_n, dtype, device, repeats, batch_sizes=batches, graphs=True
        ),
    )
    # exact LSE gradients from the fused backward kernel itself (no extra SDPA per branch);
    # the CUDA tests above check this path against float64 math before it is timed here
    set_lse_grad("kernel")
    enc_k = _stage(
        "bench encoder, kernel LSE gradients",
        lambda: bench_encoder(
            preset,
            enc_n[-1:],
            [],
            dtype,
            device,
            repeats,
            batch_sizes=batches,
            graphs=True,
            packed_step=True,
        ),
    )
    set_lse_grad("auto")
    _stage("profile encoder step", lambda: profile_step(preset, enc_n[-1], device, dtype))
    print("== summary ==")
    name = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    print(f"card: {name}; torch {torch.__version__}; dtype {dtype}")
    for r in att or []:
        if r["n"] in (16384, 100000, att_n[-1]):
            dense = r["dense_s"] or r.get("dense_skipped_est_s")
            print(
                f"attention N={r['n']}: dense/dilated(gigapath) {dense / r['gigapath_s']:.2f}x, "
                f"dense/dilated(default) {dense / r['default_s']:.2f}x, dilated fraction of "
                f"matmul peak gp {100 * r['gigapath_frac']:.0f}% ours "
                f"{100 * r['default_frac']:.0f}%"
            )
    rows, mem = enc if enc is not None else ([], [])
    kernel_rows = enc_k[0] if enc_k is not None else []
    for r in rows + [dict(r, mode=r["mode"] + " kernel-lse") for r in kernel_rows]:
        what = f"encoder {preset} N={r['n']} batch {r['batch']} {r['mode']}"
        if r["sec"] is None:
            reason = r.get("error", "out of memory").strip().splitlines()
            print(f"{what}: FAILED ({reason[0] if reason else 'unknown'})")
            continue
        print(
            f"{what}: {r['tokens_per_s']:.0f} tokens/s fwd+bwd, "
            f"MFU {100 * r['mfu']:.1f}% of measured matmul peak, "
            f"peak mem {r['peak_mem'] / 2**30:.2f} GiB"
        )
    for r in mem:
        mem_txt = "OOM" if r["peak_mem"] is None else f"{r['peak_mem'] / 2**30:.2f} GiB"
        print(f"checkpointed N={r['n']}: {mem_txt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
