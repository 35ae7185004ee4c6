"""``slidessl bench attention`` and ``slidessl bench encoder``: the command-line side of the
benchmark package (its registration in the ``slidessl`` command)."""

from __future__ import annotations

import argparse


def _ints(text):
    return [int(float(t)) for t in text.split(",") if t.strip()]


# Defaults per device: the CPU ones finish in about two minutes on two cores (the 16k
# attention row is the one the dilated-vs-dense target is read at); larger sizes by flag.
DEFAULTS = {
    "attention_n": {"cpu": [1024, 4096, 16384], "cuda": [1024, 4096, 8192, 16384, 32768]},
    "attention_repeats": {"cpu": 1, "cuda": 2},
    "encoder_n": {"cpu": [1024, 2048], "cuda": [2048, 8192]},
    "encoder_mem_n": {"cpu": [1024], "cuda": [4096, 8192, 16384, 32768]},
}


def _default(args, name: str, key: str, device: str):
    if getattr(args, name) is None:
        setattr(args, name, DEFAULTS[key]["cuda" if device.startswith("cuda") else "cpu"])


def register(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    bench = subparsers.add_parser(
        "bench",
        help="attention / encoder benchmarks (ratios)",
        formatter_class=fmt,
        description="Benchmarks that print tables of ratios measured in the same run "
        "(dilated vs dense attention time, achieved FLOP/s as a fraction of a matmul peak "
        "measured first on the same device and dtype); they write no files. Defaults finish "
        "in minutes on a laptop CPU; docs/performance.md has measured tables. Example: "
        "slidessl bench attention --n 1024,4096",
    )
    sub = bench.add_subparsers(
        dest="bench_command", metavar="WHAT", help="attention or encoder (WHAT --help for more)"
    )
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])

    att = sub.add_parser(
        "attention",
        help="dense SDPA vs dilated attention per length",
        formatter_class=fmt,
        description="Time dense scaled-dot-product attention and dilated attention "
        "(Prov-GigaPath's and slidessl's default segment / dilation branches) at each "
        "sequence length; prints seconds, the dilated / dense ratio and the fraction of the "
        "measured matmul peak. Dense is skipped where its estimated time exceeds "
        "--dense-limit. Example: slidessl bench attention --n 1024,4096,16384 --device cpu",
    )
    att.add_argument(
        "--n",
        type=_ints,
        default=None,
        help="comma-separated sequence lengths (not given: 1024,4096,16384 on CPU, "
        "1024,4096,8192,16384,32768 on CUDA)",
    )
    att.add_argument("--dim", type=int, default=768, help="model width (embedding dim)")
    att.add_argument("--heads", type=int, default=16, help="attention heads")
    att.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per length (not given: 1 on CPU, 2 on CUDA)",
    )
    att.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="tensor dtype (not given: float32 on CPU, bfloat16 on CUDA)",
    )
    att.add_argument("--device", default=None, help="cpu or cuda (not given: cuda when available)")
    att.add_argument(
        "--dense-limit",
        type=float,
        default=60.0,
        help="skip dense when its estimated time exceeds this many seconds",
    )
    att.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads (not given: the usable CPUs, or OMP_NUM_THREADS)",
    )
    att.set_defaults(func=_attention)

    enc = sub.add_parser(
        "encoder",
        help="forward+backward throughput, utilisation, memory",
        formatter_class=fmt,
        description="Time forward+backward steps of a slide encoder preset at each number "
        "of tiles N (and --batch slides per step): tokens/s, model FLOP utilisation against "
        "the measured matmul peak, peak memory; then a table of memory growth with gradient "
        "checkpointing at --mem-n. Example: slidessl bench encoder --preset tiny --n 1024 "
        "--mem-n 1024",
    )
    enc.add_argument(
        "--preset",
        default="gigapath",
        help="encoder preset: tiny, small, base or gigapath (Prov-GigaPath's size)",
    )
    enc.add_argument(
        "--n",
        type=_ints,
        default=None,
        help="comma-separated tiles per slide (not given: 1024,2048 on CPU, 2048,8192 on CUDA)",
    )
    enc.add_argument(
        "--mem-n",
        type=_ints,
        default=None,
        help="lengths for the checkpointed memory table (not given: 1024 on CPU, "
        "4096,8192,16384,32768 on CUDA)",
    )
    enc.add_argument("--repeats", type=int, default=1, help="timed repeats per row")
    enc.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="tensor dtype (not given: float32 on CPU, bfloat16 on CUDA)",
    )
    enc.add_argument("--device", default=None, help="cpu or cuda (not given: cuda when available)")
    enc.add_argument(
        "--inexact-grad",
        action="store_true",
        help="treat branch LSE weights as constants in backward (as torchscale)",
    )
    enc.add_argument(
        "--lse-grad",
        default="auto",
        choices=["auto", "kernel", "surrogate"],
        help="how exact LSE gradients are computed (auto: kernel on CPU, surrogate on CUDA)",
    )
    enc.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads (not given: the usable CPUs, or OMP_NUM_THREADS)",
    )
    enc.add_argument("--no-warmup", action="store_true", help="time the first step (slow CPUs)")
    enc.add_argument(
        "--batch",
        type=_ints,
        default=[1],
        help="comma-separated slides per step (each of N tiles) for the throughput table",
    )
    enc.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also time replays of one fwd+bwd captured in a CUDA graph (CUDA only)",
    )
    enc.add_argument(
        "--packed-step",
        action="store_true",
        help="also time a multi-crop step (2 x N + 8 x N/4 tiles) as one packed stream",
    )
    enc.set_defaults(func=_encoder)


def _device_dtype(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, dtype


def _attention(args) -> int:
    from slidessl.bench.attention import bench_attention

    device, dtype = _device_dtype(args)
    _default(args, "n", "attention_n", device)
    _default(args, "repeats", "attention_repeats", device)
    bench_attention(args.n, args.dim, args.heads, dtype, device, args.repeats, args.dense_limit)
    return 0


def _encoder(args) -> int:
    from slidessl.bench.encoder import bench_encoder
    from slidessl.models.dilated.kernels import set_lse_grad

    set_lse_grad(args.lse_grad)
    device, dtype = _device_dtype(args)
    _default(args, "n", "encoder_n", device)
    _default(args, "mem_n", "encoder_mem_n", device)
    if not args.batch or min(args.batch) < 1:
        print(f"bench encoder: --batch needs positive slide counts, got {args.batch}")
        return 2
    bench_encoder(
        args.preset,
        args.n,
        args.mem_n,
        dtype,
        device,
        args.repeats,
        exact_grad=not args.inexact_grad,
        warmup=not args.no_warmup,
        batch_sizes=args.batch,
        graphs=args.cuda_graphs,
        packed_step=args.packed_step,
    )
    return 0
