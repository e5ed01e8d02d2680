"""The ``raypath`` command: one verb per stage, a thin layer over the Python API.

Each stage module exposes ``add_cli(subparsers)`` that registers its verb and
sets ``func`` to a function taking the parsed arguments.  This file only
collects them, so adding a verb never touches another stage's code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import RaypathError

#: Modules that contribute verbs, in the order they appear in ``--help``.
VERB_MODULES = [
    "raypath.demo",
    "raypath.synth",
    "raypath.ingest",
    "raypath.tiling",
    "raypath.embed",
    "raypath.adapt",
    "raypath.mil.cli",
    "raypath.robustness.cli",
    "raypath.sweep",
    "raypath.report",
    "raypath.s3cli",
    "raypath.submit",
    "raypath.augment",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raypath",
        description="Robust pathology foundation-model features on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"raypath {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # stage not built yet
            raise
        mod.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except RaypathError as e:
        print(f"raypath {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
