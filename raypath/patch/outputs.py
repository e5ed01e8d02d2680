"""Outputs of ``raypath patch`` under ``runs/<run>/``.

==========================  ===========================================================
file                        content
==========================  ===========================================================
``summary.json``            the headline (best method, the "LoRA with 10 % of the labels" check,
                            in- vs cross-domain gap), what produced it, the tables below
``metrics.csv``             one row per fit x test set: the five metrics with bootstrap CIs
``validation.csv``          one row per fit x validation set (its training domains' validation
                            patients, pooled ``all`` and per domain): the metrics a sweep selects on
``summary.csv``             mean, sd and n over seeds per method x fraction x train/test domain
``results.md``              the result tables in Markdown (scaling, domain matrix, LODO)
``scaling.png``             metric vs label fraction, one line per method (mean +- sd over seeds)
``domain_matrix.png``       train domain x test domain heatmap per method
``report.html``             one self-contained page, headline first
``patches.parquet``         the patch table with its split
``fits/<fit>.json``         per fit: settings, training history, time
``predictions/<fit>.parquet``  per fit: class probabilities of every test patch
==========================  ===========================================================
"""

from __future__ import annotations

import base64
import html
import io
import json
import math

import numpy as np
import pandas as pd

from raypath.io.jsonio import to_jsonable
from raypath.io.storage import S3Options, atomic_write_bytes, join, read_parquet
from raypath.patch.metrics import METRICS, evaluate

LABELS = {"balanced_accuracy": "balanced accuracy", "f1_weighted": "weighted F1", "auroc": "AUROC",
          "kappa": "Cohen's kappa", "accuracy": "accuracy"}


def _in_domain(protocol: str, train_on: str, test: str) -> bool:
    if protocol == "scaling":
        return True
    if protocol == "domain":
        return train_on == test
    return test != train_on.removeprefix("all-but-")  # lodo


def score_fits(cfg, run_dir: str, ctx: dict, records: list[dict], s3: S3Options | None = None,
               sets: str = "test") -> pd.DataFrame:
    """One row per fit x test set with every metric and its bootstrap CI (``sets="val"``: per fit x
    validation set, no CI: what a sweep selects on)."""
    table, classes = ctx["table"], ctx["classes"]
    labels = table["label"].astype(str).to_numpy()
    slides = table["slide_id"].astype(str).to_numpy()
    pos = classes[ctx["positive"]] if ctx["positive"] is not None else None
    rows = []
    for rec in records:
        pred = read_parquet(join(run_dir, "predictions", f"{rec['key']}.parquet"), s3).to_pandas()
        for name, g in pred.groupby("eval", sort=True):
            if not name.startswith(f"{sets}:"):
                continue
            r = g["row"].to_numpy()
            prob = g[[f"p_{c}" for c in classes]].to_numpy()
            groups = slides[r] if cfg.bootstrap_unit == "slide" else None
            n_boot = cfg.n_boot if sets == "test" else 0
            m = evaluate(labels[r], prob, classes, positive=pos, n_boot=n_boot, seed=int(rec["seed"]), groups=groups)
            test = name.split(":", 1)[1]
            rows.append({"key": rec["key"], "protocol": rec["protocol"], "train_on": rec["train_on"],
                         "method": rec["method"], "fraction": rec["fraction"], "seed": rec["seed"],
                         "test_on": test, "in_domain": _in_domain(rec["protocol"], rec["train_on"], test),
                         "n_train": rec["n_train"], "n_test_slides": int(len(set(slides[r]))), **m})
    out = pd.DataFrame(rows)
    if sets != "test" and not out.empty:
        out = out.drop(columns="in_domain").rename(columns={"test_on": f"{sets}_on", "n_test_slides": f"n_{sets}_slides"})
    return out


def summarize(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and n over seeds per (protocol, train_on, method, fraction, test_on)."""
    keys = ["protocol", "train_on", "method", "fraction", "test_on", "in_domain"]
    agg = {}
    for m in METRICS:
        agg[f"{m}_mean"] = (m, "mean")
        agg[f"{m}_sd"] = (m, lambda v: float(np.std(v, ddof=1)) if v.notna().sum() > 1 else 0.0)
    agg["n_seeds"] = ("seed", "nunique")
    agg["n_train"] = ("n_train", "mean")
    return metrics.groupby(keys, sort=True).agg(**agg).reset_index()


def _fmt(mean: float, sd: float) -> str:
    return "n/a" if mean is None or (isinstance(mean, float) and math.isnan(mean)) else f"{mean:.3f} ± {sd:.3f}"


# --------------------------------------------------------------------------- headline


#: Chance level of a metric for K classes (None: depends on the class mix).
CHANCE = {"balanced_accuracy": lambda k: 1.0 / k, "auroc": lambda k: 0.5, "kappa": lambda k: 0.0}
#: A full-data score must beat chance by this much before a ratio of scores means anything.
LEARNED_MARGIN = 0.1


def lora_check(metrics: pd.DataFrame, metric: str, method: str = "lora", small: float = 0.1,
               n_classes: int = 2) -> dict | None:
    """Does ``method`` with ``small`` of the labels reach ~98 % of its full-data score?  Ratio per
    seed (paired), its mean and range over seeds, on the scaling protocol's pooled test set.

    ``testable`` is False when the full-data score is within ``LEARNED_MARGIN`` of chance: a
    ratio of two chance-level scores says nothing, so the claim is then neither confirmed nor refuted."""
    s = metrics[(metrics["protocol"] == "scaling") & (metrics["test_on"] == "all") & (metrics["method"] == method)]
    a = s[np.isclose(s["fraction"], small)].set_index("seed")[metric]
    b = s[np.isclose(s["fraction"], 1.0)].set_index("seed")[metric]
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        return None
    ratio = np.array([a[k] / b[k] for k in seeds])
    mean = float(np.mean(ratio))
    full = float(b[seeds].mean())
    chance = CHANCE[metric](n_classes) if metric in CHANCE else None
    testable = chance is None or full - chance >= LEARNED_MARGIN
    return {"method": method, "fraction": small, "metric": metric, "seeds": seeds, "ratio_mean": mean,
            "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
            "score_small": float(a[seeds].mean()), "score_full": full, "chance": chance, "testable": testable,
            "holds": bool(testable and mean >= 0.98), "holds_every_seed": bool(testable and (ratio >= 0.98).all())}


def domain_gap(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per method: mean in-domain (diagonal) and cross-domain (off-diagonal) score of the domain protocol."""
    d = summary[(summary["protocol"] == "domain") & (summary["test_on"] != "all")]
    if d.empty:
        return pd.DataFrame()
    d = d[np.isclose(d["fraction"], d["fraction"].max())]
    g = d.groupby(["method", "in_domain"])[f"{metric}_mean"].mean().unstack()
    g = g.rename(columns={True: "in_domain", False: "cross_domain"}).reset_index()
    g["gap"] = g["in_domain"] - g["cross_domain"]
    return g


def headline(cfg, metrics: pd.DataFrame, summary: pd.DataFrame, identity: dict, n_classes: int = 2) -> dict:
    m = cfg.metric
    s = summary[(summary["protocol"] == "scaling") & (summary["test_on"] == "all")]
    out: dict = {"metric": m, "model_key": identity.get("model_key"), "weights": identity.get("weights_sha256")}
    if not s.empty:
        full = s[np.isclose(s["fraction"], s["fraction"].max())].sort_values(f"{m}_mean", ascending=False)
        out["best"] = {"method": full["method"].iloc[0], "fraction": float(full["fraction"].iloc[0]),
                       "mean": float(full[f"{m}_mean"].iloc[0]), "sd": float(full[f"{m}_sd"].iloc[0])}
        out["at_full_data"] = {r["method"]: {"mean": r[f"{m}_mean"], "sd": r[f"{m}_sd"]} for _, r in full.iterrows()}
    out["lora_10pct"] = {meth: lora_check(metrics, m, meth, n_classes=n_classes)
                         for meth in sorted(metrics["method"].unique())}
    gap = domain_gap(summary, m)
    out["domain_gap"] = gap.to_dict("records") if not gap.empty else []
    return out


def headline_sentences(h: dict) -> list[str]:
    lab = LABELS.get(h["metric"], h["metric"])
    lines = []
    if "best" in h:
        b = h["best"]
        lines.append(f"Best with all training labels: {b['method']} ({lab} {b['mean']:.3f} ± {b['sd']:.3f} over seeds), "
                     f"model {h['model_key']}.")
    lc = (h.get("lora_10pct") or {}).get("lora")
    if lc:
        claim = "'LoRA with 10 % of the labels reaches ~98 % of full-data performance'"
        nums = (f"{lab} {lc['score_small']:.3f} (10 %) vs {lc['score_full']:.3f} (100 %), ratio {lc['ratio_mean']:.3f} "
                f"(per seed {lc['ratio_min']:.3f}-{lc['ratio_max']:.3f}, {len(lc['seeds'])} seeds)")
        if not lc.get("testable", True):
            lines.append(f"{claim} cannot be tested here: LoRA with all labels ({lc['score_full']:.3f}) is within "
                         f"{LEARNED_MARGIN:g} of chance ({lc['chance']:.2f}), so the ratio compares noise: {nums}.")
        else:
            lines.append(f"{claim} {'holds' if lc['holds'] else 'does not hold'} here: {nums}.")
    for g in h.get("domain_gap", []):
        lines.append(f"{g['method']}: in-domain {g['in_domain']:.3f}, cross-domain {g['cross_domain']:.3f} "
                     f"(gap {g['gap']:+.3f}).")
    return lines


# --------------------------------------------------------------------------- tables and plots


def scaling_table(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    s = summary[(summary["protocol"] == "scaling") & (summary["test_on"] == "all")]
    if s.empty:
        return pd.DataFrame()
    s = s.assign(cell=[_fmt(a, b) for a, b in zip(s[f"{metric}_mean"], s[f"{metric}_sd"])])
    t = s.pivot(index="method", columns="fraction", values="cell")
    t.columns = [f"{100 * c:g} %" for c in t.columns]
    return t.reset_index()


def domain_table(summary: pd.DataFrame, metric: str, protocol: str = "domain") -> pd.DataFrame:
    d = summary[(summary["protocol"] == protocol) & (summary["test_on"] != "all")]
    if d.empty:
        return pd.DataFrame()
    d = d[np.isclose(d["fraction"], d["fraction"].max())]
    d = d.assign(cell=[_fmt(a, b) for a, b in zip(d[f"{metric}_mean"], d[f"{metric}_sd"])])
    t = d.pivot(index=["method", "train_on"], columns="test_on", values="cell")
    return t.reset_index()


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def scaling_plot(summary: pd.DataFrame, metric: str) -> bytes | None:
    import matplotlib.pyplot as plt

    s = summary[(summary["protocol"] == "scaling") & (summary["test_on"] == "all")]
    if s.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for meth, g in s.groupby("method", sort=True):
        g = g.sort_values("fraction")
        ax.errorbar(100 * g["fraction"], g[f"{metric}_mean"], yerr=g[f"{metric}_sd"], marker="o", capsize=3, label=meth)
    ax.set_xscale("log")
    ax.set_xlabel("training labels used (%)")
    ax.set_ylabel(f"{LABELS.get(metric, metric)} (in-domain test, mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def domain_plot(summary: pd.DataFrame, metric: str) -> bytes | None:
    import matplotlib.pyplot as plt

    d = summary[(summary["protocol"] == "domain") & (summary["test_on"] != "all")]
    if d.empty:
        return None
    d = d[np.isclose(d["fraction"], d["fraction"].max())]
    methods = sorted(d["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods) + 1.5, 3.6), squeeze=False)
    name = lambda c: str(c).replace("_", "\n", 1)  # noqa: E731  (tumour names on two lines)
    for i, (ax, meth) in enumerate(zip(axes[0], methods)):
        t = d[d["method"] == meth].pivot(index="train_on", columns="test_on", values=f"{metric}_mean")
        im = ax.imshow(t.to_numpy(float), vmin=0.5 if metric != "kappa" else 0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(t.shape[1]), [name(c) for c in t.columns], rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(t.shape[0]), [name(c) for c in t.index] if i == 0 else [], fontsize=6)
        for (i, j), v in np.ndenumerate(t.to_numpy(float)):
            ax.text(j, i, "" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(meth, fontsize=9)
        ax.set_xlabel("test domain", fontsize=8)
    axes[0][0].set_ylabel("train domain", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=LABELS.get(metric, metric))
    return _png(fig)


# --------------------------------------------------------------------------- files


def _markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(none)\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _provenance(cfg, identity: dict, ctx: dict) -> str:
    t = ctx["table"]
    return (f"model `{identity.get('model_key')}` (weights {identity.get('weights_sha256')}); "
            f"{len(t)} patches from {t['slide_id'].nunique()} slides, {t['patient_id'].nunique()} patients, "
            f"{t['domain'].nunique()} domains; patches {cfg.patch_px} px at {cfg.mpp} um/px; seeds {cfg.seeds}; "
            f"at most {cfg.max_epochs} epochs of {cfg.pseudo_epoch} patches, patience {cfg.patience}; "
            f"metric {cfg.metric}, mean ± sd over seeds")


def results_markdown(cfg, identity: dict, ctx: dict, summary: pd.DataFrame, h: dict) -> str:
    m = cfg.metric
    parts = [f"# raypath patch: {cfg.run}\n", "\n".join(f"- {s}" for s in headline_sentences(h)) + "\n",
             f"Produced by: {_provenance(cfg, identity, ctx)}.\n",
             f"## In-domain {LABELS.get(m, m)} by label fraction (scaling protocol, pooled test set)\n",
             _markdown(scaling_table(summary, m)),
             "## Domain matrix (train on one domain, test on each; rows = train domain)\n",
             _markdown(domain_table(summary, m))]
    if (summary["protocol"] == "lodo").any():
        parts += ["## Leave one domain out (row = training domains)\n", _markdown(domain_table(summary, m, "lodo"))]
    return "\n".join(parts)


def report_html(cfg, identity: dict, ctx: dict, summary: pd.DataFrame, h: dict, plots: dict[str, bytes]) -> str:
    m = cfg.metric
    esc = html.escape
    body = [f"<h1>Patch classification: {esc(cfg.run)}</h1>", "<section id='answer'><ul>"]
    body += [f"<li>{esc(s)}</li>" for s in headline_sentences(h)] + ["</ul></section>"]
    body.append(f"<p><small>{esc(_provenance(cfg, identity, ctx))}</small></p>")
    body.append(f"<h2>In-domain {esc(LABELS.get(m, m))} by label fraction</h2>")
    body.append(scaling_table(summary, m).to_html(index=False, border=0))
    for name, caption in (("scaling.png", "metric vs label fraction"), ("domain_matrix.png", "train x test domain")):
        if name in plots:
            uri = "data:image/png;base64," + base64.b64encode(plots[name]).decode()
            body.append(f"<figure><img src='{uri}' style='max-width:100%'><figcaption>{caption}</figcaption></figure>")
    body.append("<h2>Domain matrix</h2>" + domain_table(summary, m).to_html(index=False, border=0))
    body.append("<details><summary>settings</summary><pre>" + esc(json.dumps(cfg.to_dict(), indent=1)) + "</pre></details>")
    css = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}td,th{padding:3px 8px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{css}</style></head><body>{''.join(body)}</body></html>"


def write_outputs(cfg, run_dir: str, ctx: dict, fits, records: list[dict], elapsed_s: float,
                  s3: S3Options | None = None) -> dict:
    """Score every fit and write every output file (see the module doc); returns the summary."""
    from raypath.patch.features import feature_identity

    metrics = score_fits(cfg, run_dir, ctx, records, s3)
    summary = summarize(metrics)
    ident = feature_identity(cfg.model, cfg.weights, cfg.patch_px, cfg.mpp)
    identity = {**ident.to_dict(), "model_key": ident.model_key}
    h = headline(cfg, metrics, summary, identity, n_classes=len(ctx["classes"]))
    plots = {k: v for k, v in (("scaling.png", scaling_plot(summary, cfg.metric)),
                               ("domain_matrix.png", domain_plot(summary, cfg.metric))) if v is not None}
    for name, data in plots.items():
        atomic_write_bytes(join(run_dir, name), data, s3)
    atomic_write_bytes(join(run_dir, "metrics.csv"), metrics.to_csv(index=False).encode(), s3)
    validation = score_fits(cfg, run_dir, ctx, records, s3, sets="val")
    atomic_write_bytes(join(run_dir, "validation.csv"), validation.to_csv(index=False).encode(), s3)
    atomic_write_bytes(join(run_dir, "summary.csv"), summary.to_csv(index=False).encode(), s3)
    atomic_write_bytes(join(run_dir, "results.md"), results_markdown(cfg, identity, ctx, summary, h).encode(), s3)
    atomic_write_bytes(join(run_dir, "report.html"), report_html(cfg, identity, ctx, summary, h, plots).encode(), s3)
    doc = {"stage": "patch", "headline": h, "sentences": headline_sentences(h), "elapsed_s": elapsed_s,
           "fits": len(records), "identity": identity, "classes": ctx["classes"],
           "scaling": summary[summary["protocol"] == "scaling"].to_dict("records"),
           "domain": summary[summary["protocol"] != "scaling"].to_dict("records")}
    atomic_write_bytes(join(run_dir, "summary.json"), json.dumps(to_jsonable(doc), indent=1).encode(), s3)
    return doc
