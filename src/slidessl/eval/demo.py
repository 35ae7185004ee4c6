"""``slidessl demo``: the whole question on one cohort, in minutes on a laptop CPU.

1. a synthetic cohort (``slidessl.data.synthetic.make_cohort``) in ``OUT/cohort`` unless
   ``--manifest`` is given;
2. pretraining with the ``demo`` recipe (``slidessl.train``) into ``OUT/pretrain``;
3. slide embeddings of the pretrained teacher (CLS), mean pooling of tile features, and a
   randomly initialised encoder of the same architecture - slides read once, capped at the
   recipe's ``data.max_tiles``;
4. the linear probe of each on the same patient-grouped folds (``OUT/folds.json``), ABMIL
   on the same folds, leave-one-patient-out retrieval;
5. ``slidessl report OUT``; prints the table and the report's path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEFAULT_TASKS = "tumor_high,infiltrated,subtype,mutations=EGFR+FAT1+KRAS+LRP1B+TP53"
FOCUS = "pretrained"


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(args) -> int:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from slidessl.data.dataset import SlideDataset
    from slidessl.data.manifest import load_manifest
    from slidessl.eval.abmil import ABMILConfig, run_abmil
    from slidessl.eval.embed import build_embedder, embed_items
    from slidessl.eval.embed_io import EmbeddingWriter
    from slidessl.eval.folds import resolve_folds
    from slidessl.eval.probe import run_probe
    from slidessl.eval.report import make_report
    from slidessl.eval.results import format_table, summarize, write_results
    from slidessl.eval.retrieval import run_retrieval
    from slidessl.eval.tasks import build_tasks
    from slidessl.train.config import load_config
    from slidessl.train.loop import pretrain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.time()
    if args.manifest:
        manifest_path = Path(args.manifest)
        specs = args.task or [",".join(load_manifest(manifest_path).label_columns)]
    else:
        from slidessl.data.synthetic import make_cohort

        manifest_path = out / "cohort" / "manifest.csv"
        if not manifest_path.exists():
            _log(f"synthesising {args.slides} slides into {out / 'cohort'}")
            make_cohort(out / "cohort", args.slides, seed=args.seed, max_tiles=4000)
        specs = args.task or [DEFAULT_TASKS]
    manifest = load_manifest(manifest_path)
    tasks = build_tasks(manifest, specs)
    timings["cohort"] = time.time() - t0

    t = time.time()
    cfg = load_config(
        args.recipe,
        [
            f"data.manifest={manifest_path}",
            f"out={out / 'pretrain'}",
            f"seed={args.seed}",
            *args.overrides,
        ],
    )
    if args.encoder:  # evaluate an existing export instead of pretraining
        teacher = Path(args.encoder)
        run = teacher.parent
        _log(f"skipping pretraining: evaluating {teacher}")
    else:
        _log(f"pretraining recipe {args.recipe!r} -> {cfg['out']}")
        run = Path(pretrain(cfg))
        teacher = run / "teacher"
    timings["pretrain"] = time.time() - t

    t = time.time()
    cap = int(cfg["data"]["max_tiles"])
    ds = SlideDataset(manifest, max_tiles=cap, seed=args.seed, on_bad_slide="skip")
    items = [it for it in (ds[i] for i in range(len(ds))) if it is not None]
    timings["read_slides"] = time.time() - t
    t = time.time()
    methods = {FOCUS: str(teacher), "meanpool": "meanpool", "random-init": f"random:{teacher}"}
    emb = {}
    # Encoders are built one after the other (the random init draws from the global RNG),
    # then run on two threads with one intra-op thread each: robust on a shared CPU.
    built = {
        name: build_embedder(spec, ds.feature_dim, seed=args.seed) for name, spec in methods.items()
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            vectors = dict(
                zip(
                    built,
                    pool.map(
                        lambda enc: embed_items(enc[0], items, "cls", batch_size=8), built.values()
                    ),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for name, (ids, vecs) in vectors.items():
        desc = built[name][1]
        path = out / "embeddings" / f"{name}.h5"
        path.unlink(missing_ok=True)
        with EmbeddingWriter(path, {"encoder": desc, "pooling": "cls", "max_tiles": cap}) as w:
            w.write(ids, vecs)
        emb[name] = (ids, vecs.astype(np.float32), {"encoder": desc})
    timings["embed"] = time.time() - t

    t = time.time()
    folds_path = out / "folds.json"
    folds_path.unlink(missing_ok=True)
    tables = []
    for name, (ids, X, _) in emb.items():
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
        write_results(
            out / "probe" / name,
            name,
            *res,
            extra={"kind": "linear-probe", "encoder": methods[name]},
        )
        tables.append(format_table(name, {tk.name: s for tk, s in zip(res[0], res[3])}))
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
    write_results(
        out / "abmil",
        "abmil",
        a_tasks,
        a_folds,
        a_scores,
        sums,
        extra={"kind": "abmil", "config": vars(acfg)},
    )
    tables.append(format_table("abmil", {tk.name: s for tk, s in zip(a_tasks, sums)}))
    timings["abmil"] = time.time() - t

    t = time.time()
    single = [tk for tk in tasks if tk.kind != "multilabel" and len(tk.columns) == 1]
    for name, e in emb.items():
        for tk in single:
            run_retrieval(e, manifest, tk.columns[0], out / "retrieval" / name / tk.name, name)
    timings["retrieval"] = time.time() - t

    t = time.time()
    meta = {
        "manifest": str(manifest_path.resolve()),
        "encoder": str(teacher.resolve()),
        "pretrain_dir": str(run.resolve()),
        "focus": FOCUS,
        "methods": {**methods, "abmil": "gated-attention ABMIL on tile features"},
        "tasks": [tk.name for tk in tasks],
        "k": args.k,
        "description": (
            f"Demo: `{args.recipe}` recipe pretrained on {len(manifest.entries)} slides; "
            f"linear probes of the pretrained teacher's CLS embedding, mean pooling and a "
            f"random-init encoder of the same architecture, and ABMIL, on the same {args.k} "
            f"patient-grouped folds. Slides capped at {cap} tiles."
        ),
        "timings": timings,
    }
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    report = make_report(out, n_maps=3, max_tiles=cap)
    timings["report"] = time.time() - t
    timings["total"] = time.time() - t0
    meta["timings"] = timings
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    print("\n".join(tables))
    verdict = json.loads((out / "report.json").read_text())["verdict"]
    for line in verdict:
        print(line.replace("**", "").replace("`", ""))
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"report: {report}")
    return 0
