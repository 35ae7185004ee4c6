"""Operators per encoder block: how many aten compute operators one gigapath block runs in
forward + backward at N tokens (torch.profiler, CPU), and how many of them are fused
attention calls. Counts, not times: a launch-bound GPU step costs about one kernel launch
per operator, so this is the number the GPU throughput work drives down.

    python benchmarks/bench_ops.py                 # N = 8193 (8,192 tiles + CLS)
    python benchmarks/bench_ops.py --n 4097 --top 30

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


def count(n: int, preset: str = "gigapath"):
    torch.manual_seed(0)
    enc = build_encoder(preset, depth=1).train()
    blk = enc.blocks[0]
    blk.drop_path.p = 0.0
    x = torch.randn(1, n, enc.embed_dim, requires_grad=True)

    def step():
        blk.zero_grad(set_to_none=True)
        x.grad = None
        y = blk(x)
        y.backward(torch.ones_like(y))

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8193)
    p.add_argument("--preset", default="gigapath")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    ops = count(args.n, args.preset)
    attn = sum(v for k, v in ops.items() if "scaled_dot_product" in k)
    print(
        f"{args.preset} block, {args.n} tokens, forward + backward: {sum(ops.values())} compute "
        f"operators, {attn} of them fused attention calls"
    )
    for name, c in ops.most_common(args.top):
        print(f"{c:>5}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
