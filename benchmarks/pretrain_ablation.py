"""Does pretraining pay over its own random init? Each method lever on / off, same draws.

Every variant is a CPU recipe (``--recipe``, default ``dinov2+cpu``) with some overrides,
pretrained (on the labelled cohort itself, or on ``--pretrain-slides`` unlabelled slides of
another seed), its teacher read with one readout, and scored on the labelled cohort with
the instruments of docs/evaluation.md, all on the same stored folds and draws:

- few-shot (TITAN's protocol: K labelled patients per class, logistic regression, 50
  draws): AUROC mean over K = 1, 2, 4, 8 (± mean over K of the std over draws) and at K=4,
  on ``tumor_high`` (composition) and ``infiltrated`` (arrangement);
- the full-data 5-fold linear probe AUROC (fold mean ± std) of both, and of ``normal_apart``;
- MVAcc@5 retrieval on ``infiltrated``;
- the run's health: DINO loss first -> last 10 steps, max grad norm, distance from init.

Under every variant, the random init of the *same* architecture and readout (the weights
the run started from), and the label-free baselines (mean pooling, ``cooc:16``, random init
+ PCA whitening) are rows of the same table. Results are cached per variant in OUT.

Each variant is one change to the *plain* recipe (``--common``, by default DINO on the CLS
without the arrangement contrast: the recipes as they were before this ablation); the
shipped recipe is the variant ``arrangement contrast``. Variants are separated by ``;``:

    python benchmarks/pretrain_ablation.py --out runs/abl_a --variants "base;arrangement contrast"
    python benchmarks/pretrain_ablation.py --out runs/abl_b --seed 1 --slides 240 \
        --variants "base;arrangement contrast"
    python benchmarks/pretrain_ablation.py --out runs/abl_scale --pretrain-slides 1000 \
        --variants "base;arrangement contrast"
"""

from __future__ import annotations

import argparse
import csv
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
from slidessl.eval.fewshot import run_fewshot
from slidessl.eval.probe import run_probe
from slidessl.eval.prototypes import PrototypeEmbedder
from slidessl.eval.retrieval import retrieval_metrics
from slidessl.train.config import load_config
from slidessl.train.loop import pretrain

# the recipes before the pretraining ablation: every lever is one change to this
PLAIN = "arrange.loss_weight=0.0;dino.readout=cls"
FEW = "tumor_high,infiltrated"
FULL = "tumor_high,infiltrated,normal_apart"
SHOTS = (1, 2, 4, 8)

# name -> (overrides of the recipe, readout, what it tests)
VARIANTS: dict[str, tuple[list[str], str, str]] = {
    "base": ([], "mean", "the plain recipe (--common), read by its token mean"),
    "arrangement contrast": (
        ["arrange.loss_weight=1.0", "dino.readout=mean"],
        "mean",
        "objective: + the token mean must tell a crop from its tiles shuffled",
    ),
    "30ep arrangement contrast": (
        ["train.epochs=30", "arrange.loss_weight=1.0", "dino.readout=mean"],
        "mean",
        "objective: + arrangement contrast, 30 epochs",
    ),
    "30ep arrangement contrast, no local crops": (
        ["train.epochs=30", "arrange.loss_weight=1.0", "dino.readout=mean", "crops.n_local=0"],
        "mean",
        "objective: + arrangement contrast, two global crops only, 30 epochs",
    ),
    "arrangement contrast x3": (
        ["arrange.loss_weight=3.0", "dino.readout=mean"],
        "mean",
        "objective: + arrangement contrast at weight 3",
    ),
    "30ep arrangement contrast x3, no local crops": (
        ["train.epochs=30", "arrange.loss_weight=3.0", "dino.readout=mean", "crops.n_local=0"],
        "mean",
        "objective: + arrangement contrast at weight 3, two global crops, 30 epochs",
    ),
    "arrangement contrast, no local crops": (
        ["arrange.loss_weight=1.0", "dino.readout=mean", "crops.n_local=0"],
        "mean",
        "objective: + arrangement contrast, two global crops only",
    ),
    "whole-slide crops, arrangement contrast": (
        ["crops.region_max_tiles=null", "arrange.loss_weight=1.0", "dino.readout=mean"],
        "mean",
        "crops anywhere in the slide + arrangement contrast",
    ),
    "whole-slide crops, arrangement contrast, no local crops": (
        [
            "crops.region_max_tiles=null",
            "arrange.loss_weight=1.0",
            "dino.readout=mean",
            "crops.n_local=0",
        ],
        "mean",
        "crops anywhere in the slide + arrangement contrast, two global crops only",
    ),
    "no centring": (
        ["model.overrides.input_center=false"],
        "mean",
        "architecture: no slide centring",
    ),
    "shift aug, no centring": (
        ["model.overrides.input_center=false", "crops.feature_shift=1.0", "crops.feature_gain=0.1"],
        "mean",
        "architecture: crop-level shift / gain augmentation instead of centring",
    ),
    "no local attention": (
        ["model.overrides.local_kernel=0", "model.overrides.local_depth=0"],
        "mean",
        "architecture: dense attention in both blocks",
    ),
    "grid conv, no local attention": (
        [
            "model.overrides.local_kernel=0",
            "model.overrides.local_depth=0",
            "model.overrides.grid_context=3",
        ],
        "mean",
        "architecture: a 3 x 3 depthwise conv stem (PEG) instead",
    ),
    "+ALiBi block": (
        ["model.overrides.depth=3", "model.overrides.pos_bias=alibi2d"],
        "mean",
        "architecture: a third, global block with 2-D ALiBi",
    ),
    "xy positions": (
        ["model.overrides.pos_mode=xy"],
        "mean",
        "architecture: absolute 2-D sin-cos positions",
    ),
    "CLS positions": (
        ["model.overrides.cls_pos=true"],
        "regions:8,24",
        "architecture: the CLS sees region-relative positions",
    ),
    "long-range": (
        ["model.overrides.pos_mode=xy", "train.epochs=15"],
        "regions:8,24",
        "cpu_longrange: xy positions, 15 epochs, regions read one by one",
    ),
    "thin crops": (["crops.oversize=thin"], "mean", "crops: oversized windows thinned"),
    "readout regions:8": ([], "regions:8", "readout: mean CLS of 8 x 8-tile regions"),
    "cls readout": ([], "cls", "readout: the CLS that DINO trains"),
    "DINO on the token mean": (
        ["dino.readout=mean"],
        "mean",
        "the vector read is the vector DINO trains",
    ),
    "whole-slide crops": (
        ["crops.region_max_tiles=null"],
        "mean",
        "crops anywhere in the slide (positives differ in position)",
    ),
    "K=256": (["dino.out_dim=256", "ibot.out_dim=256"], "mean", "prototypes 256"),
    "K=64": (["dino.out_dim=64", "ibot.out_dim=64"], "mean", "prototypes 64"),
    "30 epochs": (["train.epochs=30"], "mean", "schedule x5"),
    "no iBOT": (["ibot.loss_weight=0.0"], "mean", "objective: DINO + KoLeo"),
    "iBOT blocks <= 9 tiles": (
        ["crops.mask_max_block_tiles=9"],
        "mean",
        "masked tiles keep unmasked neighbours",
    ),
    "no KoLeo": (["koleo.loss_weight=0.0"], "mean", "KoLeo off"),
    "KoLeo 0.5": (["koleo.loss_weight=0.5"], "mean", "KoLeo x5"),
    "lr 3e-3": (["optim.lr=3e-3"], "mean", "lr x3"),
    "teacher temp 0.07": (
        ["teacher.temp=0.07", "teacher.warmup_temp=0.04", "teacher.warmup_temp_epochs=2"],
        "mean",
        "teacher temperature",
    ),
    "patient pairs": (["data.patient_pairs=1.0"], "mean", "positives across slides of one patient"),
    "30ep DINO on the token mean": (
        ["train.epochs=30", "dino.readout=mean"],
        "mean",
        "the vector read is the vector DINO trains",
    ),
    "30ep patient pairs": (
        ["train.epochs=30", "data.patient_pairs=1.0"],
        "mean",
        "positives across slides of one patient",
    ),
    "30ep iBOT x3, blocks <= 9": (
        ["train.epochs=30", "ibot.loss_weight=3.0", "crops.mask_max_block_tiles=9"],
        "mean",
        "tokens predicted from their neighbours",
    ),
    "30ep iBOT only, blocks <= 9": (
        [
            "train.epochs=30",
            "dino.loss_weight=0.0",
            "koleo.loss_weight=0.0",
            "crops.mask_max_block_tiles=9",
        ],
        "mean",
        "masked-tile prediction alone",
    ),
    "30ep VICReg on the token mean": (
        ["train.epochs=30", "dino.readout=mean", "vicreg.loss_weight=1.0"],
        "mean",
        "well-conditioned slide vectors",
    ),
    "30ep whole-slide crops": (
        ["train.epochs=30", "crops.region_max_tiles=null"],
        "mean",
        "positives differ in position",
    ),
    "30ep no local crops": (
        ["train.epochs=30", "crops.n_local=0"],
        "mean",
        "views that all hold the evidence: two global crops only",
    ),
    "30ep no local crops, whole-slide": (
        ["train.epochs=30", "crops.n_local=0", "crops.region_max_tiles=null"],
        "mean",
        "two global crops anywhere in the slide",
    ),
    "30ep local crops 0.3-0.6": (
        ["train.epochs=30", "crops.local_scale=[0.3,0.6]"],
        "mean",
        "larger local crops",
    ),
    "30ep no local crops, DINO on mean": (
        ["train.epochs=30", "crops.n_local=0", "dino.readout=mean"],
        "mean",
        "two global crops; the read vector trained",
    ),
    "mask ratio 0.1-0.3": (["crops.mask_ratio=[0.1,0.3]"], "mean", "iBOT: fewer masked tiles"),
    "mask ratio 0.5-0.8": (["crops.mask_ratio=[0.5,0.8]"], "mean", "iBOT: more masked tiles"),
    "feature noise 0.2": (
        ["crops.feature_noise=0.2"],
        "mean",
        "feature-space augmentation: per-tile noise",
    ),
    "token drop 0.3": (
        ["crops.token_drop=0.3"],
        "mean",
        "feature-space augmentation: drop 30% of a crop's tiles",
    ),
    "teacher momentum 0.996": (["teacher.momentum=0.996"], "mean", "slower teacher"),
    "out dim 16k": (["dino.out_dim=16384", "ibot.out_dim=16384"], "mean", "prototypes 16,384"),
}


def _oracle(manifest, ids) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of the generator's true tissue types (not label-free, not a method):
    ``(label statistics, every slide-level factor)``. The first: the share of immune tiles'
    4-neighbours that are neither tumour nor immune (infiltrated), the median distance
    between normal tiles (normal_apart), the tumour fraction. The second adds the fraction
    of every tissue type and the subtype: what an encoder that captured every factor of the
    generator exactly would hold - the few-shot ceiling that nuisance factors leave."""
    import h5py
    from scipy.spatial.distance import pdist

    from slidessl.data.formats import open_slide
    from slidessl.data.tissue import IMMUNE, NORMAL, SUBTYPES, TISSUE_TYPES, TUMOR

    entries = {e.slide_id: e for e in manifest.entries}
    label_stats, factors = [], []
    for sid in ids:
        rec = open_slide(entries[sid].path)
        with h5py.File(entries[sid].path) as f:
            t = f["tissue_type"][()]
        cells = {tuple(c): k for c, k in zip(rec.grid.tolist(), t)}
        nb = [cells.get((x + dx, y + dy)) for (x, y), k in cells.items() if k == IMMUNE
              for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]  # fmt: skip
        nb = [k for k in nb if k is not None]
        contact = np.mean([k not in (TUMOR, IMMUNE) for k in nb]) if nb else 0.0
        normal = rec.grid[t == NORMAL].astype(float)
        spread = np.median(pdist(normal)) if len(normal) > 1 else 0.0
        fractions = [np.mean(t == k) for k in range(len(TISSUE_TYPES))]
        subtype = [float(entries[sid].labels.get("subtype") == s) for s in SUBTYPES]
        label_stats.append([contact, spread, fractions[TUMOR]])
        factors.append([contact, spread, *fractions, *subtype])
    return np.array(label_stats), np.array(factors)


def _load_variants(path: Path | None) -> None:
    """More variants from a JSON file ``{name: [overrides, readout, what]}``."""
    if path is not None and path.exists():
        for name, (ov, readout, what) in json.loads(path.read_text()).items():
            VARIANTS[name] = (list(ov), readout, what)


def _cohort(root: Path, n: int, seed: int, lo: int, hi: int) -> Path:
    manifest = root / "manifest.csv"
    if not manifest.exists():
        make_cohort(root, n, seed=seed, min_tiles=lo, max_tiles=hi)
    return manifest


def _embed(encoder, items, readout, ids) -> np.ndarray:
    """Slide vectors in the order of ``ids`` (embed_items batches by length)."""
    got, X = embed_items(encoder, items, readout, batch_size=8)
    index = {s: i for i, s in enumerate(got)}
    return X[[index[s] for s in ids]]


def _pca_whiten(X: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    n_comp = min(X.shape[0] - 1, X.shape[1])
    return PCA(n_components=n_comp, whiten=True, random_state=0).fit_transform(X)


def _scores(ids, X, tasks_few, tasks_full, manifest, folds, seed) -> dict:
    few = run_fewshot(ids, X, tasks_few, SHOTS, 50, seed)
    full = run_probe(ids, X, tasks_full, folds, 5, seed, n_boot=200)
    out = {"fewshot": {}, "full": {}}
    for name, r in few.items():
        stds = [r[str(k)]["std"] for k in SHOTS if str(k) in r]
        out["fewshot"][name] = {
            "mean_over_k": r["mean_over_k"],
            "std_over_draws": float(np.mean(stds)),
            "k4": r["4"]["mean"],
            "k4_std": r["4"]["std"],
            "per_k": {str(k): r[str(k)]["mean"] for k in SHOTS if str(k) in r},
        }
    for t, s in zip(full[0], full[3]):
        out["full"][t.name] = {"mean": s["auroc_mean"], "std": s["auroc_std"]}
    index = {sid: i for i, sid in enumerate(ids)}
    rows = [e for e in manifest.entries if e.slide_id in index]
    ret = retrieval_metrics(
        X[[index[e.slide_id] for e in rows]],
        [e.labels["infiltrated"] for e in rows],
        [e.patient_id for e in rows],
        ks=(5,),
    )
    out["mvacc5_infiltrated"] = ret["mvacc@5"]
    return out


def _health(run_dir: Path) -> dict:
    with (run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    dino = np.array([float(r["dino_loss"]) for r in rows])
    grad = np.array([float(r["grad_norm"]) for r in rows])
    wd = [float(r["weight_dist"]) for r in rows if r.get("weight_dist") not in (None, "", "nan")]
    return {
        "dino_first10": float(np.nanmean(dino[:10])),
        "dino_last10": float(np.nanmean(dino[-10:])),
        "grad_max": float(np.nanmax(grad)),
        "grad_finite": bool(np.isfinite(grad).all()),
        "weight_dist": wd[-1] if wd else float("nan"),
        "steps": len(rows),
    }


def _fmt(r: dict) -> list[str]:
    cells = []
    for t in FEW.split(","):
        f = r["fewshot"][t]
        cells.append(f"{f['mean_over_k']:.3f} ± {f['std_over_draws']:.3f} / {f['k4']:.3f}")
    for t in FULL.split(","):
        s = r["full"][t]
        cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}")
    cells.append(f"{r['mvacc5_infiltrated']:.3f}")
    return cells


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--slides", type=int, default=180)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-tiles", type=int, default=200)
    ap.add_argument("--max-tiles", type=int, default=4000)
    ap.add_argument("--pretrain-slides", type=int, default=0,
                    help="pretrain on this many unlabelled slides of seed + 100 (0: on the "
                    "labelled cohort itself)")  # fmt: skip
    ap.add_argument("--recipe", default="dinov2+cpu")
    ap.add_argument("--variants", default="base", help="names separated by ';'")
    ap.add_argument("--variants-file", type=Path, help="JSON {name: [overrides, readout, what]}")
    ap.add_argument(
        "--common",
        default=PLAIN,
        help="overrides for every variant, ';'-separated (default: the plain recipe - DINO on "
        "the CLS, no arrangement contrast - that every lever is measured against)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _load_variants(args.variants_file)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = _cohort(out / "cohort", args.slides, args.seed, args.min_tiles, args.max_tiles)
    train_manifest = manifest_path
    if args.pretrain_slides:
        train_manifest = _cohort(out / "unlabelled", args.pretrain_slides, args.seed + 100,
                                 args.min_tiles, args.max_tiles)  # fmt: skip
    manifest = load_manifest(manifest_path)
    tasks_few = build_tasks(manifest, [FEW])
    tasks_full = build_tasks(manifest, [FULL])
    folds = out / "folds.json"
    cache = out / "results.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    ds = SlideDataset(manifest, max_tiles=args.max_tiles, seed=args.seed)
    items = [ds[i] for i in range(len(ds))]
    ids = [it["slide_id"] for it in items]
    dim = items[0]["features"].shape[1]
    common = [c for c in args.common.split(";") if c]

    def score(X):
        return _scores(ids, X, tasks_few, tasks_full, manifest, folds, args.seed)

    if "baselines" not in results:
        t = time.time()
        rows = {"mean pooling": score(np.stack([it["features"].mean(0).numpy() for it in items]))}
        emb = PrototypeEmbedder.fit_items("cooc:16", items, args.seed)
        rows["cooc:16"] = score(emb(items))
        results["baselines"] = {"rows": rows, "seconds": time.time() - t}
        cache.write_text(json.dumps(results, indent=1, default=float))
    if "oracle" not in results:
        stats, factors = _oracle(manifest, ids)
        results["oracle"] = {
            "rows": {
                "oracle: the labels' own statistics": score(stats),
                "oracle: every slide-level factor": score(factors),
            }
        }
        cache.write_text(json.dumps(results, indent=1, default=float))
    for name in [v for v in args.variants.split(";") if v]:
        if name in results:
            continue
        overrides, readout, _what = VARIANTS[name]
        run_dir = out / "runs" / name.replace(" ", "_").replace(",", "").replace(":", "")
        cfg = load_config(
            args.recipe,
            [f"data.manifest={train_manifest}", f"out={run_dir}", f"seed={args.seed}",
             "train.progress=false", "train.checkpoint_every=0", *common, *overrides],
        )  # fmt: skip
        t = time.time()
        pretrain(cfg)
        train_s = time.time() - t
        enc = load_encoder(run_dir / "teacher").eval()
        X = _embed(enc, items, readout, ids)
        # the run's own step 0: the arch is drawn right after seeding with cfg.seed
        rand, _ = build_embedder(f"random:{run_dir / 'teacher'}", dim, int(cfg["seed"]))
        Xr = _embed(rand, items, readout, ids)
        results[name] = {
            "rows": {
                name: score(X),
                f"{name}, random-init": score(Xr),
                f"{name}, random-init + PCA whitening": score(_pca_whiten(Xr)),
            },
            "health": _health(run_dir),
            "train_seconds": train_s,
            "seconds": time.time() - t,
            "overrides": [*common, *overrides],
            "readout": readout,
        }
        cache.write_text(json.dumps(results, indent=1, default=float))
        print(f"[ablation] {name}: {time.time() - t:.0f} s", flush=True)

    print(
        f"\nCohort: {args.slides} labelled slides, seed {args.seed}; pretraining on "
        + (
            f"{args.pretrain_slides} unlabelled slides (seed {args.seed + 100})"
            if args.pretrain_slides
            else "the same slides, labels unread"
        )  # fmt: skip
        + f"; recipe {args.recipe} {' '.join(common)}"
    )
    head = [f"{t} few-shot mean K=1,2,4,8 ± std / K=4" for t in FEW.split(",")]
    head += [f"{t} full probe" for t in FULL.split(",")] + ["MVAcc@5 infiltrated", "health"]
    print("| variant | " + " | ".join(head) + " |")
    print("| --- |" + " --- |" * len(head))
    shown: dict[str, str] = {}  # a random init printed once per architecture and readout
    for name in ["baselines", "oracle", *[v for v in args.variants.split(";") if v]]:
        res = results.get(name)
        if res is None:
            continue
        h = res.get("health")
        for row, r in res["rows"].items():
            if row != name and h:
                key = json.dumps(r, sort_keys=True)
                if key in shown:
                    continue
                shown[key] = row
            health = ""
            if h and row == name:
                health = (
                    f"DINO {h['dino_first10']:.2f} -> {h['dino_last10']:.2f}, grad max "
                    f"{h['grad_max']:.3g}, dist {h['weight_dist']:.3f}"
                )
            print(f"| {row} | " + " | ".join(_fmt(r)) + f" | {health} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
