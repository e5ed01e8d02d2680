"""``raypath robustness``: measure the site information in a feature store."""

from __future__ import annotations

import argparse
import json

from raypath.config import add_config_arguments, config_from_args


def _config(args: argparse.Namespace):
    from raypath.robustness.api import RobustnessConfig

    return config_from_args(RobustnessConfig, args)


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
            print(comparison_text(summary))
        else:
            for k, v in rows.items():
                print(f"{k:34s} {'-' if v is None else format(v, '.4g')}")
        print(f"render it: raypath report {out['run_dir']}")
    return 0


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def comparison_text(summary: dict) -> str:
    """The comparison as a table: A, B, B - A with its 95 % CI, and the more
    robust side only when the CI excludes 0 ("tie" otherwise)."""
    la, lb = summary["labels"]["a"], summary["labels"]["b"]
    lines = [f"{'metric':34s} {la:>10s} {lb:>10s} {'B - A':>10s}  {'95% CI':>21s}  more robust"]
    for k, d in summary["delta"].items():
        if not d.get("more_robust_if"):
            continue  # chance levels and k: reference values, no verdict
        ci = "" if d.get("ci_low") is None else f"[{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]"
        who = {"a": la, "b": lb, "tie": "tie (CI contains 0)"}.get(d.get("more_robust"), "n/a (no CI)")
        lines.append(f"{k:34s} {_num(d['a']):>10s} {_num(d['b']):>10s} {_num(d['delta']):>10s}  {ci:>21s}  {who}")
    return "\n".join(lines)


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
                   help="second feature store (folder or model key): before/after comparison [default: none]")
    p.add_argument("--label-a", default=None, help="name of --features in the comparison [default: its folder name]")
    p.add_argument("--label-b", default=None, help="name of --compare-to in the comparison [default: its folder name]")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_main)
