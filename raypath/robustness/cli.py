"""``raypath robustness``: measure the site information in a feature store."""

from __future__ import annotations

import argparse
import json

from raypath.config import add_config_arguments, config_from_args
from raypath.errors import RaypathError


def _config(args: argparse.Namespace):
    from pydantic import ValidationError

    from raypath.robustness.api import RobustnessConfig

    try:
        return config_from_args(RobustnessConfig, args)
    except ValidationError as e:
        raise RaypathError(f"invalid robustness options: {e}") from None


def _main(args: argparse.Namespace) -> int:
    from raypath.robustness.api import compare, run_robustness

    cfg = _config(args)
    if args.compare_to:
        out = compare(cfg.features, args.compare_to, cfg, label_a=args.label_a, label_b=args.label_b)
        summary = {"run_dir": out["run_dir"], "labels": out["labels"], "delta": out["delta"]}
    else:
        out = run_robustness(cfg)
        summary = {"run_dir": out["run_dir"], "headline": out["headline"], "inputs": out["inputs"]}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {out['run_dir']}")
        rows = summary.get("headline") or {k: v["b"] for k, v in summary["delta"].items()}
        if "delta" in summary:
            print(f"{'metric':34s} {summary['labels']['a']:>12s} {summary['labels']['b']:>12s}  more robust")
            for k, d in summary["delta"].items():
                fa = "-" if d["a"] is None else f"{d['a']:.4g}"
                fb = "-" if d["b"] is None else f"{d['b']:.4g}"
                who = {"a": summary["labels"]["a"], "b": summary["labels"]["b"]}.get(d["more_robust"], "")
                print(f"{k:34s} {fa:>12s} {fb:>12s}  {who}")
        else:
            for k, v in rows.items():
                print(f"{k:34s} {'-' if v is None else format(v, '.4g')}")
        print(f"render it: raypath report {out['run_dir']}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "robustness",
        help="site probe, KMeans cohort purity, RI, CRoMa, t-SNE of a feature store",
        description=(
            "Measure how much site information a feature store carries: site probe, "
            "cohort-as-cluster metrics, KMeans cohort purity, robustness index, CRoMa, "
            "clustering score, t-SNE/UMAP maps and tile galleries. Writes "
            "<workdir>/runs/<run>/robustness.json and PNGs; with --compare-to, runs both "
            "stores on the same slides and writes comparison.json."
        ),
    )
    from raypath.robustness.api import RobustnessConfig

    add_config_arguments(p, RobustnessConfig)
    p.add_argument("--compare-to", metavar="FEATURES",
                   help="second feature store (folder or model key): before/after comparison")
    p.add_argument("--label-a", default=None, help="name of --features in the comparison")
    p.add_argument("--label-b", default=None, help="name of --compare-to in the comparison")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_main)
