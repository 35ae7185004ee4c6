"""``slidessl bench encoder``: forward+backward throughput of an encoder preset, model FLOP
utilisation against the measured matmul peak, peak memory, gradient checkpointing."""

from __future__ import annotations

import math

import torch

from slidessl.bench.harness import (
    DTYPES,
    device_name,
    matmul_peak,
    peak_mem,
    reset_mem,
    timeit,
)
from slidessl.models.dilated.kernels import lse_grad_mode
from slidessl.models.dilated.plan import attention_flops
from slidessl.models.encoder import build_encoder

__all__ = ["bench_encoder", "encoder_flops", "encoder_step", "packed_step_lengths"]


def encoder_flops(encoder, n) -> float:
    """Forward+backward model FLOPs (3x forward) for one slide of ``n`` tiles."""
    cfg = encoder.config
    e, mlp, depth = cfg["embed_dim"], cfg["mlp_dim"], cfg["depth"]
    tokens = n + 1
    linear = 2.0 * tokens * (depth * (4 * e * e + 2 * e * mlp)) + 2.0 * n * cfg["in_dim"] * e
    if cfg["attention"] == "dense":
        attn = depth * attention_flops(tokens, e)
    else:
        attn = depth * attention_flops(tokens, e, cfg["segments"], cfg["dilations"])
    return 3.0 * (linear + attn)


def encoder_step(encoder, n, device, dt, grid_side, batch=1, cache=True):
    """One fwd+bwd closure on static random inputs (``batch`` slides of ``n`` tiles, no
    padding mask: the no-mask path has no host sync, so it can be captured in a graph)."""
    x = torch.randn(batch, n, encoder.in_dim, device=device)
    idx = torch.arange(n, device=device)
    coords = torch.stack([idx % grid_side, idx // grid_side], -1)[None].expand(batch, -1, -1)
    return _fwd_bwd(encoder, device, dt, cache, lambda: encoder.forward_tokens(x, coords))


def _fwd_bwd(encoder, device, dt, cache, forward):
    """The timed closure: ``forward()`` -> ``(cls, tokens)`` under autocast to ``dt``, a
    squared-mean loss, backward."""

    def run():
        encoder.zero_grad(set_to_none=True)
        with torch.autocast(
            device.type, dtype=dt, enabled=dt != torch.float32, cache_enabled=cache
        ):
            cls, tokens = forward()
        (cls.float().pow(2).mean() + tokens.float().pow(2).mean()).backward()

    return run


def packed_step_lengths(n: int) -> list[int]:
    """Tiles per crop of the multi-crop step the packed row times: 2 global crops of ``n``
    tiles and 8 local crops of ``n / 4`` (the recipes' 2 + 8 crops)."""
    return [n, n] + [max(n // 4, 1)] * 8


def packed_encoder_step(encoder, n, device, dt, cache=True):
    """One fwd+bwd closure over the crops of :func:`packed_step_lengths` as one packed
    stream (``forward_packed``: the call ``SSLMetaArch`` makes with ``train.pack_crops``)."""
    lengths = packed_step_lengths(n)
    t = sum(lengths)
    x = torch.randn(t, encoder.in_dim, device=device)
    side = int(math.sqrt(n)) + 1
    idx = torch.cat([torch.arange(m, device=device) for m in lengths])
    coords = torch.stack([idx % side, idx // side], -1)
    return _fwd_bwd(encoder, device, dt, cache, lambda: encoder.forward_packed(x, coords, lengths))


def _graphed(step, device, warmup_iters=3):
    """Capture one fwd+bwd ``step`` into a ``torch.cuda.CUDAGraph``; return its replay.

    Follows PyTorch's whole-network capture recipe: warm-up iterations on a side stream
    (lazy init, cuBLAS workspaces, index caches), gradients set to None so that backward
    allocates them inside the graph's private pool, then one captured iteration.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_iters):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the eager warm-up's blocks would otherwise sit beside the pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph


def _row(encoder, n, batch, mode, sec, peak, device):
    flops = batch * encoder_flops(encoder, n)
    return {
        "n": n,
        "batch": batch,
        "mode": mode,
        "sec": sec,
        "tokens_per_s": batch * n / sec,
        "mfu": flops / sec / peak,
        "peak_mem": peak_mem(device),
    }


def _row_line(r):
    return (
        f"{r['n']:>7} {r['batch']:>5} {r['mode']:>6} {r['sec']:>10.3f} "
        f"{r['tokens_per_s']:>10.0f} {100 * r['mfu']:>8.1f} {r['peak_mem'] / 2**30:>13.2f}"
    )


def _graph_rows(encoder, ns, batch_sizes, device, dt, peak, repeats, out):
    """Time CUDA-graph replays of one captured fwd+bwd per (N, batch); failures are reported."""
    rows = []
    for n in ns:
        for b in batch_sizes:
            reset_mem(device)
            graph = None
            try:
                step = encoder_step(encoder, n, device, dt, int(math.sqrt(n)) + 1, b, cache=False)
                graph = _graphed(step, device)
                sec = timeit(graph.replay, device, repeats)
            except Exception as exc:  # any capture / replay failure is reported, not fatal
                msg = str(exc).strip().splitlines()
                out(
                    f"{n:>7} {b:>5} {'graph':>6} capture/replay failed: "
                    f"{type(exc).__name__}: {msg[0] if msg else ''}"
                )
                rows.append({"n": n, "batch": b, "mode": "graph", "sec": None, "error": str(exc)})
            else:
                rows.append(_row(encoder, n, b, "graph", sec, peak, device))
                out(_row_line(rows[-1]))
            del graph
            encoder.zero_grad(set_to_none=True)
            reset_mem(device)
    return rows


def bench_encoder(
    preset="gigapath",
    ns=(2048, 8192),
    mem_ns=(4096, 8192, 16384, 32768),
    dtype="float32",
    device="cpu",
    repeats=1,
    exact_grad=True,
    out=print,
    warmup=True,
    batch_sizes=(1,),
    graphs=False,
    packed_step=False,
):
    """Forward+backward tokens/s and utilisation per (N, batch); memory growth with
    checkpointing on; optionally the same steps replayed from CUDA graphs.

    ``packed_step``: also a row per N for a whole multi-crop step packed into one stream
    (2 crops of N tiles + 8 of N / 4, ``mode="packed"``, ``batch`` = 10 crops, ``tokens``
    all of them; MFU from the model FLOPs of each crop).

    Returns ``(rows, mem_rows)``; ``rows`` hold eager rows, packed rows, then graph rows
    (``mode``).
    """
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes}")
    device = torch.device(device)
    dt = DTYPES[dtype]
    peak = matmul_peak(device, dt)
    encoder = build_encoder(preset, exact_grad=exact_grad).to(device).train()
    for blk in encoder.blocks:  # deterministic timing: no stochastic depth, no dropout
        blk.drop_path.p = 0.0
    grads = f"exact ({lse_grad_mode(device)})" if exact_grad else "inexact"
    out(
        f"device {device_name(device)}, dtype {dtype}, preset {preset}, "
        f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M params, "
        f"LSE gradients {grads}, matmul peak {peak / 1e12:.2f} TFLOP/s (measured)"
    )
    header = (
        f"{'N':>7} {'batch':>5} {'mode':>6} {'fwd+bwd s':>10} {'tokens/s':>10} "
        f"{'MFU %pk':>8} {'peak mem GiB':>13}"
    )
    out(header)
    rows = []
    for n in ns:
        for b in batch_sizes:
            encoder.set_grad_checkpointing(False)
            reset_mem(device)
            step = encoder_step(encoder, n, device, dt, int(math.sqrt(n)) + 1, b)
            try:
                sec = timeit(step, device, repeats, warmup)
            except torch.OutOfMemoryError:
                encoder.zero_grad(set_to_none=True)
                del step
                reset_mem(device)
                rows.append({"n": n, "batch": b, "mode": "eager", "sec": None})
                out(f"{n:>7} {b:>5} {'eager':>6} out of memory")
                continue
            rows.append(_row(encoder, n, b, "eager", sec, peak, device))
            out(_row_line(rows[-1]))
            del step
    if packed_step:
        for n in ns:
            reset_mem(device)
            lengths = packed_step_lengths(n)
            try:
                sec = timeit(packed_encoder_step(encoder, n, device, dt), device, repeats, warmup)
            except torch.OutOfMemoryError:
                encoder.zero_grad(set_to_none=True)
                reset_mem(device)
                rows.append({"n": n, "batch": len(lengths), "mode": "packed", "sec": None})
                out(f"{n:>7} {len(lengths):>5} {'packed':>6} out of memory")
                continue
            flops = sum(encoder_flops(encoder, m) for m in lengths)
            rows.append(
                {
                    "n": n,
                    "batch": len(lengths),
                    "mode": "packed",
                    "sec": sec,
                    "tokens_per_s": sum(lengths) / sec,
                    "mfu": flops / sec / peak,
                    "peak_mem": peak_mem(device),
                }
            )
            out(_row_line(rows[-1]))
        out(f"packed: one stream of 2 x N + 8 x N/4 tiles per row ({sum(lengths)} at N={n})")
    out("activation checkpointing on (batch 1):")
    out(f"{'N':>7} {'fwd+bwd s':>10} {'MFU %pk':>8} {'peak mem GiB':>13} {'mem/token KiB':>14}")
    mem_rows = []
    encoder.set_grad_checkpointing(True)
    if (
        mem_ns and warmup
    ):  # one untimed checkpointed step so that one-off start-up is not in row one
        encoder_step(encoder, min(mem_ns), device, dt, int(math.sqrt(min(mem_ns))) + 1)()
    for n in mem_ns:
        reset_mem(device)
        try:
            sec = timeit(
                encoder_step(encoder, n, device, dt, int(math.sqrt(n)) + 1), device, 1, False
            )
        except torch.OutOfMemoryError:
            encoder.zero_grad(set_to_none=True)
            reset_mem(device)
            mem_rows.append({"n": n, "sec": None, "peak_mem": None, "mfu": None})
            out(f"{n:>7} out of memory")
            continue
        mem = peak_mem(device)
        mem_rows.append(
            {"n": n, "sec": sec, "peak_mem": mem, "mfu": encoder_flops(encoder, n) / sec / peak}
        )
        out(
            f"{n:>7} {sec:>10.3f} {100 * mem_rows[-1]['mfu']:>8.1f} {mem / 2**30:>13.2f} "
            f"{mem / n / 1024:>14.1f}"
        )
    if device.type == "cpu":
        out("cpu memory is the process's peak RSS so far (monotone), lengths run in order")
    encoder.set_grad_checkpointing(False)
    encoder.zero_grad(set_to_none=True)
    if graphs:
        if device.type != "cuda":
            out("cuda graphs: skipped (capture needs a CUDA device)")
        else:
            out("CUDA graph: one captured fwd+bwd (no padding mask), timed replays:")
            out(header)
            rows += _graph_rows(encoder, ns, batch_sizes, device, dt, peak, repeats, out)
    return rows, mem_rows
