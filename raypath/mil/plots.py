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


#: scores in [0, 1] where 0.5 is random ordering / guessing (axes fixed to [0, 1])
SCORE_METRICS = ("c_index", "uno_c", "td_auc", "auroc", "c_index_stratified")


def _curve_panels(c: pd.DataFrame, protocol: str) -> list[tuple[str, pd.DataFrame | None, pd.DataFrame | None]]:
    """(title, internal rows, external rows) per panel."""
    if protocol == "internal":  # one panel per cohort of the held-out folds, plus the pooled one
        panels = [("all cohorts (pooled)", c[c["cohort"] == "all"], None)]
        return panels + [(co, c[c["cohort"] == co], None) for co in sorted(set(c["cohort"]) - {"all"})]
    if protocol == "lodo":
        return [(f"held-out cohort {n}", c[(c["name"] == n) & (c["set"] == "internal")],
                 c[(c["name"] == n) & (c["set"] == "external")]) for n in sorted(c["name"].unique())]
    panels = []  # pairwise: a panel per (train A -> test B)
    for n in sorted(c["name"].unique()):
        ext = c[(c["name"] == n) & (c["set"] == "external")]
        for co in sorted(ext["cohort"].unique()):
            panels.append((f"train {n} \u2192 test {co}", c[(c["name"] == n) & (c["set"] == "internal")],
                           ext[ext["cohort"] == co]))
    return panels


def plot_curves(curves: pd.DataFrame, metric: str = "c_index") -> bytes:
    """One panel per test cohort: internal (pooled) and external score per epoch,
    mean +- sd over repeats/folds (band clipped to [0, 1]); 0.5 = random."""
    c = curves[curves["metric"] == metric] if len(curves) else curves
    if len(c) == 0:
        fig, axes = _grid(1)
        axes[0].text(0.5, 0.5, "no evaluation epochs", ha="center")
        return _fig_bytes(fig)
    protocol = str(c["protocol"].iloc[0])
    bounded = metric in SCORE_METRICS
    panels = _curve_panels(c, protocol)
    fig, axes = _grid(len(panels))
    labels = {"internal": "internal (held-out patients, training cohorts)" if protocol != "internal" else "held-out folds",
              "external": "external (the held-out cohort)" if protocol == "lodo" else "external (test cohort)"}
    for ax, (title, internal, external) in zip(axes, panels):
        for df, which, color in ((internal, "internal", "tab:blue"), (external, "external", "tab:red")):
            if df is None or len(df) == 0:
                continue
            df = df[df["cohort"] == "all"] if which == "internal" and protocol != "internal" else df
            g = df.groupby("epoch")["value"]
            m, s = g.mean(), g.std().fillna(0)
            lo, hi = (m - s).values, (m + s).values
            if bounded:
                lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)
            ax.plot(m.index, m.values, color=color, label=labels[which])
            ax.fill_between(m.index, lo, hi, color=color, alpha=0.2)
        if bounded:
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="0.5 = random")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric.replace("_", "-") if metric != "c_index" else "C-index")
        ax.legend(fontsize=6.5, loc="lower left")
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


def _censor_ticks(ax, x: np.ndarray, y: np.ndarray, g: pd.DataFrame, color: str) -> None:
    """``+`` on the curve at each censored time."""
    t = g.loc[~g["event"].astype(bool), "time"].astype(float).to_numpy()
    if len(t):
        idx = np.searchsorted(x, t, side="right") - 1
        ax.plot(t, np.where(idx >= 0, y[np.clip(idx, 0, None)], 1.0), "+", color=color, ms=7, mew=1.2)


def _at_risk(ax, d: pd.DataFrame, groups: list[tuple[str, str]], t_max: float) -> None:
    """Numbers at risk under the axis at 4 evenly spaced times."""
    ticks = np.linspace(0, t_max, 4)
    rows = [(grp, color, [int((d.loc[d["group"] == grp, "time"].astype(float) >= t).sum()) for t in ticks])
            for grp, color in groups if (d["group"] == grp).any()]
    for i, (grp, color, counts) in enumerate(rows):
        y = -0.32 - 0.1 * i
        ax.text(-0.02, y, grp, transform=ax.transAxes, ha="right", va="center", fontsize=7, color=color)
        for t, n in zip(ticks, counts):
            ax.text(t / t_max if t_max else 0, y, str(n), transform=ax.transAxes, ha="center", va="center", fontsize=7)
    if rows:
        ax.text(-0.02, -0.22, "at risk", transform=ax.transAxes, ha="right", va="center", fontsize=7, style="italic")


def _logrank_title(d: pd.DataFrame, title: str) -> str:
    from sksurv.compare import compare_survival
    from sksurv.util import Surv

    if d["group"].nunique() == 2 and d["event"].sum() > 0:
        try:
            _, pval = compare_survival(Surv.from_arrays(d["event"].astype(bool), d["time"].astype(float)),
                                       d["group"].to_numpy())
            return f"{title}  log-rank p={pval:.2g}"
        except Exception:  # noqa: BLE001 - degenerate groups: no p-value
            pass
    return title


def plot_km(predictions: pd.DataFrame, time_unit: str | None = None) -> bytes:
    """KM curves of predicted high/low-risk groups per test cohort (repeat 0),
    with censor ticks (+), numbers at risk and the log-rank p-value."""
    p = predictions[predictions["repeat"] == predictions["repeat"].min()].copy()
    p["group"] = risk_groups(p)
    external = (p["split"] == "external").any()
    evald = p[p["split"] == "external"] if external else p[p["split"] == "internal"]
    cohorts = sorted(evald["cohort"].astype(str).unique())
    fig, axes = _grid(max(1, len(cohorts)))
    fig.set_figheight(fig.get_figheight() * 1.25)
    groups = [("low", "tab:blue"), ("high", "tab:red")]
    for ax, co in zip(axes, cohorts):
        d = evald[evald["cohort"].astype(str) == co]
        t_max = float(d["time"].max()) if len(d) else 1.0
        for grp, color in groups:
            g = d[d["group"] == grp]
            if len(g) == 0:
                continue
            x, y = km_curve(g["time"], g["event"])
            ax.step(np.concatenate([[0], x]), np.concatenate([[1], y]), where="post", color=color,
                    label=f"{grp} predicted risk (n={len(g)})")
            _censor_ticks(ax, np.asarray(x), np.asarray(y), g, color)
        ax.set_title(_logrank_title(d, f"held-out {co}" if external else co), fontsize=9)
        ax.set_xlabel(f"time ({time_unit})" if time_unit else "time (unit of the cohort table)", fontsize=8)
        ax.set_ylabel("survival")
        ax.set_xlim(0, t_max)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=6.5, loc="lower left")
        _at_risk(ax, d, groups, t_max)
    return _fig_bytes(fig)
