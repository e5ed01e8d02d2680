"""Pages of an adaptation: the adapter itself (``adapters/<run>/``) and the
before/after experiment (``runs/<run>/experiment.json`` of
``raypath adapt-experiment``).

The experiment page opens with the before/after table, each number with
its spread (site probe over CV folds, C-index over repeats or held-out
cohorts), and a sentence that says whether anything moved beyond that
spread; then links to the sub-runs and the adapter's loss and
teacher-entropy curves.
"""

from __future__ import annotations

import math
from typing import Any

from raypath.report import robustness as R
from raypath.report.folder import Folder
from raypath.report.html import is_number, num


def is_adapter(files: set[str]) -> bool:
    return "adapter_info.json" in files or ("adapter_config.json" in files and "metrics.json" in files)


def is_experiment(files: set[str]) -> bool:
    return "experiment.json" in files


# --------------------------------------------------------------------------- adapter


def adapter_curves_png(runs: dict[str, list[dict]], title: str) -> bytes | None:
    """Loss and teacher entropy per epoch, one line per adapter (teacher entropy near
    log(K) = DINO collapsed to the uniform distribution)."""
    runs = {k: v for k, v in runs.items() if v and "loss" in v[0]}
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from raypath.robustness.plots import fig_to_png

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.2))
    k_max = None
    for name, epochs in runs.items():
        x = [int(e.get("epoch", i)) + 1 for i, e in enumerate(epochs)]
        axes[0].plot(x, [e.get("loss") for e in epochs], marker="o", ms=3, label=name)
        axes[1].plot(x, [e.get("teacher_entropy") for e in epochs], marker="o", ms=3, label=name)
        k = epochs[-1].get("out_dim") or epochs[-1].get("head_out_dim")
        k_max = k if is_number(k) else k_max
    if is_number(k_max):
        axes[1].axhline(math.log(k_max), color="grey", ls="--", lw=1, label=f"uniform: log({int(k_max)})")
    axes[0].set_title("DINO loss", fontsize=10)
    axes[1].set_title("teacher entropy (nats)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig_to_png(fig)


def adapter_context(folder: Folder) -> dict[str, Any]:
    info = folder.json_or_none("adapter_info.json") or {}
    doc = folder.json_or_none("metrics.json") or {}
    epochs = doc.get("epochs") or []
    first, last = (epochs[0], epochs[-1]) if epochs else ({}, {})
    method = str(info.get("method", "adapter")).upper()
    targets = ", ".join(info.get("target_modules") or [])
    seen = folder.json_or_none("tuned_on.json") or {}
    verdict = (f"{method} r={info.get('rank', '?')} on {targets or '?'} of {info.get('model', '?')}"
               + (f", tuned on {', '.join(seen['cohorts'])} only" if seen.get("cohorts") else "")
               + f": {len(epochs)} epoch{'s' if len(epochs) != 1 else ''}")
    if epochs:
        verdict += (f"; loss {num(first.get('loss'))} \u2192 {num(last.get('loss'))}, teacher entropy "
                    f"{num(first.get('teacher_entropy'))} \u2192 {num(last.get('teacher_entropy'))} nats.")
    tuned_on = (f"{len(seen.get('slide_ids') or [])} slides of {', '.join(seen.get('cohorts') or [])} "
                f"({seen.get('n_tiles', '?')} tiles)" if seen.get("cohorts") else None)
    summary = {"model": info.get("model"), "weights": info.get("weights"), "method": info.get("method"),
               "rank r": info.get("rank"), "alpha": info.get("alpha"), "target modules": targets or None,
               "tuned on": tuned_on, "epochs": len(epochs), "objective": info.get("objective")}
    return {"title": f"Adapter {folder.name}", "subtitle": "DINO self-distillation under stain/scanner "
            "augmentation; the teacher's adapter is what `raypath embed --adapter` uses",
            "verdict": verdict, "summary": {k: v for k, v in summary.items() if v is not None},
            "epochs": epochs, "epoch_columns": list(dict.fromkeys(k for e in epochs for k in e)),
            "curves": adapter_curves_png({folder.name: epochs}, f"adapter {folder.name}")}


# --------------------------------------------------------------------------- experiment


def _mil_doc(workdir: Folder, run_dir: str | None) -> dict | None:
    if not run_dir:
        return None
    name = str(run_dir).rstrip("/").rsplit("/", 1)[-1]
    return workdir.sub(f"runs/{name}").json_or_none("metrics.json")


def _paired(before: dict, after: dict) -> tuple[float, float, int] | None:
    """Mean and standard error of the per-cohort differences after - before."""
    b, a = before.get("per_cohort") or {}, after.get("per_cohort") or {}
    d = [a[c] - b[c] for c in b if is_number(b.get(c)) and is_number(a.get(c))]
    if len(d) < 2:
        return None
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return mean, sd / math.sqrt(len(d)), len(d)


def mil_rows(before_doc: dict | None, after_doc: dict | None, metric_label: str) -> list[dict[str, Any]]:
    """LODO rows: mean over held-out cohorts (sd over cohorts) and each cohort (sd over repeats)."""
    if not before_doc or not after_doc:
        return []
    sb, sa = before_doc["summary"], after_doc["summary"]

    def over_cohorts(s: dict) -> dict:
        vals = [v for v in (s.get("per_cohort") or {}).values() if is_number(v)]
        if len(vals) < 2:
            return {"mean": s.get("mean"), "n": len(vals)}
        m = sum(vals) / len(vals)
        return {"mean": m, "sd": math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)), "n": len(vals)}

    rows = [{"label": f"LODO external {metric_label}, mean over held-out cohorts", "a": over_cohorts(sb),
             "b": over_cohorts(sa), "better": "higher"},
            {"label": f"LODO external {metric_label}, worst held-out cohort", "a": {"mean": sb.get("worst")},
             "b": {"mean": sa.get("worst")}, "better": "higher"}]
    for c in sorted(set(sb.get("external") or {}) | set(sa.get("external") or {})):
        rows.append({"label": f"  held-out {c}", "a": (sb.get("external") or {}).get(c) or {},
                     "b": (sa.get("external") or {}).get(c) or {}, "better": "higher"})
    for r in rows:
        ma, mb = r["a"].get("mean"), r["b"].get("mean")
        r["delta"] = mb - ma if is_number(ma) and is_number(mb) else None
    return rows


def experiment_verdict(doc: dict, paired: tuple[float, float, int] | None, comp: dict | None) -> str:
    from raypath.report.mil import metric_label

    label = metric_label(((doc.get("mil") or {}).get("before") or {}).get("metric") or "c_index")
    parts = []
    if comp:
        d = comp.get("delta", {}).get("site_probe_balanced_accuracy", {})
        chance = (comp.get("a", {}).get("headline") or {}).get("site_probe_chance")
        if is_number(d.get("a")) and is_number(d.get("b")):
            parts.append(f"the site probe moves from {num(d['a'])} to {num(d['b'])}"
                         + (f" (chance {num(chance)})" if is_number(chance) else ""))
    mil = doc.get("mil") or {}
    mb, ma = (mil.get("before") or {}).get("mean"), (mil.get("after") or {}).get("mean")
    if is_number(mb) and is_number(ma):
        parts.append(f"the mean held-out-cohort {label} from {num(mb)} to {num(ma)}")
    text = "After adaptation " + " and ".join(parts) + "." if parts else "The experiment has no results yet."
    if comp and any(r["delta_ci"] for r in R.comparison_rows(comp)):
        text += "  Robustness: " + R.comparison_verdict(comp)[0].lower() + R.comparison_verdict(comp)[1:]
    if paired:
        mean, se, n = paired
        moved = abs(mean) > 2 * se
        text += (f"  Per held-out cohort the change is {mean:+.3f} \u00b1 {se:.3f} (standard error over {n} "
                 f"cohorts): {'beyond' if moved else 'within'} noise.")
    return text


def _plural(n: Any, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}" if n is not None else f"? {noun}s"


def _run_name(uri: str | None) -> str | None:
    return str(uri).rstrip("/").rsplit("/", 1)[-1] if uri else None


def robustness_rows(comp: dict | None) -> list[dict[str, Any]]:
    """Before/after robustness rows with each side's spread (from the comparison's full results)."""
    if not comp:
        return []
    rows = []
    for r in R.comparison_rows(comp):
        key = next((k for k in comp.get("delta", {}) if R.label(k) == r["label"]), None)
        rows.append({**r, "spread_a": R.spread(key, (comp.get("a") or {}).get("metrics", {})) if key else "",
                     "spread_b": R.spread(key, (comp.get("b") or {}).get("metrics", {})) if key else ""})
    return rows


def _adapters(doc: dict) -> dict[str, str]:
    """held-out cohort (or "") -> adapter run name; one adapter per LODO fold, or one for all."""
    if isinstance(doc.get("adapters"), dict):
        return {c: _run_name(a) for c, a in doc["adapters"].items() if a}
    return {"": _run_name(doc["adapter"])} if doc.get("adapter") else {}


def _links(adapters: dict[str, str], rob_name: str | None, mil: dict) -> list[tuple[str, str]]:
    links = [(f"adapter for held-out {c}" if c else "adapter", f"adapters/{a}") for c, a in adapters.items()]
    links += [("robustness before/after", f"runs/{rob_name}")] if rob_name else []
    for k, v in mil.items():
        if v.get("run_dir"):
            links.append((f"ABMIL LODO {k} adaptation", f"runs/{_run_name(v['run_dir'])}"))
    return links


def experiment_context(folder: Folder, doc: dict) -> dict[str, Any]:
    workdir = Folder(folder.uri.rsplit("/", 2)[0], folder.s3)
    rob_name = _run_name(doc.get("robustness_run"))
    comp = workdir.sub(f"runs/{rob_name}").json_or_none("comparison.json") if rob_name else None
    mil = doc.get("mil") or {}
    before_doc = _mil_doc(workdir, (mil.get("before") or {}).get("run_dir"))
    after_doc = _mil_doc(workdir, (mil.get("after") or {}).get("run_dir"))
    from raypath.report.mil import headline_rows, metric_label, notes

    label = metric_label((mil.get("before") or {}).get("metric") or "c_index")
    why = [f"before, {n}" for n in notes(headline_rows(before_doc)) if " external:" in n] if before_doc else []
    adapters = _adapters(doc)
    curves = {a: (workdir.sub(f"adapters/{a}").json_or_none("metrics.json") or {}).get("epochs") or []
              for a in adapters.values()}
    per_fold = len(adapters) > 1 or doc.get("per_fold_adapters")
    return {
        "title": f"Adaptation experiment {folder.name}",
        "subtitle": (f"{len(adapters)} DoRA adapter{'s' if len(adapters) != 1 else ''} on {doc.get('model', '?')}"
                     + (", one per held-out cohort, tuned only on that fold's training slides" if per_fold else "")
                     + f" ({_plural(doc.get('adapt_epochs'), 'epoch')}, {_plural(doc.get('adapt_tiles'), 'tile')}); robustness "
                     "and ABMIL leave-one-dataset-out before and after, on the same slides"),
        "verdict": experiment_verdict(doc, _paired(mil.get("before") or {}, mil.get("after") or {}), comp),
        "rob_rows": robustness_rows(comp),
        "mil_rows": mil_rows(before_doc, after_doc, label),
        "links": _links(adapters, rob_name, mil),
        "feature_dirs": {k: (", ".join(f"{c}: {d}" for c, d in v.items()) if isinstance(v, dict) else v)
                         for k, v in (doc.get("feature_dirs") or {}).items()},
        "timings": doc.get("timings_s") or {},
        "note": doc.get("robustness_note"),
        "mil_notes": why[:4],
        "curves": adapter_curves_png(curves, "adapters of this experiment"),
    }
