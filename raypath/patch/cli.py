"""``raypath patch``: the CLI over :func:`raypath.patch.api.run_patch`."""

from __future__ import annotations

import argparse

from raypath.config import add_config_arguments, config_from_args


def _run(args: argparse.Namespace) -> int:
    from raypath.patch.api import PatchConfig, run_patch
    from raypath.patch.outputs import headline_sentences

    cfg = _config(args, PatchConfig)
    if getattr(args, "final", False):
        from raypath.patch.final import fit_final_patch

        print(f"final patch model: {fit_final_patch(cfg, name=args.model_name)}")
        return 0
    doc = run_patch(cfg)
    if doc.get("stopped"):
        print(f"patch: stopped after {doc['fits_done']} of {doc['fits_planned']} fits (--stop-after-fits); "
              "run again to continue")
        return 0
    print(f"patch: {doc['fits']} fits -> {cfg.run_dir()}")
    for line in headline_sentences(doc["headline"]):
        print("  " + line)
    return 0


def _config(args: argparse.Namespace, model):
    return config_from_args(model, args)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``raypath patch``."""
    from raypath.patch.api import PatchConfig
    from raypath.patch.methods import METHODS

    methods = "; ".join(f"{m.name}: {m.description}" for m in METHODS.values())
    p = subparsers.add_parser(
        "patch",
        help="patch classification benchmark: probes, LoRA/DoRA, full fine-tuning, end-to-end baselines",
        description=(
            "Classify labelled patches (e.g. mitotic figure vs imposter) with foundation models: linear/kNN probes "
            "on cached features, LoRA/DoRA/full fine-tuning and end-to-end baselines, over label fractions x "
            "seeds (scaling curves) and across domains (domain matrix), split by patient. Outputs under "
            "<workdir>/runs/<run>/ (summary.json, metrics.csv, scaling.png, domain_matrix.png, report.html). "
            f"Methods: {methods}. Quick start: raypath patch --workdir work --preset cpu-small"
        ),
    )
    add_config_arguments(p, PatchConfig)
    final = p.add_argument_group("final model (for raypath predict)")
    final.add_argument("--final", action="store_true", help="fit the one probe of --methods (linear or knn) on every "
                       "labelled patch and save it to <workdir>/models/<name>/ instead of running the benchmark")
    final.add_argument("--model-name", default=None, metavar="NAME",
                       help="folder name under <workdir>/models/ (default <run>-final)")
    p.set_defaults(func=_run)
