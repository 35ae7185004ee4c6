"""``slidessl pretrain CONFIG [key=value ...] [--resume]``."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining of a slide encoder (DINO / DINOv2 recipes)",
        description=(
            "Pretrain a slide encoder. CONFIG is a YAML recipe (a path, or a shipped name: "
            "dino, dinov2, dinov2_grid, demo) merged over configs/default.yaml; dotted "
            "key=value overrides follow (values parsed as YAML), e.g. "
            "`slidessl pretrain dinov2 data.manifest=slides.csv train.epochs=50 out=runs/x`. "
            "Under torchrun, one process per GPU (see docs/distributed.md)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", help="recipe YAML (path or shipped name)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in OUT/checkpoints",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
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
    except (FileNotFoundError, ValueError, FloatingPointError) as exc:
        print(f"slidessl pretrain: {exc}", file=sys.stderr)
        return 1
    return 0
