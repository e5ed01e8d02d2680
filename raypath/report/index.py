"""The workdir's index page (``<workdir>/report.html``).

First screen: the study card (cohorts, slides, patients, events, tiles,
the model and its weights -- with a banner when the weights are random),
one sentence with the answer, and the leave-one-dataset-out table.  Then
robustness with chance levels side by side, experiments, sweeps and
adapters, a strip of QC thumbnails linking to the full images, and a link
to every run's page.
"""

from __future__ import annotations

import logging
from typing import Any

from raypath.report import mil as M
from raypath.report import robustness as R
from raypath.report.folder import Folder
from raypath.report.html import is_number, num, thumbnail_uri

log = logging.getLogger(__name__)

#: QC thumbnails inlined on the index (all of them stay one click away in qc/)
QC_STRIP_MAX = 48
KINDS = ("runs", "sweeps", "adapters")
#: Run kinds whose stage writes its own report.html (kept by `raypath report`).
OWN_PAGE = ("patch", "predict")


# --------------------------------------------------------------------------- study card


def _tile_counts(folder: Folder):
    try:
        from raypath.wsi.tile_table import tile_counts

        return tile_counts(folder.uri, folder.s3)
    except Exception:  # noqa: BLE001 - no tiles yet, or an older layout
        if folder.exists("tiling_summary.parquet"):
            t = folder.parquet("tiling_summary.parquet", ["slide_id", "n_tiles"])
            return t.set_index("slide_id")["n_tiles"]
        return None


def _cohort_rows(slides, tiles) -> list[dict[str, Any]]:
    rows = []
    ok = slides["status"].astype(str) == "ok" if "status" in slides.columns else slides["slide_id"].notna()
    for cohort, g in slides.groupby(slides["cohort"].astype(str), sort=True):
        gok = g[ok.loc[g.index]]
        row = {"cohort": cohort, "slides": len(g), "ok": len(gok), "patients": int(gok["patient_id"].nunique())}
        if "event" in g.columns:
            row["events"] = int(gok["event"].fillna(0).astype(int).sum())
        if "label" in g.columns:
            lab = gok["label_name"] if "label_name" in g.columns else gok["label"]
            row["labels"] = ", ".join(f"{k}: {v}" for k, v in lab.astype(str).value_counts().sort_index().items())
        if "scanner" in g.columns:
            row["scanners"] = ", ".join(sorted(gok["scanner"].dropna().astype(str).unique()))
        if tiles is not None:
            row["tiles"] = int(tiles.reindex(gok["slide_id"].astype(str)).fillna(0).sum())
        rows.append(row)
    return rows


def _models(folder: Folder) -> list[dict[str, Any]]:
    out = []
    for key in folder.subdirs("features"):
        man = folder.json_or_none(f"features/{key}/manifest.json") or {}
        weights = str(man.get("weights") or "?")
        out.append({"key": key, "model": man.get("model", key), "weights": weights,
                    "random": weights.startswith("random") or str(man.get("weights_sha256", "")).startswith("random"),
                    "adapter": man.get("adapter"), "slides": len(man.get("slides") or [])})
    return out


def study_card(folder: Folder) -> dict[str, Any] | None:
    """Counts per cohort and in total, plus the feature stores' models."""
    if not folder.exists("slides.parquet"):
        return None
    slides = folder.parquet("slides.parquet")
    tiles = _tile_counts(folder)
    rows = _cohort_rows(slides, tiles)
    total = {k: sum(r[k] for r in rows) for k in ("slides", "ok", "patients", "events", "tiles") if rows and k in rows[0]}
    columns = [c for c in ("slides", "ok", "patients", "events", "tiles", "labels", "scanners") if rows and c in rows[0]]
    return {"rows": rows, "total": total, "columns": columns, "n_cohorts": len(rows), "models": _models(folder)}


def random_weight_banners(card: dict | None) -> list[str]:
    if not card:
        return []
    by_model: dict[str, list[str]] = {}
    for m in card["models"]:
        if m["random"]:
            by_model.setdefault(m["model"], []).append(m["key"])
    return [f"Features from {model} with random weights ({', '.join(keys)}): the numbers on these pages test the "
            "pipeline, not a model." for model, keys in by_model.items()]


def experiment_parts(runs: list[dict]) -> set[str]:
    """Runs that belong to an adaptation experiment (shown on its page, not as study results)."""
    parts: set[str] = set()
    for r in runs:
        if r["kind"] == "experiment" and isinstance(r["doc"], dict):
            parts |= {x["name"] for x in runs if x["name"].startswith(r["name"] + "-")}
            for v in (r["doc"].get("mil") or {}).values():
                if isinstance(v, dict) and v.get("run_dir"):
                    parts.add(str(v["run_dir"]).rstrip("/").rsplit("/", 1)[-1])
    return parts


# --------------------------------------------------------------------------- runs


def classify(sub: Folder) -> tuple[str, dict | None]:
    """(kind, main document) of a run/sweep/adapter folder."""
    names = set(sub.files(max_depth=1))
    if "comparison.json" in names:
        return "comparison", sub.json_or_none("comparison.json")
    if "robustness.json" in names:
        return "robustness", sub.json_or_none("robustness.json")
    if "experiment.json" in names:
        return "experiment", sub.json_or_none("experiment.json")
    if "adapter_info.json" in names or "adapter_config.json" in names:
        return "adapter", sub.json_or_none("adapter_info.json")
    if "sweep.json" in names or "trials.csv" in names:
        return "sweep", sub.json_or_none("sweep.json")
    summary = sub.json_or_none("summary.json") if "summary.json" in names else None
    if isinstance(summary, dict) and summary.get("stage") == "patch":
        return "patch", summary  # `raypath patch` writes its own page (raypath.patch.outputs)
    doc = sub.json_or_none("metrics.json") if "metrics.json" in names else None
    if isinstance(doc, dict) and doc.get("stage") == "predict":
        return "predict", doc  # `raypath predict` writes its own page (raypath.predict)
    if M.is_mil(doc):
        return "mil", doc
    return ("other", doc) if names else ("empty", None)


def headline(kind: str, doc: dict | None) -> str:
    """One line for the run list."""
    if not isinstance(doc, dict):
        return "no results yet" if kind != "other" else "outputs without a headline (open the page)"
    if kind == "mil":
        first = M.verdict(doc).split("  ")[0]
        return f"{doc.get('task')}, {doc.get('protocol')}: {first}"
    if kind == "robustness":
        return R.verdict(doc.get("headline", {}))
    if kind == "comparison":
        return R.comparison_verdict(doc)
    if kind == "sweep":
        from raypath.report.sweep import verdict

        return verdict(doc, "?").replace("#? ", "")
    if kind == "experiment":
        mil = doc.get("mil") or {}
        b, a = (mil.get("before") or {}).get("mean"), (mil.get("after") or {}).get("mean")
        rows = {r.get("metric"): r for r in doc.get("table") or [] if isinstance(r, dict)}
        probe = next((r for k, r in rows.items() if str(k).startswith("site probe balanced")), None)
        site = (f"site probe {num(probe.get('before'))} \u2192 {num(probe.get('after'))}; " if probe else "")
        return f"before \u2192 after adaptation: {site}mean held-out C-index {num(b)} \u2192 {num(a)}"
    if kind == "patch":
        return " ".join((doc.get("sentences") or [])[:2]) or f"patch classification, {doc.get('fits', '?')} fits"
    if kind == "predict":
        return predict_headline(doc)
    if kind == "adapter":
        return f"{str(doc.get('method', '')).upper()} r={doc.get('rank')} on {doc.get('model')}, {doc.get('epochs')} epochs"
    return "outputs without a headline (open the page)"


def _ci(v: Any, lo: Any, hi: Any) -> str:
    ci = f" (95% CI {num(lo)}\u2013{num(hi)})" if is_number(lo) and is_number(hi) and lo == lo and hi == hi else ""
    return f"{num(v)}{ci}"


def predict_headline(doc: dict) -> str:
    """One line for a ``raypath predict`` run: its metric with the CI, or what was scored."""
    model = str(doc.get("model") or "?").rstrip("/").rsplit("/", 1)[-1]
    n, failed = doc.get("n_slides", "?"), len(doc.get("failed") or [])
    tail = f"; {failed} slide(s) not scored" if failed else ""
    if doc.get("model_kind") == "patch":
        pos, h = doc.get("positive", "?"), doc.get("headline") or {}
        return (f"patch model {model}: {n} slides, {doc.get('n_tiles', '?')} tiles scored; mean P({pos}) "
                f"{num(h.get(f'mean_prob_{pos}'))}, median {num(h.get(f'median_density_{pos}_per_mm2'))} "
                f"tiles over 0.5 per mm\u00b2{tail}")
    if isinstance(doc.get("survival"), dict):
        s = doc["survival"]
        return (f"model {model}: C-index {_ci(s.get('c_index'), s.get('ci_low'), s.get('ci_high'))} on "
                f"{s.get('n_patients', '?')} new patients ({n} slides scored){tail}")
    c = doc.get("classification")
    if isinstance(c, dict) and "auroc" in c:
        return (f"model {model}: AUROC {_ci(c.get('auroc'), c.get('auroc_ci_low'), c.get('auroc_ci_high'))} on "
                f"{c.get('n_slides', '?')} new slides ({n} slides scored){tail}")
    return f"model {model}: {n} slides scored, no outcomes{tail}"


def lodo_tables(runs: list[dict]) -> list[dict[str, Any]]:
    return [{"run": r["name"], "href": r["href"], "rows": M.headline_rows(r["doc"]), "verdict": M.verdict(r["doc"]),
             "metric_label": M.metric_label(r["doc"]["summary"].get("metric", "c_index")), "task": r["doc"].get("task")}
            for r in runs if r["kind"] == "mil" and r["doc"].get("protocol") == "lodo"]


def robustness_tables(runs: list[dict]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        if r["kind"] == "robustness":
            out.append({"run": r["name"], "href": r["href"], "verdict": R.verdict(r["doc"].get("headline", {})),
                        "rows": R.metric_rows(r["doc"], R.SHORT)})
    return out


def qc_strip(folder: Folder, limit: int = QC_STRIP_MAX) -> dict[str, Any]:
    """Thumbnails of ``qc/*.png`` (failed slides marked), each linking to the full image."""
    names = [f"qc/{f}" for f in folder.sub("qc").files(max_depth=1) if f.endswith(".png")] if folder.exists("qc") else []
    failed: set[str] = set()
    if folder.exists("tiling_summary.parquet"):
        t = folder.parquet("tiling_summary.parquet", ["slide_id", "status"])
        failed = set(t.loc[t["status"].astype(str) != "ok", "slide_id"].astype(str))
    items = []
    for rel in sorted(names, key=lambda n: (n.rsplit("/", 1)[-1][:-4] not in failed, n))[:limit]:
        sid = rel.rsplit("/", 1)[-1][:-4]
        try:
            items.append({"href": rel, "src": thumbnail_uri(folder.read(rel)), "slide": sid, "failed": sid in failed})
        except Exception as e:  # noqa: BLE001 - one unreadable PNG must not break the index
            log.info("QC thumbnail %s skipped: %s", rel, e)
    return {"items": items, "n": len(names), "n_failed": len(failed)}


def _run_entry(folder: Folder, kind_dir: str, name: str, linked: set[str] | None) -> dict[str, Any]:
    sub = folder.sub(f"{kind_dir}/{name}")
    try:
        kind, doc = classify(sub)
        line = headline(kind, doc)
    except Exception as e:  # noqa: BLE001 - a broken run never breaks the index
        kind, doc, line = "unreadable", None, f"unreadable: {type(e).__name__}: {e}"
    rel = f"{kind_dir}/{name}"
    has_page = (linked is not None and rel in linked) or sub.exists("report.html")
    return {"name": name, "dir": kind_dir, "path": rel, "kind": kind, "doc": doc, "headline": line,
            "href": f"{rel}/report.html" if has_page else None}


def nested_projects(folder: Folder) -> list[str]:
    """Sub-folders that are projects of their own (a ``runs/`` folder inside), e.g. the demo's later
    cohort ``external/``: their runs are listed (predictions of a model trained here) but never mixed
    into this project's LODO and robustness tables."""
    skip = set(KINDS) | {"qc", "features", "cache", "models", "study", "mlruns"}
    return [p for p in folder.subdirs("") if p not in skip and folder.isdir(f"{p}/runs")]


def collect_runs(folder: Folder, linked: set[str] | None = None) -> list[dict[str, Any]]:
    """Every run, sweep and adapter folder with its kind, headline and page link (then the runs of
    nested projects, flagged ``nested``)."""
    runs = [_run_entry(folder, kind_dir, name, linked) for kind_dir in KINDS for name in folder.subdirs(kind_dir)]
    for proj in nested_projects(folder):
        runs += [{**_run_entry(folder, f"{proj}/runs", name, linked), "nested": True}
                 for name in folder.subdirs(f"{proj}/runs")]
    return runs


def answer(card: dict | None, lodo: list[dict], robust: list[dict]) -> str:
    """The index's one-sentence answer: the LODO headline and the site signal."""
    parts = []
    if lodo:
        parts.append(lodo[0]["verdict"].split("  ")[0])
    if robust:
        parts.append(robust[0]["verdict"])
    if not parts:
        if card:
            return (f"{card['total'].get('ok', 0)} slides of {card['n_cohorts']} cohorts are ingested; "
                    "no evaluated run yet (run `raypath mil` or `raypath robustness`).")
        return "No results yet: run a stage (e.g. `raypath ingest`, then `raypath tile`) first."
    return "  ".join(parts)


def context(folder: Folder, linked: set[str] | None = None) -> dict[str, Any]:
    card = study_card(folder)
    runs = collect_runs(folder, linked)
    parts = experiment_parts(runs)
    own = [r for r in runs if (r["name"] not in parts or r["dir"] != "runs") and not r.get("nested")]
    lodo = lodo_tables(own)
    robust = robustness_tables(own)
    internal = [{"run": r["name"], "href": r["href"], "verdict": M.verdict(r["doc"])}
                for r in own if r["kind"] == "mil" and r["doc"].get("protocol") != "lodo"]
    experiments = [{"run": r["path"] if r.get("nested") else r["name"], "href": r["href"], "verdict": r["headline"]}
                   for r in runs if r["kind"] in ("experiment", "comparison", "sweep", "patch", "predict")
                   and (r in own or r.get("nested"))]
    files = set(folder.files(max_depth=1))
    project = [f for f in ("cohort.csv", "slides.parquet", "tiles.parquet", "tiling_summary.parquet")
               if f in files or folder.exists(f)]
    return {
        "title": f"raypath study: {folder.name}",
        "subtitle": folder.uri,
        "banners": random_weight_banners(card),
        "card": card,
        "verdict": answer(card, lodo, robust),
        "lodo": lodo,
        "internal": internal,
        "robust": robust,
        "experiments": experiments,
        "runs": runs,
        "qc": qc_strip(folder),
        "project_files": project,
    }
