"""Operators per encoder block: how many aten compute operators one gigapath block runs in
forward + backward, and how many of them are fused attention calls and linear layers.
Counts, not times: a launch-bound GPU step costs about one kernel launch per operator, so
this is the number the GPU throughput work drives down.

    python benchmarks/bench_ops.py                 # N = 8193 (8,192 tiles + CLS)
    python benchmarks/bench_ops.py --n 4097 --top 30
    python benchmarks/bench_ops.py --step          # a multi-crop step: 2 x 8k + 8 x 2k crops

``--step`` counts one block over every crop of a DINO step (2 global crops of 8,192 tiles
and 8 local crops of 2,048, each with its CLS: 32,778 tokens) run as one packed (varlen)
stream, the way ``SSLMetaArch`` runs it with ``train.pack_crops``, against the two padded
calls (globals, locals) it replaces.

View-only operators (view, reshape, slice, permute, transpose, ...) are not counted: they
launch nothing. The block's parameter gradients start at None (as after
``zero_grad(set_to_none=True)``), so gradient accumulation adds no operators.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from slidessl.models.encoder import build_encoder

VIEWS = {
    "aten::" + name
    for name in (
        "view alias reshape _reshape_alias _unsafe_view slice select narrow permute transpose t "
        "diagonal unsqueeze squeeze expand expand_as as_strided view_as detach lift_fresh "
        "result_type empty empty_like resolve_conj resolve_neg contiguous split chunk unbind "
        "flatten"
    ).split()
}


def _block(preset: str):
    torch.manual_seed(0)
    enc = build_encoder(preset, depth=1).train()
    blk = enc.blocks[0]
    blk.drop_path.p = 0.0
    return enc, blk


def _profile(blk, calls) -> collections.Counter:
    """Operators of forward + backward of ``blk`` over each ``(x, lengths)`` in ``calls``."""
    grads = [torch.ones_like(x) for x, _ in calls]  # outside the profile: not the block's

    def step():
        blk.zero_grad(set_to_none=True)
        for (x, lengths), g in zip(calls, grads):
            x.grad = None
            blk(x, None, None, None, lengths).backward(g)

    step()  # plans and one-time checks outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    top = [
        e
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        and e.name not in VIEWS
    ]
    return collections.Counter(e.name for e in top)


def count(n: int, preset: str = "gigapath") -> collections.Counter:
    enc, blk = _block(preset)
    return _profile(blk, [(torch.randn(1, n, enc.embed_dim, requires_grad=True), None)])


def count_step(globals_=(8192, 8192), locals_=(2048,) * 8, preset: str = "gigapath"):
    """``(packed, padded)`` operator counts of one block over a step's crops."""
    enc, blk = _block(preset)
    e = enc.embed_dim
    lengths = [n + 1 for n in (*globals_, *locals_)]
    packed = [(torch.randn(1, sum(lengths), e, requires_grad=True), lengths)]
    padded = [
        (torch.randn(len(ns), max(ns) + 1, e, requires_grad=True), None)
        for ns in (globals_, locals_)
        if ns
    ]
    return _profile(blk, packed), _profile(blk, padded)


def _summary(ops) -> str:
    attn = sum(v for k, v in ops.items() if "scaled_dot_product" in k)
    linear = ops.get("aten::linear", 0)
    return (
        f"{sum(ops.values())} compute operators, {attn} of them fused attention calls, "
        f"{linear} linear layers (forward)"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8193)
    p.add_argument("--preset", default="gigapath")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--step", action="store_true", help="2 x 8k + 8 x 2k crops, packed vs padded")
    args = p.parse_args(argv)
    if args.step:
        packed, padded = count_step(preset=args.preset)
        print(f"{args.preset} block, 2 x 8,192 + 8 x 2,048-tile crops (32,778 tokens), fwd + bwd:")
        print(f"  packed (one varlen call): {_summary(packed)}")
        print(f"  padded (globals, locals): {_summary(padded)}")
        ops = packed
    else:
        ops = count(args.n, args.preset)
        print(f"{args.preset} block, {args.n} tokens, forward + backward: {_summary(ops)}")
    for name, c in ops.most_common(args.top):
        print(f"{c:>5}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
