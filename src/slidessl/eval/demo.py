"""``slidessl demo``: the whole question on one cohort, in minutes on a laptop CPU.

1. a synthetic cohort (``slidessl.data.synthetic.make_cohort``) in ``OUT/cohort`` unless
   ``--manifest`` is given;
2. pretraining of each recipe (``dino``, ``dinov2``, ``dinov2_grid`` by default) with the
   CPU sizes of ``configs/cpu.yaml`` (``RECIPE+cpu``) into ``OUT/pretrain/RECIPE``;
3. slide embeddings of every pretrained teacher and of a random-init encoder of the same
   architecture (``--pooling``), mean pooling of tile features, and the label-free
   ``prototypes`` / ``cooc`` baselines fitted on the cohort's tiles (and ``gigapath:PATH``
   with ``--gigapath``) - slides read once, capped at the recipes' ``data.max_tiles``;
4. the linear probe of each on the same patient-grouped folds (``OUT/folds.json``), ABMIL
   on the same folds, leave-one-patient-out retrieval; the survival task (``os``) gets the
   Cox probe and a Cox-loss ABMIL, and on the synthetic cohort the C-index of the true log
   hazard (``truth.csv``) as its ceiling;
5. ``slidessl report OUT``; prints the table, the verdict of each pretrained recipe against
   the baselines, and the report's path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEFAULT_TASKS = (
    "tumor_high,infiltrated,normal_apart,subtype,mutations=EGFR+FAT1+KRAS+LRP1B+TP53,"
    "os=surv:os_months:os_event"
)
DEFAULT_RECIPES = "dino,dinov2,dinov2_grid"
FEWSHOT_TASKS = ("tumor_high", "infiltrated")
WHITENED = "random-init-pca"
CEILING = "ceiling"
LABELS = {
    WHITENED: "random-init + PCA whitening",
    "abmil": "ABMIL",
    CEILING: "true log-hazard (ceiling)",
}
PROTOTYPE_BASELINES = ("prototypes", "cooc")


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _pretrain_all(args, manifest_path: Path, out: Path) -> tuple[dict, dict]:
    """``({recipe: teacher folder}, the first recipe's config)``, pretraining each recipe."""
    from slidessl.train.config import load_config
    from slidessl.train.loop import pretrain

    teachers, first = {}, None
    recipes = [r for r in args.recipes.split(",") if r]
    if not recipes:
        raise ValueError("--recipes names no recipe")
    for recipe in recipes:
        name = f"{recipe}+{args.overlay}" if args.overlay else recipe
        cfg = load_config(
            name,
            [
                f"data.manifest={manifest_path}",
                f"out={out / 'pretrain' / recipe}",
                f"seed={args.seed}",
                *args.overrides,
            ],
        )
        first = first or cfg
        if args.encoder:
            break
        _log(f"pretraining {name} -> {cfg['out']}")
        teachers[Path(recipe).stem] = Path(pretrain(cfg)) / "teacher"
    if args.encoder:  # evaluate an existing export instead of pretraining
        _log(f"skipping pretraining: evaluating {args.encoder}")
        teachers = {"pretrained": Path(args.encoder)}
    return teachers, first


def _embed_all(args, teachers: dict, items: list, feature_dim: int, cap: int, out: Path):
    """``{method: (slide_ids, (n, E) float32)}`` and ``{method: description}``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from slidessl.eval.embed import build_embedder, embed_items, pca_whiten
    from slidessl.eval.embed_io import EmbeddingWriter
    from slidessl.eval.maps import pick_map_items, write_maps
    from slidessl.eval.prototypes import PrototypeEmbedder

    specs = {name: str(t) for name, t in teachers.items()}
    specs["random-init"] = f"random:{next(iter(teachers.values()))}"
    specs["meanpool"] = "meanpool"
    # Encoders are built one after the other (the random init draws from the global RNG),
    # then run on two threads with one intra-op thread each: robust on a shared CPU.
    built = {
        name: build_embedder(spec, feature_dim, seed=args.seed) for name, spec in specs.items()
    }
    for kind in PROTOTYPE_BASELINES:
        spec = f"{kind}:{args.prototypes}"
        built[kind] = (
            PrototypeEmbedder.fit_items(spec, items, args.seed),
            f"{spec}:seed{args.seed}",
        )
        specs[kind] = spec
    pooling = {name: args.pooling for name in built}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            vectors = dict(
                zip(
                    built,
                    pool.map(
                        lambda kv: embed_items(kv[1][0], items, pooling[kv[0]], batch_size=8),
                        built.items(),
                    ),
                )
            )
    finally:
        torch.set_num_threads(threads)
    # the label-free bar a pretrained vector must clear too: the random init, PCA-whitened
    ids_r, vecs_r = vectors["random-init"]
    vectors[WHITENED] = (ids_r, pca_whiten(vecs_r, args.seed))
    built[WHITENED] = (None, f"{built['random-init'][1]} + PCA whitening")
    specs[WHITENED] = f"{specs['random-init']} + PCA whitening"
    pooling[WHITENED] = args.pooling
    emb, desc = {}, {}
    for name, (ids, vecs) in vectors.items():
        desc[name] = built[name][1]
        path = out / "embeddings" / f"{name}.h5"
        path.unlink(missing_ok=True)
        attrs = {"encoder": desc[name], "pooling": pooling[name], "max_tiles": cap}
        with EmbeddingWriter(path, attrs) as w:
            w.write(ids, vecs)
        emb[name] = (ids, vecs.astype(np.float32))
    # slide maps of the first recipe's teacher, for the report (which runs no model)
    focus = next(iter(teachers))
    write_maps(out / "embeddings" / f"{focus}.maps.npz", built[focus][0], pick_map_items(items, 3))
    if args.gigapath:
        from slidessl.eval.embed import run_embed
        from slidessl.eval.embed_io import read_embeddings

        path = out / "embeddings" / "gigapath.h5"
        path.unlink(missing_ok=True)
        run_embed(f"gigapath:{args.gigapath}", args.manifest_path, path, "cls", progress=False)
        ids, vecs, attrs = read_embeddings(path)
        emb["gigapath"], desc["gigapath"] = (ids, vecs), attrs.get("encoder", "gigapath")
        specs["gigapath"] = f"gigapath:{args.gigapath}"
    return emb, specs


def _diagnose(args, teachers, items, manifest, tasks, folds_path, out) -> None:
    """`slidessl diagnose` for the first recipe, its random init and mean pooling."""
    from slidessl.eval.diagnose import diagnose_items
    from slidessl.eval.embed import build_embedder

    first, teacher = next(iter(teachers.items()))
    dim = items[0]["features"].shape[1]
    for name, spec in ((first, str(teacher)), ("random-init", f"random:{teacher}"),
                       ("meanpool", "meanpool")):  # fmt: skip
        encoder, desc = build_embedder(spec, dim, seed=args.seed)
        res = diagnose_items(
            encoder, desc, items, manifest, tasks, folds_path, args.pooling, args.k, args.seed
        )
        res["method"] = name
        path = out / "diagnose" / name / "diagnose.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, default=float))


def _fewshot_names(args, tasks) -> list[str]:
    """The tasks that get few-shot probes: ``--fewshot-tasks``, else tumor_high and
    infiltrated on the synthetic cohort, else every task of a user's manifest."""
    if args.fewshot_tasks:
        return [t for t in args.fewshot_tasks.split(",") if t]
    names = [tk.name for tk in tasks]
    if all(n in names for n in FEWSHOT_TASKS):
        return list(FEWSHOT_TASKS)
    return names


def _mv_label(few_tasks) -> str | None:
    """The label whose MVAcc@5 the tables show: the last single-column few-shot task."""
    single = [tk.columns[0] for tk in few_tasks if len(tk.columns) == 1]
    return single[-1] if single else None


def _ceiling(tasks, manifest_path: Path, folds_path: Path, out: Path, seed: int) -> str | None:
    """The C-index of the generator's true log hazard on each survival task (synthetic
    cohorts: ``truth.csv`` beside the manifest), written as method ``ceiling``."""
    import csv

    import numpy as np

    from slidessl.eval.folds import resolve_folds
    from slidessl.eval.results import summarize, write_results

    surv = [tk for tk in tasks if tk.kind == "survival"]
    truth_path = manifest_path.parent / "truth.csv"
    if not surv or not truth_path.exists():
        return None
    with truth_path.open() as fh:
        truth = {r["slide_id"]: r.get("log_hazard") for r in csv.DictReader(fh)}
    if not all(truth.get(s) for tk in surv for s in tk.slide_ids):
        return None
    folds = [resolve_folds(tk, folds_path) for tk in surv]
    scores = [np.array([float(truth[s]) for s in tk.slide_ids]) for tk in surv]
    sums = [summarize(tk, f, s, 500, seed) for tk, f, s in zip(surv, folds, scores)]
    extra = {"kind": "oracle", "encoder": "the generator's true log hazard"}
    write_results(out / CEILING, CEILING, surv, folds, scores, sums, extra=extra)
    return CEILING


def run_demo(args) -> int:
    from slidessl.data.dataset import SlideDataset
    from slidessl.data.manifest import load_manifest
    from slidessl.data.tasks import build_tasks, default_task_specs
    from slidessl.eval.abmil import ABMILConfig, fewshot_scorer, run_abmil
    from slidessl.eval.fewshot import fewshot_task, parse_shots, run_fewshot
    from slidessl.eval.folds import resolve_folds
    from slidessl.eval.probe import run_probe
    from slidessl.eval.report import make_report
    from slidessl.eval.results import summarize, write_results
    from slidessl.eval.retrieval import run_retrieval

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.time()
    if args.manifest:
        manifest_path = Path(args.manifest)
        specs = args.task or [default_task_specs(load_manifest(manifest_path).label_columns)]
    else:
        from slidessl.data.synthetic import make_cohort

        manifest_path = out / "cohort" / "manifest.csv"
        if not manifest_path.exists():
            _log(f"synthesising {args.slides} slides into {out / 'cohort'}")
            make_cohort(out / "cohort", args.slides, seed=args.seed, max_tiles=4000)
        specs = args.task or [DEFAULT_TASKS]
    args.manifest_path = manifest_path
    manifest = load_manifest(manifest_path)
    tasks = build_tasks(manifest, specs)
    timings["cohort"] = time.time() - t0

    t = time.time()
    teachers, cfg = _pretrain_all(args, manifest_path, out)
    timings["pretrain"] = time.time() - t

    t = time.time()
    cap = int(cfg["data"]["max_tiles"])
    ds = SlideDataset(manifest, max_tiles=cap, seed=args.seed, on_bad_slide="skip")
    items = [it for it in (ds[i] for i in range(len(ds))) if it is not None]
    timings["read_slides"] = time.time() - t
    t = time.time()
    emb, methods = _embed_all(args, teachers, items, ds.feature_dim, cap, out)
    timings["embed"] = time.time() - t

    t = time.time()
    folds_path = out / "folds.json"
    folds_path.unlink(missing_ok=True)
    few_tasks = [tk for tk in tasks if tk.name in _fewshot_names(args, tasks)]
    shots = parse_shots(args.shots)
    for name, (ids, X) in emb.items():
        res = run_probe(
            ids,
            X,
            tasks,
            folds_path,
            args.k,
            args.seed,
            n_boot=500,
            where=str(out / "embeddings" / f"{name}.h5"),
        )
        few = run_fewshot(ids, X, few_tasks, shots, args.draws, args.seed, name)
        for tk, summary in zip(res[0], res[3]):
            if tk.name in few:
                summary["fewshot"] = few[tk.name]
        kind = {"encoder": methods[name], "pooling": args.pooling}
        write_results(out / "probe" / name, name, *res, extra={"kind": "linear-probe", **kind})
    timings["probe"] = time.time() - t

    t = time.time()
    feats = {it["slide_id"]: it["features"] for it in items}
    folds = [resolve_folds(tk, folds_path) for tk in tasks]
    acfg = ABMILConfig(
        lr=1e-3,
        epochs=6,
        patience=2,
        batch_size=16,
        train_tiles=16,
        val_tiles=64,
        eval_tiles=256,
        seed=args.seed,
    )
    a_tasks, a_folds, a_scores, _ = run_abmil(feats, tasks, folds, acfg, n_jobs=2)
    sums = [summarize(tk, f, s, 500, args.seed) for tk, f, s in zip(a_tasks, a_folds, a_scores)]
    for tk, summary in zip(a_tasks, sums):  # few-shot ABMIL: the same draws, fixed epochs
        if tk.name in {f.name for f in few_tasks}:
            tile_feats = [feats[sid] for sid in tk.slide_ids]
            scorer = fewshot_scorer(tile_feats, tk, acfg)
            # ABMIL trains once per draw: the first --abmil-draws of the same draws
            draws = min(args.draws, args.abmil_draws)
            summary["fewshot"] = fewshot_task(None, tk, shots, draws, args.seed, scorer)
    write_results(
        out / "abmil",
        "abmil",
        a_tasks,
        a_folds,
        a_scores,
        sums,
        extra={"kind": "abmil", "config": vars(acfg)},
    )
    timings["abmil"] = time.time() - t

    t = time.time()
    single = [tk for tk in tasks if tk.kind in ("binary", "multiclass")]
    for name, e in emb.items():
        for tk in single:
            run_retrieval(
                (*e, {"encoder": methods[name]}),
                manifest,
                tk.columns[0],
                out / "retrieval" / name / tk.name,
                name,
            )
    timings["retrieval"] = time.time() - t

    t = time.time()
    _diagnose(args, teachers, items, manifest, tasks, folds_path, out)
    timings["diagnose"] = time.time() - t

    t = time.time()
    ceiling = _ceiling(tasks, manifest_path, folds_path, out, args.seed)
    pretrained = list(teachers)
    meta = {
        "manifest": str(manifest_path.resolve()),
        "encoder": str(next(iter(teachers.values())).resolve()),
        "pretrain_dirs": {k: str(v.parent.resolve()) for k, v in teachers.items()},
        "focus": pretrained,
        "random_init": "random-init",
        "fewshot_tasks": [tk.name for tk in few_tasks],
        "retrieval_label": _mv_label(few_tasks),
        "labels": LABELS,
        "methods": {**methods, "abmil": "gated-attention ABMIL on tile features"},
        "pooling": args.pooling,
        "tasks": [tk.name for tk in tasks if tk.kind != "survival"],
        "survival_tasks": [tk.name for tk in tasks if tk.kind == "survival"],
        "ceiling": ceiling,
        "k": args.k,
        "description": (
            f"Demo: recipes {', '.join(f'`{r}`' for r in pretrained)} pretrained "
            f"({args.overlay or 'full'} sizes) on {len(manifest.entries)} slides; linear probes "
            f"of each teacher's `{args.pooling}` embedding, a random-init encoder of the same "
            f"architecture (the runs' step 0) raw and PCA-whitened, mean pooling, the "
            f"label-free `prototypes` / `cooc` baselines (K = {args.prototypes}) and ABMIL, on "
            f"the same {args.k} patient-grouped folds; few-shot probes (K = {args.shots} "
            f"patients per class, {args.draws} draws, the same for every method; ABMIL, "
            f"which trains per draw, on the first {min(args.draws, args.abmil_draws)}) and "
            f"leave-one-patient-out retrieval; survival tasks by a Cox probe and a Cox-loss "
            f"ABMIL on the same folds. Slides capped at {cap} tiles."
        ),
        "timings": timings,
    }
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    report = make_report(out)
    timings["report"] = time.time() - t
    timings["total"] = time.time() - t0
    meta["timings"] = timings
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    summary = json.loads((out / "report.json").read_text())
    print("\n".join(summary["tables"]))
    for line in summary["random_init_verdict"] + summary.get("survival_verdict", []):
        print(line.replace("**", "").replace("`", ""))
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"report: {report}")
    return 0
