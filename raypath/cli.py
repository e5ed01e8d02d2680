"""The ``raypath`` command: one verb per stage, a thin layer over the Python API.

Each stage module exposes ``add_cli(subparsers)`` that registers its verb(s)
with ``--help`` and sets ``func``.  This file only knows which module owns
which verb, and imports a module only when its verb is used: ``raypath
--help`` stays fast (no torch, Ray or scikit-learn import) and adding a verb
never touches another stage's code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from raypath import __version__
from raypath.errors import RaypathError

#: verb -> (module that registers it, one-line help for ``raypath --help``),
#: in the order they appear in ``--help``.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("raypath.demo", "run the whole pipeline on a generated study (local Ray, embedded S3, the shipped small FM)"),
    "synth": ("raypath.synth.study", "generate a multi-cohort synthetic study (pyramidal JPEG TIFF slides + cohort table)"),
    "ingest": ("raypath.wsi.ingest", "validate the cohort table and record every slide's metadata in slides.parquet"),
    "tile": ("raypath.wsi.tiling", "segment tissue and lay a tile grid at a target mpp (tiles.parquet + QC PNGs)"),
    "embed": ("raypath.embed.api", "embed tiles with a foundation model (Ray Data actor pool) -> features/<model_key>/"),
    "export-h5": ("raypath.embed.api", "export a feature folder to one .h5 per slide (CLAM/TRIDENT layout)"),
    "adapt": ("raypath.adapt.api", "DoRA/LoRA-tune a foundation model by DINO self-distillation under strong augmentation"),
    "adapt-experiment": ("raypath.adapt.experiment", "embed before/after adaptation; site probe, purity, LODO C-index side by side"),
    "augment-preview": ("raypath.adapt.augment", "write a PNG grid of augmented views of real tiles"),
    "pretrain": ("raypath.adapt.pretrain", "train a small ViT (raypath-small) from scratch by DINO on a workdir's tiles (Ray Train)"),
    "mil": ("raypath.mil.cli", "train/evaluate ABMIL survival or classification (protocols lodo | internal | pairwise)"),
    "predict": ("raypath.predict.api", "apply a saved final model to new slides (predictions, metrics, attention heatmaps)"),
    "robustness": ("raypath.robustness.cli", "site probe, KMeans cohort purity, RI, CRoMa, t-SNE of a feature store"),
    "sweep": ("raypath.sweep", "Ray Tune + Optuna search over adapter/MIL settings under nested LODO"),
    "patch": ("raypath.patch.cli", "patch classification benchmark: probes, LoRA/DoRA, full fine-tuning, end-to-end baselines"),
    "report": ("raypath.report.pages", "self-contained HTML report of a run, a comparison, or a whole workdir"),
    "submit": ("raypath.submit", "run raypath on a Ray cluster as a Ray job (submit, status, logs, stop, list)"),
    "s3": ("raypath.io.s3cli", "serve a local folder as an S3 bucket (embedded endpoint)"),
}

#: Kept for code that lists the stage modules.
VERB_MODULES = list(dict.fromkeys(m for m, _ in VERBS.values()))


def _requested_verb(argv: list[str]) -> str | None:
    for tok in argv:
        if not tok.startswith("-"):
            return tok if tok in VERBS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: the full definition of the requested verb's
    module, one-line entries for the others."""
    argv = argv or []
    parser = argparse.ArgumentParser(
        prog="raypath",
        allow_abbrev=False,
        description="Robust pathology foundation-model features on Ray. `raypath VERB --help` for a verb's options.",
    )
    parser.add_argument("--version", action="version", version=f"raypath {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--plugin", action="append", metavar="MODULE:ATTR",
        help="load a plugin (a private model, MIL head or loss; repeatable; anywhere on the line; also "
        "RAYPATH_PLUGINS and the 'raypath.plugins' entry points): docs/ARCHITECTURE.md 'Extension points'",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    verb = _requested_verb(argv)
    loaded = VERBS[verb][0] if verb else None
    if loaded:
        importlib.import_module(loaded).add_cli(sub)
        for p in sub.choices.values():  # a flag is spelled in full: --tiles never means --tiles-per-slide
            p.allow_abbrev = False
    for name, (module, help_text) in VERBS.items():
        if module != loaded:
            sub.add_parser(name, help=help_text)
    return parser


def _pop_plugins(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``--plugin SPEC`` / ``--plugin=SPEC`` options, and the specs."""
    rest, specs, it = [], [], iter(argv)
    for tok in it:
        if tok == "--plugin":
            specs.append(next(it, ""))
        elif tok.startswith("--plugin="):
            specs.append(tok.split("=", 1)[1])
        else:
            rest.append(tok)
    return rest, specs


def _load_plugins(specs: list[str]) -> None:
    """Load plugins before the verb's parser (their models/heads/losses are valid choices) and
    export them to RAYPATH_PLUGINS, so the Ray workers this command starts load them too."""
    from raypath.plugins import export_to_env, load_plugins

    export_to_env(load_plugins(specs))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, plugins = _pop_plugins(argv)
    if _requested_verb(argv):
        try:
            _load_plugins(plugins)
        except RaypathError as e:
            return _fail(_requested_verb(argv), e, e.exit_code)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from raypath.io.quiet import configure_cli_logging

    configure_cli_logging(args.verbose)  # -v: raypath's debug lines, not matplotlib's font search
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except RaypathError as e:
        return _fail(args.verb, e, e.exit_code)
    except Exception as e:  # noqa: BLE001 - mapped to an exit code below, else re-raised
        known = _known_failure(e)
        if known is None:
            raise
        return _fail(args.verb, known, known.exit_code)
    return int(rc or 0)


def _fail(verb: str | None, err: BaseException, code: int) -> int:
    print(f"raypath {verb}: error: {err}", file=sys.stderr)
    return int(code)


def _known_failure(e: BaseException) -> RaypathError | None:
    """A user-facing error for exceptions that escape a verb but are not bugs:
    invalid options built outside the CLI glue (pydantic) and storage outages."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        from raypath.config import format_validation_error

        return RaypathError(format_validation_error(e))
    if "raypath.io.s3guard" in sys.modules or "botocore" in sys.modules:
        from raypath.io.storage import as_outage

        return as_outage(e)
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
