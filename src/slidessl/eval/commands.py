"""``slidessl embed | probe | abmil | retrieve | report`` (docs/evaluation.md); ``diagnose`` and
``demo`` are registered from ``eval.demo_commands``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slidessl.eval.demo_commands import TASK_HELP, command, register_demo


def _max_tiles(text: str):
    """``--max-tiles``: a positive integer, ``auto`` or ``all`` (None: no cap)."""
    if text in ("auto", "all"):
        return None if text == "all" else text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, auto or all, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _workers(p) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes that read slide files while this one computes (at most the usable "
        "CPUs minus one; 0: read here)",
    )


def _embeddings_and_manifest(p, columns: str) -> None:
    """The EMBEDDINGS and MANIFEST positionals of probe and retrieve."""
    p.add_argument(
        "embeddings", metavar="EMBEDDINGS", help="embeddings file written by slidessl embed"
    )
    p.add_argument(
        "manifest",
        metavar="MANIFEST",
        help=f"manifest with the label {columns} and patient_id (slide files are not opened)",
    )


def _folds_k(p) -> None:
    """``--k`` of probe and abmil (the folds they share)."""
    p.add_argument(
        "--k",
        type=int,
        default=10,
        help="number of folds when the folds are new (an existing folds file keeps its own); "
        "the demo uses 5",
    )


def register(sub) -> None:
    p = command(
        sub,
        "embed",
        cmd_embed,
        help="one embedding per slide (h5, or parquet with pyarrow)",
        description=(
            "Write one vector per slide of MANIFEST to --out (HDF5, or parquet with pyarrow) "
            "with ENCODER: a pretrained teacher or a baseline, every slide read through the "
            "same pipe (up to --max-tiles tiles, spatial order, eval mode, deterministic). "
            "Slides already in --out are kept and the others added, so a stopped run "
            "resumes; attention / PCA maps of --maps slides go beside it for `slidessl "
            "report`. Example: slidessl embed runs/dinov2/teacher cohort/manifest.csv --out "
            "emb/pretrained.h5 --pooling mean"
        ),
    )
    p.add_argument(
        "encoder",
        metavar="ENCODER",
        help="what embeds the slides: a teacher export folder (OUT/teacher of slidessl "
        "pretrain), its model.safetensors, or a training checkpoint OUT/checkpoints/ckpt-*.pt; "
        "meanpool (the mean of the tile features, no model); random, random:PRESET (tiny, "
        "small, base, gigapath) or random:PATH (seeded random init of the architecture of "
        "the export at PATH); prototypes[:K[:kmeans|gmm]] or cooc[:K[:kmeans|gmm]] (the "
        "label-free prototype baselines, K=16 by default, fitted on these slides' tiles); "
        "gigapath:PATH (a Prov-GigaPath slide_encoder.pth, run as the published pipeline)",
    )
    p.add_argument(
        "manifest",
        metavar="MANIFEST",
        help="the slides: a manifest CSV/TSV (slide_id, path, ...), a folder holding "
        "manifest.csv, or a folder of slide files",
    )
    p.add_argument(
        "--out", required=True, help="embeddings file to write or resume: .h5 (or .parquet)"
    )
    p.add_argument(
        "--pooling",
        default="auto",
        help="slide vector of an encoder. auto: mean for slidessl encoders (how the shipped "
        "recipes are trained and read), cls for gigapath:PATH (its published readout). "
        "cls (final CLS token), mean (mean of the final "
        "tile tokens; what the README and the demo use), pooled (the encoder's configured "
        "pool), layers:I,J,... (pooled outputs of blocks I, J, ... concatenated; negative "
        "counts from the last block), regions:S[,S2,...] (mean of the CLS of S x S-tile "
        "regions, concatenated over the sides given). gigapath:PATH takes cls, pooled, "
        "mean, forward-cls, forward-mean, layers:I,J or mean-layers:I,J (docs/evaluation.md); "
        "meanpool, prototypes and cooc ignore it (the file records pooling=none)",
    )
    p.add_argument(
        "--max-tiles",
        type=_max_tiles,
        default="auto",
        help="tile cap per slide: a larger slide is read as a spatially uniform subsample "
        "seeded by (--seed, slide id). auto: every tile for meanpool / prototypes / cooc "
        "(cheap), 8192 for encoders; 'all' never caps",
    )
    p.add_argument("--batch-size", type=int, default=4, help="slides per forward pass")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the tile subsample, of random:... weights and of the prototype fits",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (and list) slides that cannot be read instead of stopping with exit 2",
    )
    p.add_argument(
        "--maps",
        type=int,
        default=3,
        help="slides whose attention / PCA maps are stored beside --out as STEM.maps.npz, "
        "for slidessl report (0: none; encoders with attention blocks only)",
    )
    p.add_argument(
        "--gigapath-extrapolate",
        action="store_true",
        help="gigapath:PATH: continue the sin-cos position table past Prov-GigaPath's 1000 x "
        "1000 grid instead of refusing such slides",
    )
    _workers(p)

    p = command(
        sub,
        "probe",
        cmd_probe,
        help="k-fold logistic-regression probe of slide embeddings",
        description=(
            "Linear probe of slide embeddings: for each task, patient-grouped, "
            "label-stratified k-fold logistic regression (C chosen by inner CV), AUROC / AUPRC "
            "per fold with bootstrap CIs; survival tasks get an elastic-net Cox probe (penalty "
            "by inner CV) and per-patient Harrell's / Uno's C-index and a log-rank test. "
            "Reads EMBEDDINGS (from slidessl embed) and the "
            "labels of MANIFEST; writes OUT/metrics.json and OUT/predictions.npz and prints a "
            "table. Folds come from --folds (OUT/folds.json when not given), created when the "
            "file is missing or lacks the task, so every method shares them. Example: "
            "slidessl probe emb/pretrained.h5 cohort/manifest.csv --task infiltrated,subtype "
            "--folds eval/folds.json --out eval/pretrained"
        ),
    )
    _embeddings_and_manifest(p, "columns")
    p.add_argument("--task", required=True, action="append", help=TASK_HELP + "; repeatable")
    p.add_argument(
        "--folds",
        help="folds file (JSON), optional: read when it has the task, else the task's folds "
        "are made (--k, --seed) and added; the file is created when missing (not given: "
        "OUT/folds.json)",
    )
    _folds_k(p)
    p.add_argument("--seed", type=int, default=0, help="seed of new folds, inner CV, bootstrap")
    p.add_argument("--Cs", default="1e-4,1e-3,1e-2,1e-1,1,10", help="comma-separated C grid")
    p.add_argument(
        "--l1-ratio",
        type=float,
        default=0.5,
        help="survival tasks: the Cox probe's elastic-net mix (1 = lasso, near 0 = ridge)",
    )
    p.add_argument("--jobs", type=int, default=2, help="threads for the (task, fold) fits")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--method", help="name in tables (not given: the embeddings file stem)")
    p.add_argument(
        "--shots",
        help="also run few-shot probes with K labelled patients per class for each K given, "
        "e.g. 1,2,4,8,16 (TITAN's protocol, docs/evaluation.md; not for survival tasks)",
    )
    p.add_argument("--draws", type=int, default=50, help="few-shot draws per K")
    p.add_argument("--out", required=True, help="output folder OUT")

    p = command(
        sub,
        "abmil",
        cmd_abmil,
        help="gated-attention ABMIL baseline on tile features",
        description=(
            "Train and test a gated-attention ABMIL (Ilse et al.) on the tile features of "
            "MANIFEST's slides, on the same patient-grouped folds as the probe, as the "
            "supervised baseline a slide embedding must beat. Reads the slide files and "
            "labels; writes OUT/metrics.json and OUT/predictions.npz and prints a table. "
            "--folds is required (created when missing, so run it with the same file as "
            "probe). Example: slidessl abmil cohort/manifest.csv --task infiltrated --folds "
            "eval/folds.json --out eval/abmil"
        ),
    )
    p.add_argument(
        "manifest",
        metavar="MANIFEST",
        help="manifest (slide files, labels, patient_id), or a folder holding manifest.csv",
    )
    p.add_argument("--task", required=True, action="append", help=TASK_HELP + "; repeatable")
    p.add_argument(
        "--folds",
        required=True,
        help="folds file (JSON), required: shared with probe; read when it has the task, "
        "else the task's folds are made (--k, --seed) and added (file created when missing)",
    )
    _folds_k(p)
    p.add_argument("--seed", type=int, default=0, help="seed of new folds, tile sampling, training")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per fold")
    p.add_argument("--train-tiles", type=int, default=2048, help="tiles sampled per slide")
    p.add_argument("--max-tiles", type=int, default=8192, help="tiles loaded per slide")
    _workers(p)
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    p.add_argument("--jobs", type=int, default=1, help="parallel fold trainings (threads)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--out", required=True, help="output folder OUT")

    p = command(
        sub,
        "retrieve",
        cmd_retrieve,
        help="leave-one-patient-out slide retrieval",
        description=(
            "Slide retrieval by cosine similarity of slide embeddings: each slide queries "
            "the slides of all other patients; prints and writes Acc@K, MVAcc@K and mAP@K "
            "of the --label column to OUT/retrieval.json. Reads EMBEDDINGS (from slidessl "
            "embed) and MANIFEST's labels. Example: slidessl retrieve emb/pretrained.h5 "
            "cohort/manifest.csv --label subtype --out eval/pretrained"
        ),
    )
    _embeddings_and_manifest(p, "column")
    p.add_argument("--label", required=True, help="label column of MANIFEST")
    p.add_argument("--out", required=True, help="output folder OUT")

    p = command(
        sub,
        "report",
        cmd_report,
        help="report.md + report.json + plots of an evaluation run",
        description=(
            "Collect an evaluation run into one page: reads every metrics.json (probe, "
            "abmil) and retrieval.json under RUN_DIR, a pretraining metrics.csv and the slide "
            "maps stored beside embeddings when present; writes RUN_DIR/report.md, "
            "RUN_DIR/report.json and PNG figures under RUN_DIR/figures. Runs no model. "
            "Example: slidessl report eval"
        ),
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="folder holding the --out folders of probe / abmil / retrieve (or a demo's OUT)",
    )

    register_demo(sub)


def _manifest(path, check_files: bool = True):
    from slidessl.data.manifest import load_manifest

    return load_manifest(path, check_files=check_files)


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
        workers=args.workers,
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
        l1_ratio=args.l1_ratio,
    )
    method = args.method or Path(args.embeddings).stem
    fewshot = None
    if args.shots:
        from slidessl.eval.fewshot import format_fewshot, parse_shots, run_fewshot

        shots = parse_shots(args.shots)
        labelled = [t for t in tasks if t.kind != "survival"]
        fewshot = run_fewshot(ids, X, labelled, shots, args.draws, args.seed, args.embeddings)
        for task, summary in zip(res[0], res[3]):
            if task.name in fewshot:
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
    feats = load_tile_features(manifest, args.max_tiles, args.seed, workers=args.workers)
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
