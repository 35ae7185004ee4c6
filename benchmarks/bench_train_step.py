"""Training-step benchmark: slides/s and the share of each step spent waiting for data.

One optimizer step of the DINOv2 recipe with the ``gigapath`` slide encoder on global crops
of up to 8,192 tiles (plus local crops), fed by the real pipeline: ``SlideDataset`` ->
``MultiCrop`` -> ``collate_views`` in ``DataLoader`` workers, on a synthetic cohort of
1,536-d tile features. The target is a data-wait share <= 10%: the model never waits on
disk or crop sampling.

On a CPU the full 12-layer encoder at 8k tokens takes minutes per step, so the CPU defaults
shrink it (depth 1, 2,048-tile global and 256-tile local crops); the script prints what it
used. On a GPU the defaults are the real thing (depth 12, 8,192 tiles, bf16).

    python benchmarks/bench_train_step.py                       # CPU: a couple of minutes
    python benchmarks/bench_train_step.py --global-tiles 8192   # CPU, full-size crops (slow)
    python benchmarks/bench_train_step.py                       # GPU: gigapath, 8k tiles
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=12 if gpu else 1, help="encoder blocks")
    p.add_argument("--global-tiles", type=int, default=8192 if gpu else 2048)
    p.add_argument("--local-tiles", type=int, default=1024 if gpu else 256)
    p.add_argument("--n-local", type=int, default=8 if gpu else 2)
    p.add_argument("--batch", type=int, default=1, help="slides per step")
    p.add_argument(
        "--steps", type=int, default=5 if gpu else 2, help="timed steps (after one warm-up)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--slides", type=int, default=0, help="cohort size (default: enough)")
    p.add_argument("--precision", default="bf16" if gpu else "fp32", choices=["fp32", "bf16"])
    p.add_argument("--attention", default="dilated", choices=["dilated", "dense"])
    p.add_argument("--cohort", type=Path, default=None, help="reuse a cohort folder")
    args = p.parse_args(argv)

    from slidessl.data.synthetic import make_cohort
    from slidessl.ssl.meta import SSLMetaArch
    from slidessl.train.config import load_config
    from slidessl.train.data import CropDataset, build_multicrop, build_slide_dataset, make_loader
    from slidessl.train.distributed import SlideShardSampler
    from slidessl.train.optim import build_optimizer
    from slidessl.train.schedules import build_schedules
    from slidessl.train.step import optimizer_step

    device = torch.device("cuda" if gpu else "cpu")
    n_slides = args.slides or args.batch * (args.steps + 1)
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    root = args.cohort or Path(tmp.name) / "cohort"
    manifest = root / "manifest.csv"
    if not manifest.exists():
        t0 = time.perf_counter()
        lo = int(args.global_tiles * 1.1)
        make_cohort(root, n_slides, seed=0, dim=1536, min_tiles=lo, max_tiles=int(lo * 1.3))
        print(
            f"cohort: {n_slides} slides x >= {lo} tiles x 1536-d, written in "
            f"{time.perf_counter() - t0:.1f} s"
        )
    overrides = [
        f"data.manifest={manifest}",
        f"data.num_workers={args.workers}",
        f"data.max_tiles={args.global_tiles * 2}",
        "model.name=gigapath",
        f"model.overrides={{depth: {args.depth}, attention: {args.attention}}}",
        f"crops.global_max_tiles={args.global_tiles}",
        f"crops.local_max_tiles={args.local_tiles}",
        f"crops.n_local={args.n_local}",
        "crops.global_scale=[0.9, 1.0]",
        f"train.batch_size={args.batch}",
        f"train.precision={args.precision}",
        "koleo.loss_weight=0",
        "train.progress=false",
    ]
    cfg = load_config("dinov2", overrides)
    slides = build_slide_dataset(cfg)
    crops = CropDataset(slides, build_multicrop(cfg["crops"]), 0)
    sampler = SlideShardSampler(len(crops), args.batch, shuffle=False)
    arch = SSLMetaArch.from_config(cfg, slides.feature_dim).to(device).train()
    opt = build_optimizer(arch.student, cfg)
    sched = build_schedules(cfg, sampler.steps_per_epoch, args.batch).at(10)
    loader = iter(make_loader(crops, sampler, cfg, 0, 0, device))

    waits, steps, tokens = [], [], 0
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        optimizer_step(
            arch, arch, opt, [batch], sched, device=device, precision=args.precision, clip_grad=3.0
        )
        if gpu:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i > 0:  # the first step includes worker start-up and allocator warm-up
            waits.append(t1 - t0)
            steps.append(t2 - t0)
            tokens = int((~batch["global"]["padding_mask"]).sum())
    total = sum(steps)
    print(
        f"device: {torch.cuda.get_device_name() if gpu else 'cpu'} "
        f"({torch.get_num_threads()} threads), precision {args.precision}"
    )
    print(
        f"encoder: gigapath preset, depth {args.depth} (full: 12), attention {args.attention}, "
        f"{sum(p.numel() for p in arch.student['backbone'].parameters()) / 1e6:.1f} M params"
    )
    print(
        f"crops: 2 global x <= {args.global_tiles} tiles ({tokens} real global tokens in the "
        f"last batch), {args.n_local} local x <= {args.local_tiles}; batch {args.batch} slide(s)"
    )
    print(f"{'step time (s)':<28}{total / len(steps):>10.3f}")
    print(f"{'slides/s':<28}{args.batch * len(steps) / total:>10.3f}")
    share = sum(waits) / total
    print(
        f"{'data-wait share':<28}{share:>10.1%}   target <= 10%: "
        f"{'met' if share <= 0.10 else 'NOT met'}"
    )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
