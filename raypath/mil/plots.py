"""Plots of a MIL run, returned as PNG bytes (the caller writes them).

* :func:`plot_curves`: internal vs external score per test cohort over
  epochs, mean +- sd over repeats/folds (the layout of the DoRA paper's
  Figure 1).
* :func:`plot_km`: Kaplan-Meier curves of the high / low predicted-risk
  groups (median split within each fold) per test cohort, with the
  log-rank p-value (sksurv's estimator; no lifelines at run time).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd


def _fig_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def plot_curves(curves: pd.DataFrame, metric: str = "c_index") -> bytes:
    """One panel per test cohort: internal (pooled) and external score per epoch."""
    c = curves[curves["metric"] == metric] if len(curves) else curves
    if len(c) == 0:
        fig, axes = _grid(1)
        axes[0].text(0.5, 0.5, "no evaluation epochs", ha="center")
        return _fig_bytes(fig)
    protocol = str(c["protocol"].iloc[0])
    if protocol == "internal":
        # one panel per cohort of the held-out folds, plus the pooled one
        panels = [("all", c[c["cohort"] == "all"], None)]
        panels += [(co, c[c["cohort"] == co], None) for co in sorted(set(c["cohort"]) - {"all"})]
    elif protocol == "lodo":
        panels = [
            (n, c[(c["name"] == n) & (c["set"] == "internal")], c[(c["name"] == n) & (c["set"] == "external")])
            for n in sorted(c["name"].unique())
        ]
    else:  # pairwise: a panel per (train A -> test B)
        panels = []
        for n in sorted(c["name"].unique()):
            ext = c[(c["name"] == n) & (c["set"] == "external")]
            for co in sorted(ext["cohort"].unique()):
                panels.append((f"{n} -> {co}", c[(c["name"] == n) & (c["set"] == "internal")], ext[ext["cohort"] == co]))
    fig, axes = _grid(len(panels))
    for ax, (title, internal, external) in zip(axes, panels):
        for df, label, color in ((internal, "internal", "tab:blue"), (external, "external", "tab:red")):
            if df is None or len(df) == 0:
                continue
            df = df[df["cohort"] == "all"] if label == "internal" and protocol != "internal" else df
            g = df.groupby("epoch")["value"]
            m, s = g.mean(), g.std().fillna(0)
            ax.plot(m.index, m.values, color=color, label=label)
            ax.fill_between(m.index, (m - s).values, (m + s).values, color=color, alpha=0.2)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(f"test {title}" if protocol == "lodo" else title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    return _fig_bytes(fig)


def km_curve(time, event) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate (step points) via sksurv."""
    from sksurv.nonparametric import kaplan_meier_estimator

    return kaplan_meier_estimator(np.asarray(event).astype(bool), np.asarray(time, dtype=float))


def risk_groups(predictions: pd.DataFrame) -> pd.Series:
    """``high``/``low`` by the median predicted risk within each fold's
    evaluation set (risk scales differ between folds)."""
    keys = ["name", "repeat", "fold", "split"]
    med = predictions.groupby(keys)["risk"].transform("median")
    return pd.Series(np.where(predictions["risk"] > med, "high", "low"), index=predictions.index)


def plot_km(predictions: pd.DataFrame) -> bytes:
    """KM curves of predicted high/low-risk groups per test cohort (repeat 0)."""
    from sksurv.compare import compare_survival
    from sksurv.util import Surv

    p = predictions[predictions["repeat"] == predictions["repeat"].min()].copy()
    p["group"] = risk_groups(p)
    evald = p[p["split"] == "external"] if (p["split"] == "external").any() else p[p["split"] == "internal"]
    cohorts = sorted(evald["cohort"].astype(str).unique())
    fig, axes = _grid(max(1, len(cohorts)))
    for ax, co in zip(axes, cohorts):
        d = evald[evald["cohort"].astype(str) == co]
        for grp, color in (("low", "tab:blue"), ("high", "tab:red")):
            g = d[d["group"] == grp]
            if len(g) == 0:
                continue
            x, y = km_curve(g["time"], g["event"])
            ax.step(np.concatenate([[0], x]), np.concatenate([[1], y]), where="post", color=color, label=f"{grp} risk (n={len(g)})")
        title = f"{co}"
        if d["group"].nunique() == 2 and d["event"].sum() > 0:
            try:
                _, pval = compare_survival(Surv.from_arrays(d["event"].astype(bool), d["time"].astype(float)), d["group"].to_numpy())
                title += f"  log-rank p={pval:.2g}"
            except Exception:  # noqa: BLE001 - degenerate groups: no p-value
                pass
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("time")
        ax.set_ylabel("survival")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    return _fig_bytes(fig)
