"""The validation study of the four seed claims on the reference model (issue 20).

One command, each claim in its own paper's protocol, on studies generated with
seeds the reference model never saw (its pretraining study is seed 1000, ids
``pt-``; here seed 2000, ids ``val-``, and the mitosis study seed 2001):

A. what the features carry: a grouped linear probe of the phenotype (biology)
   and of the site, reference model vs the same architecture at random init;
B. DoRA + heavy augmentation (seed 000): site probe, KMeans purity, RI,
   external and internal C-index before vs after, one adapter per LODO fold
   tuned without the held-out cohort (``raypath adapt-experiment``);
C. LoRA vs linear probe across label fractions and domains (seed 001) and
   PathoTune vs LoRA/DoRA/probe/full fine-tuning, metric and trainable
   parameters (seed 003) (``raypath patch``);
D. robustness losses off vs on (seed 002): prediction inconsistency and
   C-index under LODO with real technical variants (``raypath mil``).

Every number is a mean over >= 5 repeats (seeds) with a 95 % t-interval, and
each comparison a paired difference over the same repeats.  Writes
``benchmarks/results/validation.json`` and ``validation.md`` and, with
``--write-docs``, the generated block of ``docs/VALIDATION.md``.

    python benchmarks/validation_study.py --write-docs          # ~60 min on 2 CPU cores
    python benchmarks/validation_study.py --parts A --repeats 5  # one part
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from pathlib import Path

import warnings

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from robust_losses_study import _t_ci as t_ci  # noqa: E402  (one t-interval for every benchmark)
from robust_losses_study import compare as compare_arms  # noqa: E402
from robust_losses_study import run_arm  # noqa: E402

BEGIN, END = "<!-- validation:begin (written by benchmarks/validation_study.py) -->", "<!-- validation:end -->"


def fmt(t) -> str:
    """``mean [lo, hi]`` of a (mean, lo, hi) triple."""
    m, lo, hi = t
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    return f"{m:.3f}" if lo is None or math.isnan(lo) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def verdict(diff: tuple, better: str = "higher") -> str:
    """holds / does not hold / inconclusive from a paired difference's CI (claimed direction ``better``)."""
    m, lo, hi = diff
    if lo is None or math.isnan(lo):
        return "inconclusive (no CI)"
    good, bad = (lo > 0, hi < 0) if better == "higher" else (hi < 0, lo > 0)
    return "holds" if good else "does not hold" if bad else "inconclusive (CI spans 0)"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- the study


def prepare(wd: Path, a) -> None:
    """synth (site effects, pairs, confounding) -> ingest -> tile; cached."""
    from raypath.synth.study import SynthConfig, synthesize
    from raypath.wsi.ingest import IngestConfig, ingest
    from raypath.wsi.tiling import TileConfig, tile

    synthesize(SynthConfig(out=str(wd / "study"), n_cohorts=3, slides_per_cohort=a.slides_per_cohort,
                           slide_px=a.slide_px, pair_fraction=0.5, confounding=0.3, site_strength=1.0,
                           seed=a.study_seed, id_prefix="val-", workers=2, reuse=True))
    if not (wd / "slides.parquet").exists():
        ingest(IngestConfig(cohort=str(wd / "study" / "cohort.csv"), workdir=str(wd)))
    if not (wd / "tiles.parquet").exists():
        tile(TileConfig(workdir=str(wd)))


def embed_features(wd: Path, model: str, weights: str | None, **kw) -> str:
    from raypath.embed.api import EmbedConfig, embed

    return str(embed(EmbedConfig(workdir=str(wd), model=model, weights=weights, **kw)).feature_dir)


# --------------------------------------------------------------------------- A: what the features carry


def probe_with_ci(X, y, units, seed: int, n_boot: int = 1000) -> dict:
    """Grouped (patient U pair) 5-fold logistic-regression probe: balanced accuracy of the pooled
    out-of-fold predictions, its 95 % bootstrap CI over units, and chance (1 / classes)."""
    from raypath.robustness import metrics as M

    res = M.site_probe(X, y, units, n_splits=5, seed=seed)
    yc, pred = res["y"], res["oof_pred"]
    grp, _ = M.codes(units)
    rng = np.random.default_rng(seed)
    rows_of = [np.flatnonzero(grp == g) for g in range(grp.max() + 1)]
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([rows_of[g] for g in rng.integers(0, len(rows_of), len(rows_of))])
        if len(np.unique(yc[idx])) == len(np.unique(yc)):
            boots.append(M.balanced_accuracy(yc[idx], pred[idx]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"balanced_accuracy": float(res["balanced_accuracy"]), "ci": [float(lo), float(hi)],
            "chance": float(res["chance"]), "n_tiles": int(len(y)), "n_units": int(len(rows_of))}


def part_a(wd: Path, a, features: dict[str, str]) -> dict:
    from raypath.robustness.api import load_sample, load_slides, tissue_units

    slides = load_slides(str(wd))
    out = {}
    for name, fdir in features.items():
        X, meta, _ = load_sample(fdir, slides, 32, seed=0)
        units = tissue_units(meta)
        out[name] = {"phenotype": probe_with_ci(X, meta["label"].astype(str).to_numpy(), units, seed=0),
                     "site": probe_with_ci(X, meta["cohort"].astype(str).to_numpy(), units, seed=0)}
        print(f"[A] {name}: {json.dumps(out[name])}", flush=True)
    return out


def md_a(res: dict) -> str:
    rows = []
    for name, r in res.items():
        for what in ("phenotype", "site"):
            p = r[what]
            lo = p["ci"][0] - p["chance"]
            rows.append([name, what, fmt((p["balanced_accuracy"], *p["ci"])), f"{p['chance']:.3f}",
                         "yes" if lo >= 0.25 else "no", p["n_tiles"]])
    return table(["features", "probe of", "balanced accuracy [95 % CI]", "chance",
                  "CI low >= chance + 0.25", "tiles"], rows)


# --------------------------------------------------------------------------- B: DoRA (seed 000)


def _per_repeat(paths: list[str]) -> pd.DataFrame:
    """Per repeat: mean external C over held-out cohorts, mean internal (cohort-stratified) C."""
    f = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    ext = f[f["set"] == "external"].groupby("repeat")["c_index"].mean()
    intl = f[(f["set"] == "internal") & (f["cohort"] == "stratified")].groupby("repeat")["c_index"].mean()
    return pd.DataFrame({"external": ext, "internal": intl})


def part_b(wd: Path, a) -> dict:
    from raypath.adapt.experiment import ExperimentConfig, _safe, run_experiment
    from raypath.robustness.api import COMPARISON_FILE

    cfg = ExperimentConfig(
        workdir=str(wd), model=a.model, weights=a.weights, method="dora", augmentation="heavy",
        run=f"val-dora-e{a.adapt_epochs}-lr{a.adapt_lr:g}", seed=a.seed, epochs=a.adapt_epochs, lr=a.adapt_lr,
        warmup_epochs=1, tiles_per_slide=16, n_local_crops=4, batch_size=32,
        robustness_tiles_per_slide=32, kmeans_repeats=5, plots=False, mil_epochs=a.mil_epochs,
        mil_repeats=a.repeats)
    doc = run_experiment(cfg)
    runs, run = wd / "runs", cfg.run
    delta = json.loads((runs / f"{run}-robustness" / COMPARISON_FILE).read_text())["delta"]
    before = _per_repeat([str(runs / f"{run}-mil-before" / "fold_metrics.parquet")])
    after = _per_repeat([str(runs / f"{run}-mil-after-{_safe(c)}" / "fold_metrics.parquet")
                         for c in doc["folds"]])
    mil = {}
    for col in ("external", "internal"):
        b, f = before[col].sort_index().to_numpy(), after[col].sort_index().to_numpy()
        mil[col] = {"before": t_ci(b), "after": t_ci(f), "diff": t_ci(f - b), "n_repeats": int(len(b))}
    return {"robustness": delta, "mil": mil, "timings_s": doc["timings_s"], "folds": doc["folds"],
            "adapt": {"epochs": a.adapt_epochs, "lr": a.adapt_lr, "tiles_per_slide": 16, "batch_size": 32}}


_ROB = [("site_probe_balanced_accuracy", "site probe balanced accuracy", "lower"),
        ("kmeans_purity", "KMeans cohort purity", "lower"),
        ("robustness_index", "robustness index (RI)", "higher")]


def md_b(res: dict) -> str:
    rows = []
    for key, label, better in _ROB:
        d = res["robustness"].get(key, {})
        diff = (d.get("delta"), d.get("ci_low"), d.get("ci_high"))
        rows.append([label, f"{d.get('a', float('nan')):.3f}", f"{d.get('b', float('nan')):.3f}", fmt(diff),
                     f"{better} = more robust", verdict(diff, better)])
    for col in ("external", "internal"):
        m = res["mil"][col]
        rows.append([f"{col} C-index (LODO, {m['n_repeats']} repeats)", fmt(m["before"]), fmt(m["after"]),
                     fmt(m["diff"]), "higher", verdict(m["diff"], "higher")])
    return table(["metric", "before", "after", "after - before [95 % CI]", "better if", "claim"], rows)


# --------------------------------------------------------------------------- C: patch (seeds 001, 003)


def _patch(wd: Path, a, **kw) -> pd.DataFrame:
    from raypath.patch.api import PatchConfig, run_patch

    cfg = PatchConfig(workdir=str(wd / "patch"), run="val-patch", synth=True,
                      synth_options={"n_domains": 3, "slides_per_domain": 6, "slide_px": 1024,
                                     "cells_per_slide": 40, "seed": a.study_seed + 1},
                      model=a.model, weights=a.weights, patch_px=112, mpp=0.5, shift_px=8,
                      seeds=list(range(42, 42 + a.repeats)), max_epochs=a.patch_epochs, patience=4,
                      pseudo_epoch=320, lr=1e-3, n_boot=0, e2e_size="tiny", **kw)
    run_patch(cfg)
    run = wd / "patch" / "runs" / "val-patch"
    metrics = pd.read_csv(run / "metrics.csv")
    params = {}
    for p in glob.glob(str(run / "fits" / "*.json")):
        rec = json.loads(Path(p).read_text())
        n = (rec.get("info") or {}).get("trainable_params")
        if n:
            params[rec.get("method")] = int(n)
    if "linear" in set(metrics["method"]):  # binary logistic regression on the features: a weight per dim + bias
        from raypath.fm.registry import get_spec

        params["linear"] = get_spec(a.model).embed_dim + 1
    return metrics.assign(trainable_params=metrics["method"].map(params))


def _paired(m: pd.DataFrame, a_sel, b_sel, metric: str) -> tuple:
    x = m[a_sel].groupby("seed")[metric].mean()
    y = m[b_sel].groupby("seed")[metric].mean()
    s = sorted(set(x.index) & set(y.index))
    return t_ci(y[s].to_numpy() - x[s].to_numpy())


def part_c(wd: Path, a) -> dict:
    metric = "balanced_accuracy"
    m1 = _patch(wd, a, methods=["linear", "lora"], protocols=["scaling", "domain"], fractions=a.fractions)
    scal = m1[(m1["protocol"] == "scaling") & (m1["test_on"] == "all")]
    dom = m1[(m1["protocol"] == "domain") & (m1["test_on"] != "all")]
    c2 = {"scaling": [], "domain": []}
    for f in a.fractions:
        at = np.isclose(scal["fraction"], f)
        lin, lora = scal[at & (scal["method"] == "linear")], scal[at & (scal["method"] == "lora")]
        c2["scaling"].append({"fraction": f, "linear": t_ci(lin.groupby("seed")[metric].mean().to_numpy()),
                              "lora": t_ci(lora.groupby("seed")[metric].mean().to_numpy()),
                              "diff": _paired(scal, at & (scal["method"] == "linear"),
                                              at & (scal["method"] == "lora"), metric)})
    lo = scal[scal["method"] == "lora"].pivot_table(index="seed", columns="fraction", values=metric)
    c2["lora_ratio_10_of_100"] = t_ci((lo[0.1] / lo[1.0]).to_numpy()) if {0.1, 1.0} <= set(lo.columns) else None
    for where, sel in (("in-domain", dom["in_domain"]), ("cross-domain", ~dom["in_domain"])):
        c2["domain"].append({"where": where, **{meth: t_ci(dom[sel & (dom["method"] == meth)]
                                                           .groupby("seed")[metric].mean().to_numpy())
                                                for meth in ("linear", "lora")},
                             "diff": _paired(dom, sel & (dom["method"] == "linear"),
                                             sel & (dom["method"] == "lora"), metric)})
    m2 = _patch(wd, a, methods=a.compare_methods, protocols=["scaling"], fractions=[1.0])
    full = m2[(m2["protocol"] == "scaling") & (m2["test_on"] == "all")]
    c4 = []
    for meth in a.compare_methods:
        s = full[full["method"] == meth]
        c4.append({"method": meth, metric: t_ci(s.groupby("seed")[metric].mean().to_numpy()),
                   "auroc": t_ci(s.groupby("seed")["auroc"].mean().to_numpy()),
                   "vs_full": _paired(full, full["method"] == "full", full["method"] == meth, metric)
                   if meth != "full" and "full" in a.compare_methods else None,
                   "trainable_params": None if s["trainable_params"].isna().all() else int(s["trainable_params"].max())})
    return {"claim2": c2, "claim4": c4, "metric": metric}


def md_c(res: dict) -> tuple[str, str]:
    c2 = res["claim2"]
    rows = [[f"{100 * r['fraction']:g} %", fmt(r["linear"]), fmt(r["lora"]), fmt(r["diff"]), verdict(r["diff"])]
            for r in c2["scaling"]]
    rows += [[r["where"] + " (domain protocol)", fmt(r["linear"]), fmt(r["lora"]), fmt(r["diff"]), verdict(r["diff"])]
             for r in c2["domain"]]
    t2 = table(["training labels / test", "linear probe", "LoRA", "LoRA - probe [95 % CI]", "LoRA better"], rows)
    if c2.get("lora_ratio_10_of_100"):
        r = c2["lora_ratio_10_of_100"]
        t2 += f"\n\nLoRA with 10 % of the labels / LoRA with 100 %: {fmt(r)} (paper: ~0.98)."
    full = next((r for r in res["claim4"] if r["method"] == "full"), None)
    rows = []
    for r in res["claim4"]:
        share = (f"{100 * r['trainable_params'] / full['trainable_params']:.2f} %"
                 if r["trainable_params"] and full and full["trainable_params"] else "n/a")
        rows.append([r["method"], fmt(r["balanced_accuracy"]), fmt(r["auroc"]),
                     fmt(r["vs_full"]) if r["vs_full"] else "", r["trainable_params"] or "n/a", share])
    t4 = table(["method", "balanced accuracy", "AUROC", "- full FT [95 % CI]", "trainable params", "of full FT"], rows)
    return t2, t4


# --------------------------------------------------------------------------- D: robustness losses (seed 002)


def part_d(wd: Path, a, features: str) -> dict:
    arms = {"off": {}, "on": {"lambda_emb": 0.5, "lambda_score": 1.0, "score_loss": "abs", "tau": 0.1}}
    folds = pd.concat([run_arm(wd, features, f"val-{n}", a.repeats, a.mil_epochs, 5e-4, seed=100,
                               variant_source="pairs", **kw) for n, kw in arms.items()], ignore_index=True)
    return {"rows": compare_arms(folds, "val-off", "val-on")}


def md_d(res: dict) -> str:
    rows = [[r["label"], fmt(r["off"]), fmt(r["on"]), fmt(r["diff"]), r["better"], verdict(r["diff"], r["better"])]
            for r in res["rows"]]
    return table(["metric (LODO external, per repeat)", "loss off", "loss on", "on - off [95 % CI]", "better",
                  "claim"], rows)


# --------------------------------------------------------------------------- main


def write_docs(md: str) -> None:
    path = ROOT / "docs" / "VALIDATION.md"
    text = path.read_text() if path.exists() else f"# Validation\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{md}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/raypath-validation")
    ap.add_argument("--model", default="raypath-small-ref")
    ap.add_argument("--weights", default=None, help="weights of --model (default: its bundled/registered ones)")
    ap.add_argument("--contrast", nargs="*", default=["raypath-small=random:0"],
                    help="MODEL=WEIGHTS feature extractors probed next to --model in part A")
    ap.add_argument("--parts", default="ABCD")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--study-seed", type=int, default=2000)
    ap.add_argument("--slides-per-cohort", type=int, default=12)
    ap.add_argument("--slide-px", type=int, default=2048)
    ap.add_argument("--adapt-epochs", type=int, default=10)
    ap.add_argument("--adapt-lr", type=float, default=5e-3, help="DINO peak lr at a batch of 256 (x 32/256 here)")
    ap.add_argument("--mil-epochs", type=int, default=20)
    ap.add_argument("--patch-epochs", type=int, default=6)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--compare-methods", nargs="+", default=["linear", "lora", "dora", "full", "pathotune"])
    ap.add_argument("--write-docs", action="store_true", help="replace the generated block of docs/VALIDATION.md")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "validation.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    # a part run again replaces its own results; the other parts' are kept from the last run
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.setdefault("seconds", {}), doc.setdefault("args", {})
    if not set(doc["args"]) <= set("ABCD"):  # a file of one earlier all-parts run: its args served every part
        doc["args"] = {p: doc["args"] for p in "ABCD" if p in doc}
    doc["seconds"].pop("total", None)
    prepare(wd, a)
    features = {a.model: embed_features(wd, a.model, a.weights)}
    for part in a.parts:
        t = time.perf_counter()
        if part == "A":
            for c in a.contrast:
                m, w = c.split("=", 1)
                features[f"{m} ({w})"] = embed_features(wd, m, w)
            doc["A"] = part_a(wd, a, features)
        elif part == "B":
            doc["B"] = part_b(wd, a)
        elif part == "C":
            doc["C"] = part_c(wd, a)
        elif part == "D":
            doc["D"] = part_d(wd, a, features[a.model])
        args = {**vars(a), "out": os.path.relpath(a.out, ROOT) if a.out.startswith(str(ROOT)) else a.out}
        doc["seconds"][part], doc["args"][part] = time.perf_counter() - t, args
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=float))
    text = markdown(doc)
    out.with_suffix(".md").write_text(text + "\n")
    if a.write_docs:
        write_docs(text)
    print(text)
    print(f"\nwrote {out}")
    return 0


def markdown(doc: dict) -> str:
    """The tables of every part in ``doc``, in order, with each part's wall time."""
    md = []
    if "A" in doc:
        md += ["### A. What the reference model's features carry", md_a(doc["A"])]
    if "B" in doc:
        md += ["### B. DoRA + heavy augmentation, before vs after (seed 000)", md_b(doc["B"])]
    if "C" in doc:
        t2, t4 = md_c(doc["C"])
        md += ["### C1. LoRA vs linear probe across label fractions and domains (seed 001)", t2,
               "### C2. PathoTune vs LoRA / DoRA / probe / full fine-tuning (seed 003)", t4]
    if "D" in doc:
        md += ["### D. Robustness losses off vs on (seed 002)", md_d(doc["D"])]
    secs = doc.get("seconds", {})
    md += ["Wall time per part (2-core CPU, this machine shared with other work): "
           + ", ".join(f"{k} {v / 60:.1f} min" for k, v in sorted(secs.items())) + "."]
    return "\n\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
