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


def adapter_curves_png(epochs: list[dict], title: str) -> bytes | None:
    """Loss and teacher entropy per epoch (teacher entropy near log(K) = DINO collapsed to uniform)."""
    if not epochs or "loss" not in epochs[0]:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from raypath.robustness.plots import fig_to_png

    x = [int(e.get("epoch", i)) + 1 for i, e in enumerate(epochs)]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.2))
    axes[0].plot(x, [e.get("loss") for e in epochs], marker="o", ms=3)
    axes[0].set_title("DINO loss", fontsize=10)
    ent = [e.get("teacher_entropy") for e in epochs]
    axes[1].plot(x, ent, marker="o", ms=3, color="tab:purple", label="teacher entropy")
    k = epochs[-1].get("out_dim") or epochs[-1].get("head_out_dim")
    if is_number(k):
        axes[1].axhline(math.log(k), color="grey", ls="--", lw=1, label=f"uniform = log({int(k)}) = {math.log(k):.2f}")
        axes[1].legend(fontsize=7, frameon=False)
    axes[1].set_title("teacher entropy (nats)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.suptitle(title, fontsize=10)
    return fig_to_png(fig)


def adapter_context(folder: Folder) -> dict[str, Any]:
    info = folder.json_or_none("adapter_info.json") or {}
    doc = folder.json_or_none("metrics.json") or {}
    epochs = doc.get("epochs") or []
    first, last = (epochs[0], epochs[-1]) if epochs else ({}, {})
    method = str(info.get("method", "adapter")).upper()
    targets = ", ".join(info.get("target_modules") or [])
    verdict = (f"{method} r={info.get('rank', '?')} on {targets or '?'} of {info.get('model', '?')}: "
               f"{len(epochs)} epoch{'s' if len(epochs) != 1 else ''}")
    if epochs:
        verdict += (f"; loss {num(first.get('loss'))} \u2192 {num(last.get('loss'))}, teacher entropy "
                    f"{num(first.get('teacher_entropy'))} \u2192 {num(last.get('teacher_entropy'))} nats.")
    summary = {"model": info.get("model"), "weights": info.get("weights"), "method": info.get("method"),
               "rank r": info.get("rank"), "alpha": info.get("alpha"), "target modules": targets or None,
               "epochs": len(epochs), "objective": info.get("objective")}
    return {"title": f"Adapter {folder.name}", "subtitle": "DINO self-distillation under stain/scanner "
            "augmentation; the teacher's adapter is what `raypath embed --adapter` uses",
            "verdict": verdict, "summary": {k: v for k, v in summary.items() if v is not None},
            "epochs": epochs, "epoch_columns": list(dict.fromkeys(k for e in epochs for k in e)),
            "curves": adapter_curves_png(epochs, f"adapter {folder.name}")}


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
        parts.append(f"the mean held-out-cohort score from {num(mb)} to {num(ma)}")
    text = "After adaptation " + " and ".join(parts) + "." if parts else "The experiment has no results yet."
    if paired:
        mean, se, n = paired
        moved = abs(mean) > 2 * se
        text += (f"  Per held-out cohort the change is {mean:+.3f} \u00b1 {se:.3f} (standard error over {n} "
                 f"cohorts): {'beyond' if moved else 'within'} noise.")
    return text


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


def experiment_context(folder: Folder, doc: dict) -> dict[str, Any]:
    workdir = Folder(folder.uri.rsplit("/", 2)[0], folder.s3)
    rob_name = _run_name(doc.get("robustness_run"))
    comp = workdir.sub(f"runs/{rob_name}").json_or_none("comparison.json") if rob_name else None
    mil = doc.get("mil") or {}
    before_doc = _mil_doc(workdir, (mil.get("before") or {}).get("run_dir"))
    after_doc = _mil_doc(workdir, (mil.get("after") or {}).get("run_dir"))
    from raypath.report.mil import metric_label

    label = metric_label((mil.get("before") or {}).get("metric") or "c_index")
    adapter_name = _run_name(doc.get("adapter"))
    adapter = workdir.sub(f"adapters/{adapter_name}") if adapter_name else None
    epochs = (adapter.json_or_none("metrics.json") or {}).get("epochs") if adapter else None
    links = [("adapter", f"adapters/{adapter_name}")] if adapter_name else []
    links += [("robustness before/after", f"runs/{rob_name}")] if rob_name else []
    links += [(f"ABMIL LODO {k}", f"runs/{_run_name(v.get('run_dir'))}") for k, v in mil.items() if v.get("run_dir")]
    return {
        "title": f"Adaptation experiment {folder.name}",
        "subtitle": (f"adapter {adapter_name or '?'} on {doc.get('model', '?')}: {doc.get('adapt_epochs', '?')} epochs "
                     f"on {doc.get('adapt_tiles', '?')} tiles; robustness and ABMIL leave-one-dataset-out before "
                     "and after, on the same slides"),
        "verdict": experiment_verdict(doc, _paired(mil.get("before") or {}, mil.get("after") or {}), comp),
        "rob_rows": robustness_rows(comp),
        "mil_rows": mil_rows(before_doc, after_doc, label),
        "links": links,
        "feature_dirs": doc.get("feature_dirs") or {},
        "timings": doc.get("timings_s") or {},
        "curves": adapter_curves_png(epochs or [], f"adapter {adapter_name}") if epochs else None,
    }
