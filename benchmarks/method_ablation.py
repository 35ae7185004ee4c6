"""The method ablation of docs/evaluation.md: each lever on / off, on the same stored folds.

Every variant is the CPU recipe (``RECIPE+cpu``, default ``dinov2+cpu``) with one change,
pretrained on the cohort and probed (linear probe, 5 patient-grouped folds, the folds file
shared by every row) with one readout; baselines (mean pooling, prototypes, cooc, the
random-init encoder of the full recipe) are rows of the same table. Prints a markdown table
of AUROC fold mean ± std [pooled bootstrap 95% CI] per task.

    python benchmarks/method_ablation.py --out runs/ablation                    # all variants
    python benchmarks/method_ablation.py --out runs/abl_b --seed 1 --slides 240 \\
        --variants full,baselines                                              # another cohort

About 2-4 minutes per variant on two cores; results are cached per variant in OUT.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from slidessl import load_encoder
from slidessl.data.dataset import SlideDataset
from slidessl.data.manifest import load_manifest
from slidessl.data.synthetic import make_cohort
from slidessl.data.tasks import build_tasks
from slidessl.eval.embed import build_embedder, embed_items
from slidessl.eval.probe import run_probe
from slidessl.eval.prototypes import PrototypeEmbedder
from slidessl.train.config import load_config
from slidessl.train.loop import pretrain

TASKS = "tumor_high,infiltrated,normal_apart"
# name -> (overrides of the CPU recipe, readout, what it tests)
VARIANTS = {
    "full": ([], "mean", "the CPU recipe as shipped (token-mean readout)"),
    "readout cls": ([], "cls", "readout: the whole-slide CLS"),
    "readout regions:8": ([], "regions:8", "readout: mean CLS of 8 x 8-tile regions"),
    "no centring": (["model.overrides.input_center=false"], "mean", "stain: no slide centring"),
    "shift aug, no centring": (
        ["model.overrides.input_center=false", "crops.feature_shift=1.0", "crops.feature_gain=0.1"],
        "mean",
        "stain: per-crop feature shift / gain augmentation instead of centring",
    ),
    "no local attention": (
        ["model.overrides.local_kernel=0", "model.overrides.local_depth=0"],
        "mean",
        "bias: dense attention in both blocks",
    ),
    "grid conv, no local attention": (
        [
            "model.overrides.local_kernel=0",
            "model.overrides.local_depth=0",
            "model.overrides.grid_context=3",
        ],
        "mean",
        "bias: a 3 x 3 depthwise conv stem (PEG) instead of neighbourhood attention",
    ),
    "+ALiBi block": (
        ["model.overrides.depth=3", "model.overrides.pos_bias=alibi2d"],
        "mean",
        "bias: a third, global block with 2-D ALiBi",
    ),
    "thin crops": (["crops.oversize=thin"], "mean", "density: oversized windows thinned"),
    "no regions, thin": (
        ["crops.region_max_tiles=null", "crops.oversize=thin", "data.max_tiles=512"],
        "mean",
        "density: the old demo's crops (whole-slide windows, 512-tile cap, thinned)",
    ),
    "no iBOT": (["ibot.loss_weight=0.0"], "mean", "objective: DINO (+KoLeo) only"),
    "xy positions": (["model.overrides.pos_mode=xy"], "mean", "absolute 2-D sin-cos positions"),
    "CLS positions": (
        ["model.overrides.cls_pos=true"],
        "regions:8,24",
        "the CLS sees region-relative positions",
    ),
    "long-range": (
        ["model.overrides.pos_mode=xy", "train.epochs=15"],
        "regions:8,24",
        "cpu_longrange: xy positions, 15 epochs, regions read one by one",
    ),
}
# the levers again on the long-range recipe, where pretraining moves the encoder
_LONG = ["model.overrides.pos_mode=xy", "train.epochs=15"]
VARIANTS.update(
    {
        "long-range, no iBOT": (_LONG + ["ibot.loss_weight=0.0"], "regions:8,24", "objective"),
        "long-range, thin crops": (_LONG + ["crops.oversize=thin"], "regions:8,24", "density"),
        "long-range, no centring": (
            _LONG + ["model.overrides.input_center=false"],
            "regions:8,24",
            "stain",
        ),
    }
)


def _cohort(out: Path, n: int, seed: int, min_tiles: int, max_tiles: int) -> Path:
    manifest = out / "cohort" / "manifest.csv"
    if not manifest.exists():
        make_cohort(out / "cohort", n, seed=seed, min_tiles=min_tiles, max_tiles=max_tiles)
    return manifest


def _oracle(manifest, ids) -> np.ndarray:
    """Statistics of the generator's true tissue types (not label-free, not a method): the
    share of immune tiles' 4-neighbours that are neither tumour nor immune (infiltrated),
    the median pairwise distance between normal tiles (normal_apart), the tumour fraction."""
    import h5py
    from scipy.spatial.distance import pdist

    from slidessl.data.formats import open_slide
    from slidessl.data.tissue import IMMUNE, NORMAL, TUMOR

    paths = {e.slide_id: e.path for e in manifest.entries}
    rows = []
    for sid in ids:
        rec = open_slide(paths[sid])
        with h5py.File(paths[sid]) as f:
            t = f["tissue_type"][()]
        cells = {tuple(c): k for c, k in zip(rec.grid.tolist(), t)}
        nb = [cells.get((x + dx, y + dy)) for (x, y), k in cells.items() if k == IMMUNE
              for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]  # fmt: skip
        nb = [k for k in nb if k is not None]
        contact = np.mean([k not in (TUMOR, IMMUNE) for k in nb]) if nb else 0.0
        normal = rec.grid[t == NORMAL].astype(float)
        spread = np.median(pdist(normal)) if len(normal) > 1 else 0.0
        rows.append([contact, spread, np.mean(t == TUMOR)])
    return np.array(rows)


def _row(name, res, extra=""):
    cells = []
    for task in TASKS.split(","):
        s = res[task]
        lo, hi = s["auroc_ci"]
        cells.append(f"{s['auroc_mean']:.3f} ± {s['auroc_std']:.3f} [{lo:.2f}, {hi:.2f}]")
    return f"| {name} | " + " | ".join(cells) + f" | {extra} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--slides", type=int, default=180)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-tiles", type=int, default=200)
    ap.add_argument("--max-tiles", type=int, default=4000, help="as the demo's cohort")
    ap.add_argument("--recipe", default="dinov2")
    ap.add_argument(
        "--variants", default="all", help="names separated by ';' (or ','), 'baselines', or all"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    manifest_path = _cohort(out, args.slides, args.seed, args.min_tiles, args.max_tiles)
    manifest = load_manifest(manifest_path)
    tasks = build_tasks(manifest, [TASKS])
    folds = out / "folds.json"
    cache = out / "results.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    sep = ";" if ";" in args.variants else ","
    names = list(VARIANTS) + ["baselines"] if args.variants == "all" else args.variants.split(sep)
    slides = {}

    def items(cap):
        if cap not in slides:
            ds = SlideDataset(manifest, max_tiles=cap, seed=args.seed)
            slides[cap] = [ds[i] for i in range(len(ds))]
        return slides[cap]

    def probe(vecs_ids, X):
        res = run_probe(vecs_ids, X, tasks, folds, 5, args.seed, n_boot=500)
        return {tk.name: s for tk, s in zip(res[0], res[3])}

    for name in names:
        if name in results:
            continue
        t = time.time()
        if name == "baselines":
            its = items(4000)
            ids = [it["slide_id"] for it in its]
            rows = {
                "mean pooling": probe(ids, np.stack([it["features"].mean(0).numpy() for it in its]))
            }
            for kind in ("prototypes", "cooc"):
                emb = PrototypeEmbedder.fit_items(f"{kind}:16", its, args.seed)
                rows[f"{kind}:16"] = probe(ids, emb(its))
            rows["oracle: true-type statistics"] = probe(ids, _oracle(manifest, ids))
            results[name] = {"rows": rows, "seconds": time.time() - t}
        else:
            overrides, readout, _what = VARIANTS[name]
            run_dir = out / name.replace(" ", "_").replace(",", "").replace(":", "")
            cfg = load_config(
                f"{args.recipe}+cpu",
                [
                    f"data.manifest={manifest_path}",
                    f"out={run_dir}",
                    f"seed={args.seed}",
                    "train.progress=false",
                    *overrides,
                ],
            )
            tt = time.time()
            pretrain(cfg)
            train_s = time.time() - tt
            teacher = run_dir / "teacher"
            enc = load_encoder(teacher).eval()
            rows = {name: probe(*embed_items(enc, items(4000), readout, batch_size=8))}
            # the same architecture and readout, not pretrained: what pretraining adds
            rand, _ = build_embedder(f"random:{teacher}", enc.in_dim, args.seed)
            rows[f"{name}, random-init"] = probe(*embed_items(rand, items(4000), readout, 8))
            results[name] = {"rows": rows, "seconds": time.time() - t, "train_seconds": train_s}
        cache.write_text(json.dumps(results, indent=1, default=float))
        print(f"[ablation] {name}: {time.time() - t:.0f} s", flush=True)
    print(
        f"\nCohort: {args.slides} slides, seed {args.seed}; AUROC fold mean ± std [pooled 95% CI]"
    )
    print("| variant | " + " | ".join(TASKS.split(",")) + " | |")
    print("| --- |" + " --- |" * (len(TASKS.split(",")) + 1))
    for name in names:
        for row, res in results.get(name, {}).get("rows", {}).items():
            what = VARIANTS[name][2] if name in VARIANTS else "label-free baseline"
            if row.startswith("oracle"):
                what = "ground-truth tissue types: what the labels are made of (not a method)"
            if row.endswith("random-init"):
                what = "not pretrained (same architecture and readout)"
            print(_row(row, res, what))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
