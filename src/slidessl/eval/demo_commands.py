"""``slidessl diagnose`` and ``slidessl demo``: the commands that run models and every
evaluation together (registered by ``eval.commands``)."""

from __future__ import annotations

import argparse
from pathlib import Path

TASK_HELP = (
    "tasks, comma-separated: COL (binary or multi-class), NAME=COL1+COL2 (multi-label) or "
    "NAME=surv:TIME_COL:EVENT_COL (survival; event 1 = death / progression, 0 = censored), "
    "e.g. infiltrated,subtype,mutations=EGFR+FAT1+KRAS+LRP1B+TP53,os=surv:os_months:os_event"
)


def command(sub, name: str, func, **kw) -> argparse.ArgumentParser:
    """A sub-command parser (defaults shown in its help) that runs ``func``."""
    p = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)
    p.set_defaults(func=func)
    return p


def register_demo(sub) -> None:
    """The ``diagnose`` and ``demo`` parsers."""
    p = command(
        sub,
        "diagnose",
        cmd_diagnose,
        help="why an encoder does (not) beat simple aggregation: coordinate shuffle, "
        "slide-identity leakage, per-layer probes",
        description=(
            "Why an encoder's slide embedding does (not) beat simple aggregation: a "
            "coordinate-shuffle control (does the vector change when arrangement goes?), "
            "slide-identity leakage (do two windows of a slide find each other rather than "
            "the label?) and linear probes after every block. Reads ENCODER and MANIFEST's "
            "slides; prints a summary and writes OUT/diagnose.json. Example: slidessl "
            "diagnose runs/dinov2/teacher cohort/manifest.csv --task infiltrated --out diag"
        ),
    )
    p.add_argument(
        "encoder",
        metavar="ENCODER",
        help="as for slidessl embed (teacher export, checkpoint, meanpool, random:...)",
    )
    p.add_argument(
        "manifest", metavar="MANIFEST", help="manifest (slide files, labels, patient_id)"
    )
    p.add_argument("--task", action="append", required=True, help=TASK_HELP + "; repeatable")
    p.add_argument("--out", required=True, help="output folder OUT")
    p.add_argument(
        "--pooling",
        default="mean",
        help="slide vector for the shuffle and leakage checks (choices as for embed)",
    )
    p.add_argument("--max-tiles", type=int, default=4000, help="tile cap per slide")
    p.add_argument("--k", type=int, default=5, help="folds of the per-layer probes")
    p.add_argument(
        "--folds", help="folds file to share with other methods (not given: OUT/folds.json)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of windows, shuffles and folds")

    p = command(
        sub,
        "demo",
        cmd_demo,
        help="synthetic cohort -> pretrain -> embed -> probe -> report",
        description=(
            "The whole flow on one cohort, in minutes on a CPU: a synthetic cohort in "
            "OUT/cohort (or --manifest), pretraining of each recipe at CPU sizes "
            "(RECIPE+cpu) into OUT/pretrain, embeddings of the teachers and of the "
            "baselines (random init, mean pooling, prototypes, cooc), linear probe and ABMIL on "
            "the same --k folds, retrieval, then OUT/report.md. Example: slidessl demo "
            "--out runs/demo"
        ),
    )
    p.add_argument("--out", required=True, help="output folder OUT")
    p.add_argument(
        "--manifest", help="use this cohort (manifest or folder) instead of a synthetic one"
    )
    p.add_argument(
        "--task",
        action="append",
        help=TASK_HELP + "; repeatable (not given: the synthetic cohort's five tasks, or "
        "every label column of --manifest)",
    )
    p.add_argument("--slides", type=int, default=180, help="synthetic slides")
    p.add_argument("--k", type=int, default=5, help="folds")
    p.add_argument("--seed", type=int, default=0, help="seed of cohort, training and folds")
    p.add_argument(
        "--recipes",
        default="dino,dinov2,dinov2_grid",
        help="pretraining recipes to compare, comma-separated",
    )
    p.add_argument(
        "--overlay",
        default="cpu",
        help="recipe merged over each one (cpu: the CPU sizes of configs/cpu.yaml; '' = none)",
    )
    p.add_argument(
        "--pooling",
        default="mean",
        help="slide vector of the pretrained and random-init encoders (see embed)",
    )
    p.add_argument("--prototypes", type=int, default=16, help="K of prototypes / cooc")
    p.add_argument("--shots", default="1,2,4,8", help="few-shot K per class")
    p.add_argument("--draws", type=int, default=50, help="few-shot draws per K")
    p.add_argument(
        "--abmil-draws",
        type=int,
        default=10,
        help="few-shot draws per K for ABMIL, which trains once per draw: the first ones of "
        "the same draws",
    )
    p.add_argument(
        "--fewshot-tasks",
        help="tasks that get few-shot probes (not given: tumor_high,infiltrated on the "
        "synthetic cohort, every task of --manifest)",
    )
    p.add_argument("--gigapath", help="also compare this Prov-GigaPath slide_encoder.pth")
    p.add_argument("--encoder", help="evaluate this teacher export instead of pretraining")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="pretraining config overrides for every recipe, e.g. train.epochs=2",
    )


def cmd_diagnose(args) -> int:
    from slidessl.eval.diagnose import format_diagnose, run_diagnose

    opts = {k: getattr(args, k) for k in ("pooling", "max_tiles", "k", "seed", "folds")}
    result = run_diagnose(args.encoder, args.manifest, args.task, args.out, **opts)
    print(format_diagnose(result))
    print(f"written: {Path(args.out) / 'diagnose.json'}")
    return 0


def cmd_demo(args) -> int:
    from slidessl.eval.demo import run_demo

    return run_demo(args)
