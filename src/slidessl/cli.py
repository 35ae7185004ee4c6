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
    "slidessl.bench.commands",
    "slidessl.train.commands",
    "slidessl.eval.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slidessl",
        description="Slide-level self-supervised pretraining on tile embeddings with "
        "coordinates, and the evaluation that says whether it beats simple aggregation. "
        "`slidessl COMMAND --help` describes each command. -v/--verbose may be given "
        "anywhere on the command line (debug logging, and the traceback of an error). Bad "
        "input (a missing file, a wrong option, a slide that fails validation) ends with one "
        "line naming the problem and exit status 2; a run that fails on its own exits 1, an "
        "interrupted one 130.",
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


def _split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``-v`` / ``--verbose`` anywhere before a ``--`` (also after the subcommand)."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = {"-v", "--verbose"}
    verbose = any(a in flags for a in argv[:end])
    return [a for i, a in enumerate(argv) if i >= end or a not in flags], verbose


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, verbose = _split_verbose(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    args.verbose = verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command != "pretrain":  # pretrain sizes them itself (its data workers)
        from slidessl.cpus import configure_threads

        configure_threads(what=args.command)
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
