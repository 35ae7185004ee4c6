"""The ``slidessl`` command. Thin: each layer registers its own sub-commands.

Every layer module listed in ``_COMMAND_MODULES`` exposes ``register(subparsers)``,
adds its parsers there and sets ``func`` (a callable taking the parsed namespace and
returning an exit status) with ``set_defaults``. Heavy imports happen inside the
handlers so that ``slidessl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from slidessl import __version__

_COMMAND_MODULES = (
    "slidessl.data.commands",
    "slidessl.models.commands",
    "slidessl.train.commands",
    "slidessl.eval.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slidessl",
        description="Slide-level self-supervised pretraining on tile embeddings with coordinates.",
    )
    parser.add_argument("--version", action="version", version=f"slidessl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a layer not built yet must not break the rest
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        # bad input (a missing file, a wrong option, a slide that fails validation): one
        # line naming the problem; --verbose shows the traceback
        if args.verbose:
            raise
        print(f"slidessl {args.command}: {exc}", file=sys.stderr)
        return 2
