"""``slidessl pretrain CONFIG [key=value ...] [--resume]``."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining of a slide encoder (DINO / DINOv2 recipes)",
        description=(
            "Pretrain a slide encoder on the tile embeddings of a manifest's slides. CONFIG "
            "(a recipe) is merged over configs/default.yaml, then the dotted KEY=VALUE "
            "overrides (values parsed as YAML); data.manifest=PATH is required (the default "
            "has none), out=DIR names the run folder. Writes OUT/config.yaml, "
            "OUT/checkpoints/, OUT/metrics.csv, OUT/summary.json and the exported teacher "
            "OUT/teacher/ (what slidessl embed reads). Exit status 2 for bad input (unknown "
            "key, missing file, a run that will not fit in memory), 1 when training stops "
            "on non-finite steps; -v (anywhere on the command line) shows the traceback. "
            "Under torchrun, one process per GPU (docs/distributed.md). Example: slidessl "
            "pretrain dinov2+cpu data.manifest=cohort/manifest.csv train.epochs=5 "
            "out=runs/dinov2"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "config",
        metavar="CONFIG",
        help="the recipe: a YAML path, or a shipped name - dino, dinov2, dinov2_grid, demo "
        "(dinov2 at CPU sizes, on runs/demo/cohort) - with overlays joined by +, applied in "
        "order: RECIPE+cpu (a tiny encoder and short schedule for CPUs), "
        "RECIPE+cpu_longrange (CPU sizes with 2-D positions, for longer-range arrangement)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides, values parsed as YAML, e.g. data.manifest=m.csv "
        "train.epochs=3 optim.lr=1e-4 out=runs/x; a key the config does not have is an "
        "error (--print-config shows them all)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in OUT/checkpoints (an error when there is none)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (recipe + overrides) as YAML and exit",
    )
    p.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from slidessl.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"slidessl pretrain: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    from slidessl.train.loop import pretrain

    try:
        pretrain(cfg, resume=args.resume)
    except (OSError, ValueError) as exc:  # bad input: the README's exit status 2
        if getattr(args, "verbose", False):
            raise
        print(f"slidessl pretrain: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # the run itself failed (non-finite steps): 1
        if getattr(args, "verbose", False):
            raise
        print(f"slidessl pretrain: {exc}", file=sys.stderr)
        return 1
    return 0
