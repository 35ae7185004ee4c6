"""Peak memory of a pretraining step per recipe, measured, beside the trainer's estimate.

For every recipe and slide size, a synthetic cohort of slides with exactly that many tiles
(1,536-d features, as UNI2 / Prov-GigaPath tiles) and one optimizer step of
``slidessl pretrain RECIPE`` in a fresh process (``train.max_steps=1``, the recipe's crops,
encoder, heads and batch as shipped, plus ``--set`` overrides); prints the process's peak
RSS (``ru_maxrss``: weights, optimizer, activations, allocator slack; DataLoader workers
are off) against the estimate that ``train.memory_check`` compares with the machine.

    python benchmarks/bench_memory.py --out runs/bench_memory
    python benchmarks/bench_memory.py --out runs/bench_memory --recipes dinov2 --sizes 8192 \\
        --set train.precision=fp32 --set train.grad_checkpointing=true

Gradient accumulation does not raise the peak (each micro-batch's graph is freed by its
backward), so ``dinov2_grid`` runs one micro-batch per step here (``train.accum_steps=1``).
A gigapath-size step on a two-core CPU takes one to a few minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from slidessl.train.config import load_config
from slidessl.train.loop import pretrain
from slidessl.train.memory import MemoryBudgetError
recipe, overrides = sys.argv[1], sys.argv[2:]
t = time.time()
try:
    out = pretrain(load_config(recipe, overrides))
    summary = json.loads((out / "summary.json").read_text())
    res = {"estimate_gib": summary["memory_estimate_gib"], "steps": summary["steps"]}
except MemoryBudgetError as exc:
    res = {"refused": str(exc)}
res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
res["seconds"] = time.time() - t
print("RESULT " + json.dumps(res))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench_memory"))
    p.add_argument("--recipes", default="dino,dinov2,dinov2_grid")
    p.add_argument("--sizes", default="4096,8192", help="tiles per slide")
    p.add_argument("--slides", type=int, default=2, help="slides per cohort (>= batch size)")
    p.add_argument("--set", action="append", default=[], help="extra override KEY=VALUE")
    args = p.parse_args(argv)
    from slidessl.data.synthetic import make_cohort

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        manifest = args.out / f"cohort_{n}" / "manifest.csv"
        if not manifest.exists():
            make_cohort(manifest.parent, args.slides, seed=0, dim=1536, min_tiles=n, max_tiles=n)
        for recipe in args.recipes.split(","):
            overrides = [
                f"data.manifest={manifest}",
                f"out={args.out / f'{recipe}_{n}'}",
                "train.max_steps=1",
                "train.accum_steps=1",
                "train.progress=false",
                "train.tensorboard=false",
                "data.num_workers=0",
                *args.set,
            ]
            t = time.time()
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, recipe, *overrides], capture_output=True, text=True
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                res = {"error": f"exit {proc.returncode} after {time.time() - t:.0f} s"}
            else:
                res = json.loads(lines[-1][len("RESULT ") :])
            rows.append({"recipe": recipe, "tiles": n, **res})
            print(f"[memory] {recipe} {n}: {res}", flush=True)
    extra = " ".join(args.set) or "none"
    print(f"\nOverrides beyond the recipe: {extra}")
    print("| recipe | tiles per slide | estimate GiB | peak RSS GiB | peak / estimate | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "refused" in r:
            cells = ("refused before the first step", f"{r['peak_rss_gib']:.1f}", "-")
        elif "error" in r:
            cells = (r["error"], "-", "-")
        else:
            ratio = r["peak_rss_gib"] / r["estimate_gib"]
            cells = (f"{r['estimate_gib']:.1f}", f"{r['peak_rss_gib']:.1f}", f"{ratio:.2f}")
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        print(f"| {r['recipe']} | {r['tiles']} | " + " | ".join(cells) + f" | {secs} |")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
