"""``raypath mil``: a thin CLI over :func:`raypath.mil.api.run_mil`."""

from __future__ import annotations

import argparse


def _main(args: argparse.Namespace) -> int:
    from raypath.config import config_from_args
    from raypath.mil.api import MilConfig, run_mil

    cfg = config_from_args(MilConfig, args)
    if args.final:
        from raypath.predict.final import fit_final

        print(f"final model: {fit_final(cfg, name=args.model_name, risk_quantiles=args.risk_quantiles)}")
        return 0
    res = run_mil(cfg)
    s = res.summary
    t = res.table()
    if len(t):
        t = t[t["metric"] == s["metric"]]
        with __import__("pandas").option_context("display.width", 140, "display.max_rows", 200):
            print(t[["name", "set", "cohort", "mean", "sd", "ci_low", "ci_high", "n"]].to_string(index=False, float_format="%.3f"))
    if cfg.protocol == "lodo" and s.get("mean") is not None:
        print(f"external {s['metric']}: mean {s['mean']:.3f}, worst {s['worst']:.3f} ({s['worst_cohort']})")
    if s.get("internal_note"):  # which internal score is which; C per patient, none below 10 comparable pairs
        print(s["internal_note"] + "; not reported (NaN) below 10 comparable pairs")
    print(f"outputs in {res.run_dir}")
    return 0


def add_cli(subparsers) -> None:
    from raypath.config import add_config_arguments
    from raypath.mil.api import MilConfig

    p = subparsers.add_parser(
        "mil",
        help="train/evaluate ABMIL survival or classification (protocols lodo | internal | pairwise)",
        description=(
            "Train attention-MIL heads on slide features and evaluate them with internal "
            "cross-validation (grouped by patient), leave-one-dataset-out or pairwise cohort "
            "transfer. Writes <workdir>/runs/<run>/ (config.yaml, metrics.json, "
            "predictions.parquet, curves.parquet, curves.png, km.png)."
        ),
    )
    add_config_arguments(p, MilConfig)
    final = p.add_argument_group("final model (for raypath predict)")
    final.add_argument("--final", action="store_true",
                       help="fit one model on every eligible slide with this config and save it to "
                       "<workdir>/models/<name>/ instead of running a protocol")
    final.add_argument("--model-name", default=None, metavar="NAME",
                       help="folder name under <workdir>/models/ (default <run>-final)")
    final.add_argument("--risk-quantiles", type=float, nargs="+", default=None, metavar="Q",
                       help="risk-group cut-offs as quantiles of the training patients' risk (default 0.5: low/high)")
    p.set_defaults(func=_main)
