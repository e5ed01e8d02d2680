"""The headline numbers of a ``demo --small`` workdir, flattened to
``{key: float}`` so a refactor can be checked against a committed golden file
(``demo_small.json``, written from the commit before the package restructure).

Regenerate the golden file only when a change alters results on purpose, and
say why in the commit: ``python -m tests.golden.headline WORKDIR > tests/golden/demo_small.json``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _flatten(obj, prefix, out):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, bool):
        return
    elif isinstance(obj, (int, float)) and obj is not None:
        out[prefix] = float(obj)


def _prediction_order(run_dir: Path, prefix: str, out: dict[str, float]) -> None:
    """Harrell's C of all of a run's predictions per split set (slides pooled over
    folds and repeats, no pair threshold): a refactor check on the predicted risk
    order that stays defined when the reported, per-fold C-indices of the tiny
    demo have fewer than 10 comparable pairs (and are then not reported)."""
    import pandas as pd

    from raypath.evaluation.metrics import harrell_c_index

    p = pd.read_parquet(run_dir / "predictions.parquet")
    for split, g in p.groupby("split", sort=True):
        c = harrell_c_index(g["time"], g["event"], g["risk"])
        if math.isfinite(c):
            out[f"{prefix}.predictions.{split}.c_index_all_slides"] = float(c)


def headline(workdir: str | Path) -> dict[str, float]:
    wd = Path(workdir)
    out: dict[str, float] = {}
    for protocol in ("lodo", "internal"):
        summary = json.loads((wd / "runs" / f"mil-{protocol}" / "metrics.json").read_text())["summary"]
        flat: dict[str, float] = {}
        _flatten(summary, f"mil-{protocol}", flat)
        out.update({k: v for k, v in flat.items() if k.endswith(".mean") and math.isfinite(v)})
        _prediction_order(wd / "runs" / f"mil-{protocol}", f"mil-{protocol}", out)
    rob = json.loads((wd / "runs" / "robustness" / "robustness.json").read_text())["headline"]
    _flatten(rob, "robustness", out)
    return dict(sorted(out.items()))


if __name__ == "__main__":
    print(json.dumps(headline(sys.argv[1]), indent=1, sort_keys=True))
