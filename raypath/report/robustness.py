"""Pages of ``raypath robustness`` runs: one feature store (``robustness.json``)
or two side by side (``comparison.json`` with ``a/`` and ``b/``).

Each metric sits next to its chance (or neutral) level, with the spread
where the metric has one (site probe over CV folds, purity over KMeans
repeats), and the page opens with a one-line verdict.
"""

from __future__ import annotations

from typing import Any

from raypath.evaluation.meanings import METRICS
from raypath.report.html import is_number, num

#: metric -> the headline key of its chance level, or a fixed neutral value
CHANCE: dict[str, str | float] = {
    "site_probe_balanced_accuracy": "site_probe_chance",
    "kmeans_purity": "kmeans_chance_purity",
    "robustness_index": "robustness_index_chance",
    "croma_median": 0.0,
    "croma_worst10_mean": 0.0,
    "clustering_score": 0.0,
    "cohort_silhouette": 0.0,
    "cohort_calinski_harabasz": 1.0,
}
#: headline keys shown as the chance column, not as rows of their own
CHANCE_KEYS = {v for v in CHANCE.values() if isinstance(v, str)} | {"robustness_index_k"}
#: the rows of the index page's short robustness table
SHORT = ("site_probe_balanced_accuracy", "kmeans_purity", "robustness_index", "croma_median", "clustering_score")


def label(key: str) -> str:
    m = METRICS.get(key)
    return m.label if m else key


def direction_text(key: str) -> str:
    m = METRICS.get(key)
    return {"lower": "lower", "higher": "higher"}.get((m.better if m else None) or "", "")


def chance_of(key: str, headline: dict) -> float | None:
    c = CHANCE.get(key)
    if isinstance(c, str):
        v = headline.get(c)
        return v if is_number(v) else None
    return c


def spread(key: str, metrics: dict) -> str:
    """``± sd (n folds)`` for the metrics that have one."""
    import numpy as np

    if key == "site_probe_balanced_accuracy":
        folds = (metrics.get("site_probe") or {}).get("fold_balanced_accuracy") or []
        vals = [v for v in folds if is_number(v)]
        if len(vals) > 1:
            return f"\u00b1 {num(float(np.std(vals, ddof=1)))} over {len(vals)} CV folds"
    if key == "kmeans_purity":
        km = metrics.get("kmeans_purity") or {}
        if is_number(km.get("purity_std")) and (km.get("repeats") or 0) > 1:
            return f"\u00b1 {num(km['purity_std'])} over {km['repeats']} KMeans repeats"
    return ""


def metric_rows(doc: dict, keys: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    head = doc.get("headline", {})
    metrics = doc.get("metrics", {})
    rows = []
    for key in keys or [k for k in head if k not in CHANCE_KEYS]:
        if key not in head:
            continue
        m = METRICS.get(key)
        rows.append({"key": key, "label": label(key), "value": head.get(key), "chance": chance_of(key, head),
                     "spread": spread(key, metrics), "better": direction_text(key), "help": m.help if m else ""})
    return rows


def _site_phrase(bacc: float, chance: float) -> str:
    excess = (bacc - chance) / max(1e-9, 1 - chance)
    if excess >= 0.5:
        return "strongly carry their site"
    if excess >= 0.15:
        return "carry their site"
    return "carry little site information"


def verdict(head: dict) -> str:
    """One line: how much site the features carry, and whether biology or site shapes neighbourhoods."""
    bacc, chance = head.get("site_probe_balanced_accuracy"), head.get("site_probe_chance")
    parts = []
    if is_number(bacc) and is_number(chance):
        parts.append(f"The features {_site_phrase(bacc, chance)}: a linear probe names a tile's cohort with "
                     f"balanced accuracy {num(bacc)} (chance {num(chance)})")
    ri, ri_chance = head.get("robustness_index"), head.get("robustness_index_chance")
    if is_number(ri) and is_number(ri_chance):
        side = "more" if ri > ri_chance else "less"
        parts.append(f"nearest neighbours from other centres share biology {side} often than chance "
                     f"(RI {num(ri)} vs {num(ri_chance)})")
    pur, pur_chance = head.get("kmeans_purity"), head.get("kmeans_chance_purity")
    if is_number(pur) and is_number(pur_chance) and not parts:
        parts.append(f"KMeans clusters are {'mostly one cohort' if pur > pur_chance + 0.1 else 'mixed'} "
                     f"(purity {num(pur)} vs {num(pur_chance)} at full mixing)")
    return ("; ".join(parts) + ".") if parts else "No headline metric could be computed (see the skipped list)."


def skipped(doc: dict) -> dict[str, str]:
    return {k: v["skipped"] for k, v in doc.get("metrics", {}).items() if isinstance(v, dict) and "skipped" in v}


def inputs(doc: dict) -> dict[str, Any]:
    i = doc.get("inputs", {})
    man = i.get("manifest") or {}
    per_centre = i.get("n_tiles_per_centre") or {}
    return {
        "features": i.get("feature_dir"),
        "model": f"{man.get('model', '?')} (weights {man.get('weights', '?')})" if man else None,
        "slides": i.get("n_slides"),
        "tiles": i.get("n_tiles"),
        "tiles per centre": ", ".join(f"{k} {v}" for k, v in per_centre.items()) or None,
        "biology column": i.get("biology_column"),
        "centre column": i.get("centre_column"),
    }


def comparison_rows(doc: dict) -> list[dict[str, Any]]:
    """Before/after rows: value of A and B, B - A, which is more robust, chance."""
    rows = []
    for key, d in doc.get("delta", {}).items():
        if key in CHANCE_KEYS:
            continue
        who = d.get("more_robust")
        chance = d.get("chance") if is_number(d.get("chance")) else CHANCE.get(key)
        if isinstance(chance, str):
            c = doc.get("delta", {}).get(chance, {})
            chance = c.get("a") if is_number(c.get("a")) and c.get("a") == c.get("b") else None
        lo, hi = d.get("ci_low"), d.get("ci_high")
        rows.append({"label": label(key), "a": d.get("a"), "b": d.get("b"), "delta": d.get("delta"),
                     "delta_ci": f"[{num(lo)}, {num(hi)}]" if is_number(lo) and is_number(hi) else "",
                     "beyond_noise": bool(is_number(lo) and is_number(hi) and (lo > 0 or hi < 0)),
                     "cls_a": "better" if who == "a" else ("worse" if who == "b" else ""),
                     "cls_b": "better" if who == "b" else ("worse" if who == "a" else ""),
                     "better": direction_text(key), "chance": chance if is_number(chance) else None})
    return rows


def comparison_verdict(doc: dict) -> str:
    la, lb = doc["labels"]["a"], doc["labels"]["b"]
    rows = comparison_rows(doc)
    same = f"same {doc.get('n_common_slides', '?')} slides and tile sampling for both"
    if any(r["delta_ci"] for r in rows):  # paired bootstrap CIs of B - A
        moved = [r for r in rows if r["beyond_noise"]]
        if not moved:
            return (f"No difference between {la} and {lb} beyond noise: every 95% CI of the difference "
                    f"includes 0 ({same}).")
        parts = [f"{r['label']} ({lb if r['cls_b'] == 'better' else la if r['cls_a'] == 'better' else '?'} "
                 "more robust)" for r in moved]
        return (f"Beyond noise (95% CI of {lb} \u2212 {la} excludes 0): " + "; ".join(parts)
                + f"; the other {len(rows) - len(moved)} metrics are within noise ({same}).")
    wins = {"a": sum(r["cls_a"] == "better" for r in rows), "b": sum(r["cls_b"] == "better" for r in rows)}
    n = wins["a"] + wins["b"]
    if not n:
        return f"{la} and {lb} cannot be told apart on these metrics."
    lead = lb if wins["b"] > wins["a"] else la if wins["a"] > wins["b"] else None
    head = f"{lead} is more robust on {max(wins.values())} of {n} metrics" if lead else \
        f"{la} and {lb} are each more robust on {wins['a']} of {n} metrics"
    return f"{head} ({same}); single runs without confidence intervals: small differences may be noise."
