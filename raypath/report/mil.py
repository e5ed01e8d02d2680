"""The page of a MIL run (``runs/<run>/metrics.json`` written by ``raypath mil``).

It opens with one sentence and the headline table (per held-out cohort:
external and internal score, mean +- sd over repeats, 95% CI, slides and
events), then the curves and Kaplan-Meier plots, then every fold; the raw
JSON and the config come last, folded.
"""

from __future__ import annotations

import re
from typing import Any

from raypath.evaluation.meanings import METRICS
from raypath.report.folder import Folder
from raypath.report.html import is_number, num

PROTOCOLS = {
    "lodo": "leave-one-dataset-out (train on the other cohorts, test on the held-out one)",
    "internal": "cross-validation grouped by patient",
    "pairwise": "train on one cohort, test on each other cohort",
}

FOLD_COLUMNS = ["name", "repeat", "fold", "set", "cohort", "n", "n_events"]


def is_mil(doc: Any) -> bool:
    return isinstance(doc, dict) and "protocol" in doc and isinstance(doc.get("summary"), dict)


def metric_label(metric: str) -> str:
    m = METRICS.get(metric)
    return m.label if m else metric


def _counts(folds: list[dict]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(name, set, cohort) -> slides, events and comparable pairs of one repeat (summed over folds)."""
    if not folds:
        return {}
    first = min((r.get("repeat", 0) for r in folds), default=0)
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in folds:
        if r.get("repeat", 0) != first:
            continue
        key = (str(r.get("name")), str(r.get("set")), str(r.get("cohort")))
        c = out.setdefault(key, {"n": 0, "n_events": None, "pairs": None})
        c["n"] += int(r.get("n") or 0)
        for src, dst in (("n_events", "n_events"), ("n_comparable_pairs", "pairs")):
            if is_number(r.get(src)):
                c[dst] = (c[dst] or 0) + int(r[src])
    return out


def _n_text(c: dict[str, Any] | None) -> str:
    if not c:
        return "\u2013"
    return f"{c['n']} / {c['n_events']}" if c.get("n_events") is not None else str(c["n"])


def _row(label: str, stat: dict | None, count: dict | None, **extra: Any) -> dict[str, Any]:
    return {"label": label, "stat": stat or {}, "n": _n_text(count),
            "pairs": (count or {}).get("pairs"), **extra}


def _groups_or_summary(s: dict, metric: str) -> dict:
    """``summary['groups']``, or the same shape rebuilt from a combined run's per-cohort summary."""
    if s.get("groups"):
        return s["groups"]
    return {c: {"external": {c: {metric: st}}, "internal": {"all": {metric: (s.get("internal") or {}).get(c) or {}}}}
            for c, st in (s.get("external") or {}).items()}


def headline_rows(doc: dict) -> list[dict[str, Any]]:
    """The headline table of any protocol: one row per evaluated group."""
    s = doc["summary"]
    metric = s.get("metric", "c_index")
    groups = _groups_or_summary(s, metric)
    counts = _counts(doc.get("folds") or [])
    rows = []
    if doc["protocol"] == "internal":
        sets = groups.get("internal", {}).get("internal", {})
        for cohort in ["all"] + sorted(c for c in sets if c != "all"):
            label = "all cohorts (pooled folds)" if cohort == "all" else cohort
            rows.append(_row(label, sets.get(cohort, {}).get(metric), counts.get(("internal", "internal", cohort))))
        return rows
    strat = s.get("internal_stratified") or {}
    for name in sorted(groups):
        ext = groups[name].get("external", {})
        internal = groups[name].get("internal", {}).get("all", {}).get(metric)
        for cohort in sorted(ext):
            label = cohort if doc["protocol"] == "lodo" else f"{name} \u2192 {cohort}"
            rows.append(_row(label, ext[cohort].get(metric), counts.get((name, "external", cohort)),
                             internal=internal or {}, internal_strat=strat.get(name) or {},
                             n_internal=_n_text(counts.get((name, "internal", "all")))))
    return rows


def notes(rows: list[dict[str, Any]], protocol: str = "lodo") -> list[str]:
    """Why a cell is empty (too few comparable pairs, no events...), once per distinct reason."""
    out = []
    first = "external" if protocol != "internal" else "cross-validated"
    for r in rows:
        for col, stat in ((first, r["stat"]), ("internal", r.get("internal")),
                          ("internal, within cohort", r.get("internal_strat"))):
            if isinstance(stat, dict) and stat.get("note") and not is_number(stat.get("mean")):
                note = re.sub(r"^(\d+) of \1 fold\(s\)/repeat\(s\): ", "", str(stat["note"]))  # "in every fit"
                out.append(f"{r['label']} {col}: {note.replace(': C-index not reported', '')}")
    return list(dict.fromkeys(out))


def _mean_of(stats: Any) -> float | None:
    vals = [v.get("mean") for v in (stats or {}).values() if isinstance(v, dict)]
    vals = [v for v in vals if is_number(v)]
    return sum(vals) / len(vals) if vals else None


def verdict(doc: dict) -> str:
    s = doc["summary"]
    label = metric_label(s.get("metric", "c_index"))
    repeats = len({r.get("repeat") for r in doc.get("folds") or []}) or 1
    rep = f"{repeats} repeat{'s' if repeats != 1 else ''}"
    why = notes(headline_rows(doc), doc["protocol"])
    if doc["protocol"] == "internal":
        cv = s.get("internal") or {}
        if not is_number(cv.get("mean")):
            return f"No fold could be scored: {why[0] if why else 'too few events or comparable pairs'}."
        return (f"Cross-validated {label} {num(cv['mean'])} \u00b1 {num(cv.get('sd'))} over {cv.get('n')} "
                f"fold fits ({rep}); patients never straddle folds.  0.5 = random ordering.")
    if not is_number(s.get("mean")):
        return f"No held-out cohort could be scored: {why[0] if why else 'too few events or comparable pairs'}."
    where = "cohorts never seen in training" if doc["protocol"] == "lodo" else "cohorts other than the training one"
    text = (f"On {where}, {label} is {num(s['mean'])} on average; the worst is "
            f"{s.get('worst_cohort', '?')} at {num(s.get('worst'))} ({rep}).")
    pooled, within = _mean_of(s.get("internal")), _mean_of(s.get("internal_stratified"))
    if pooled is not None or within is not None:
        text += ("  On held-out patients of the training cohorts (internal): "
                 + ", ".join(t for t in (f"{num(within)} comparing patients within a cohort" if within is not None
                                         else "", f"{num(pooled)} pooled across cohorts" if pooled is not None
                                         else "") if t) + ".")
    return text + "  0.5 = random ordering." + _consistency_sentence(s)


def _consistency_sentence(s: dict) -> str:
    """Prediction consistency between technical variants of the held-out tissues (issue 15), if scored."""
    c = s.get("consistency") or {}
    if not is_number(c.get("mean_n_pairs")):
        return ""
    head = f"  Between technical variants of one tissue ({c['mean_n_pairs']:.0f} pairs per held-out cohort): "
    pct = lambda v: f"{100 * v:.0f} %" if is_number(v) else "\u2013"  # noqa: E731
    if "mean_quantile_diff" in c:
        return (head + f"risk quantiles differ by {num(c.get('mean_quantile_diff'))} on average, "
                f"{pct(c.get('mean_flip_rate'))} of pairs change risk group (0 = fully consistent).")
    return head + f"{pct(c.get('mean_disagreement'))} predicted differently, kappa {num(c.get('mean_kappa'))}."


def secondary_rows(doc: dict) -> tuple[list[str], list[dict[str, Any]]]:
    """Every other metric per (group, set, cohort): mean +- sd."""
    s = doc["summary"]
    primary = s.get("metric", "c_index")
    metrics: list[str] = []
    rows = []
    for name, sets in sorted(s.get("groups", {}).items()):
        for set_name, cohorts in sets.items():
            for cohort, ms in sorted(cohorts.items()):
                for m in ms:
                    if m != primary and m not in metrics:
                        metrics.append(m)
                rows.append({"group": name, "set": set_name, "cohort": cohort, "stats": ms})
    return metrics, rows


def fold_columns(folds: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in folds for k in r))
    return [c for c in FOLD_COLUMNS if c in keys] + [k for k in keys if k not in FOLD_COLUMNS and k != "protocol"]


PLOT_CAPTIONS = {
    "curves.png": "Score per epoch, mean \u00b1 sd over repeats: internal = held-out patients of the training "
                  "cohorts, external = the held-out cohort. Dashed line: 0.5, random ordering.",
    "km.png": "Kaplan-Meier curves of the predicted high- and low-risk halves of each held-out set "
              "(median split within each fold), log-rank p-value; + marks censored patients.",
}


def context(folder: Folder, doc: dict, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything ``mil.html.j2`` shows."""
    metric = doc["summary"].get("metric", "c_index")
    folds = doc.get("folds") or []
    secondary, sec_rows = secondary_rows(doc)
    protocol = doc.get("protocol", "")
    return {
        "title": f"MIL run {folder.name}",
        "subtitle": (f"{str(doc.get('model', '')).upper()} {doc.get('task', '')} ({doc.get('loss', '')} loss), "
                     f"{PROTOCOLS.get(protocol, protocol)}; {doc.get('n_slides', '?')} slides"),
        "verdict": verdict(doc),
        "metric": metric,
        "metric_label": metric_label(metric),
        "protocol": protocol,
        "task": doc.get("task"),
        "rows": (rows := headline_rows(doc)),
        "notes": notes(rows, protocol),
        "has_strat": any(r.get("internal_strat") for r in rows),
        "has_pairs": any(r.get("pairs") is not None for r in rows),
        "secondary": secondary,
        "secondary_rows": sec_rows,
        "folds": folds,
        "fold_columns": fold_columns(folds),
        "settings": settings,
    }
