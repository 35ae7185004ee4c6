"""``slidessl embed | probe | abmil | retrieve | report | diagnose | demo`` (docs/evaluation.md)."""

from __future__ import annotations

import json
from pathlib import Path

TASK_HELP = (
    "tasks, comma-separated: COL (binary or multi-class) or NAME=COL1+COL2 (multi-label), "
    "e.g. infiltrated,subtype,mutations=EGFR+FAT1+KRAS+LRP1B+TP53"
)


def register(sub) -> None:
    p = sub.add_parser("embed", help="one embedding per slide (h5, or parquet with pyarrow)")
    p.add_argument(
        "encoder",
        metavar="ENCODER",
        help="teacher folder / checkpoint, meanpool, random[:PRESET|PATH], gigapath:PATH",
    )
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--out", required=True, help="output .h5 (or .parquet)")
    p.add_argument("--pooling", default="cls", help="cls | mean | pooled | layers:-1,-2")
    p.add_argument("--max-tiles", type=int, default=8192, help="tile cap per slide (8192)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable slides")
    p.add_argument(
        "--maps",
        type=int,
        default=3,
        help="slides whose attention / PCA maps are stored beside OUT as OUT.maps.npz, for "
        "slidessl report (3; 0: none; encoders with attention blocks only)",
    )
    p.add_argument(
        "--gigapath-extrapolate",
        action="store_true",
        help="gigapath:PATH: continue the sin-cos position table past Prov-GigaPath's 1000 x "
        "1000 grid instead of refusing such slides",
    )
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("probe", help="k-fold logistic-regression probe of slide embeddings")
    p.add_argument("embeddings", metavar="EMBEDDINGS")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--task", required=True, action="append", help=TASK_HELP)
    p.add_argument("--folds", help="folds file (JSON): read when it has the task, else added")
    p.add_argument("--k", type=int, default=10, help="folds when new (10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--Cs", default="1e-4,1e-3,1e-2,1e-1,1,10", help="C grid")
    p.add_argument("--jobs", type=int, default=2, help="threads (2)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    p.add_argument("--method", help="name in tables (default: embeddings file stem)")
    p.add_argument(
        "--shots",
        help="also run few-shot probes with K labelled patients per class for each K given, "
        "e.g. 1,2,4,8,16 (TITAN's protocol, docs/evaluation.md)",
    )
    p.add_argument("--draws", type=int, default=50, help="few-shot draws per K (50)")
    p.add_argument("--out", required=True, help="output folder DIR")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("abmil", help="gated-attention ABMIL baseline on tile features")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--task", required=True, action="append", help=TASK_HELP)
    p.add_argument("--folds", required=True, help="folds file (shared with probe)")
    p.add_argument("--k", type=int, default=10, help="folds when new (10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-tiles", type=int, default=2048, help="tiles sampled per slide")
    p.add_argument("--max-tiles", type=int, default=8192, help="tiles loaded per slide")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--jobs", type=int, default=1, help="parallel fold trainings (threads)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_abmil)

    p = sub.add_parser("retrieve", help="leave-one-patient-out slide retrieval")
    p.add_argument("embeddings", metavar="EMBEDDINGS")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--label", required=True, help="label column")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_retrieve)

    p = sub.add_parser("report", help="report.md + report.json + plots of an evaluation run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "diagnose",
        help="why an encoder does (not) beat simple aggregation: coordinate shuffle, "
        "slide-identity leakage, per-layer probes",
    )
    p.add_argument("encoder", help="as for embed (teacher export, meanpool, random:...)")
    p.add_argument("manifest")
    p.add_argument("--task", action="append", required=True, help=TASK_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--pooling", default="mean", help="slide vector for the first two checks")
    p.add_argument("--max-tiles", type=int, default=4000)
    p.add_argument("--k", type=int, default=5, help="folds of the per-layer probes (5)")
    p.add_argument("--folds", help="folds file to share with other methods")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("demo", help="synthetic cohort -> pretrain -> embed -> probe -> report")
    p.add_argument("--out", required=True)
    p.add_argument("--manifest", help="use this cohort instead of a synthetic one")
    p.add_argument("--task", action="append", help=TASK_HELP)
    p.add_argument("--slides", type=int, default=180, help="synthetic slides (180)")
    p.add_argument("--k", type=int, default=5, help="folds (5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--recipes",
        default="dino,dinov2,dinov2_grid",
        help="pretraining recipes to compare, comma-separated (dino,dinov2,dinov2_grid)",
    )
    p.add_argument(
        "--overlay",
        default="cpu",
        help="recipe merged over each one (cpu: the CPU sizes of configs/cpu.yaml; '' = none)",
    )
    p.add_argument(
        "--pooling",
        default="mean",
        help="slide vector of the pretrained and random-init encoders (mean; see embed)",
    )
    p.add_argument("--prototypes", type=int, default=16, help="K of prototypes / cooc (16)")
    p.add_argument("--shots", default="1,2,4,8", help="few-shot K per class (1,2,4,8)")
    p.add_argument("--draws", type=int, default=50, help="few-shot draws per K (50)")
    p.add_argument(
        "--fewshot-tasks",
        help="tasks that get few-shot probes (default: tumor_high,infiltrated on the "
        "synthetic cohort, every task of --manifest)",
    )
    p.add_argument("--gigapath", help="also compare this Prov-GigaPath slide_encoder.pth")
    p.add_argument("--encoder", help="evaluate this teacher export instead of pretraining")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    p.set_defaults(func=cmd_demo)


def _manifest(path, check_files: bool = True):
    from slidessl.data.manifest import load_manifest

    return load_manifest(path, check_files=check_files)


def cmd_diagnose(args) -> int:
    from slidessl.eval.diagnose import format_diagnose, run_diagnose

    result = run_diagnose(
        args.encoder,
        args.manifest,
        args.task,
        args.out,
        pooling=args.pooling,
        max_tiles=args.max_tiles,
        k=args.k,
        seed=args.seed,
        folds=args.folds,
    )
    print(format_diagnose(result))
    print(f"written: {Path(args.out) / 'diagnose.json'}")
    return 0


def cmd_embed(args) -> int:
    from slidessl.eval.embed import run_embed

    s = run_embed(
        args.encoder,
        args.manifest,
        args.out,
        args.pooling,
        args.max_tiles,
        args.batch_size,
        args.seed,
        "skip" if args.skip_bad else "error",
        gigapath_extrapolate=args.gigapath_extrapolate,
        maps=args.maps,
    )
    print(f"embedded {s['written']} slides ({s['skipped_existing']} already there) -> {s['out']}")
    for sid, why in s["bad_slides"]:
        print(f"  skipped {sid}: {why}")
    return 0


def cmd_probe(args) -> int:
    from slidessl.data.tasks import build_tasks
    from slidessl.eval.embed_io import read_embeddings
    from slidessl.eval.probe import run_probe
    from slidessl.eval.results import format_table, write_results

    Cs = [float(c) for c in args.Cs.split(",") if c.strip()]
    manifest = _manifest(args.manifest, check_files=False)  # labels only
    tasks = build_tasks(manifest, args.task)
    ids, X, attrs = read_embeddings(args.embeddings)
    folds = args.folds or str(Path(args.out) / "folds.json")
    res = run_probe(
        ids,
        X,
        tasks,
        folds,
        args.k,
        args.seed,
        Cs,
        args.jobs,
        args.bootstrap,
        where=args.embeddings,
    )
    method = args.method or Path(args.embeddings).stem
    fewshot = None
    if args.shots:
        from slidessl.eval.fewshot import format_fewshot, parse_shots, run_fewshot

        shots = parse_shots(args.shots)
        fewshot = run_fewshot(ids, X, tasks, shots, args.draws, args.seed, args.embeddings)
        for task, summary in zip(res[0], res[3]):
            summary["fewshot"] = fewshot[task.name]
    extra = {
        "kind": "linear-probe",
        "embeddings": str(args.embeddings),
        "encoder": attrs.get("encoder"),
        "manifest": str(args.manifest),
        "folds": folds,
    }
    path = write_results(args.out, method, *res, extra=extra)
    print(format_table(method, {t.name: s for t, s in zip(res[0], res[3])}))
    if fewshot is not None:
        print(format_fewshot(method, fewshot, shots))
    print(f"metrics: {path}")
    return 0


def cmd_abmil(args) -> int:
    from slidessl.data.tasks import build_tasks
    from slidessl.eval.abmil import ABMILConfig, load_tile_features, run_abmil
    from slidessl.eval.folds import resolve_folds
    from slidessl.eval.results import format_table, summarize, write_results

    manifest = _manifest(args.manifest)
    tasks = build_tasks(manifest, args.task)
    folds = [resolve_folds(t, args.folds, args.k, args.seed) for t in tasks]
    feats = load_tile_features(manifest, args.max_tiles, args.seed)
    cfg = ABMILConfig(lr=args.lr, epochs=args.epochs, train_tiles=args.train_tiles, seed=args.seed)
    tasks, folds, scores, _ = run_abmil(feats, tasks, folds, cfg, n_jobs=args.jobs)
    sums = [summarize(t, f, s, args.bootstrap, args.seed) for t, f, s in zip(tasks, folds, scores)]
    extra = {
        "kind": "abmil",
        "manifest": str(args.manifest),
        "folds": args.folds,
        "config": vars(cfg),
    }
    path = write_results(args.out, "abmil", tasks, folds, scores, sums, extra=extra)
    print(format_table("abmil", {t.name: s for t, s in zip(tasks, sums)}))
    print(f"metrics: {path}")
    return 0


def cmd_retrieve(args) -> int:
    from slidessl.eval.embed_io import read_embeddings
    from slidessl.eval.retrieval import run_retrieval

    res = run_retrieval(
        read_embeddings(args.embeddings),
        _manifest(args.manifest, check_files=False),
        args.label,
        args.out,
        method=Path(args.embeddings).stem,
    )
    print(json.dumps({k: v for k, v in res.items() if k != "per_query"}, indent=1))
    return 0


def cmd_report(args) -> int:
    from slidessl.eval.report import make_report

    path = make_report(args.run_dir)
    print(f"report: {path}")
    return 0


def cmd_demo(args) -> int:
    from slidessl.eval.demo import run_demo

    return run_demo(args)
