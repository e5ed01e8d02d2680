"""``raypath report``: self-contained HTML pages for runs, comparisons and a workdir.

A page inlines every image as base64 and carries its own CSS, so it opens
from a mail attachment or an S3 console download with no other file.  Each
page leads with the answer (a sentence and the headline table), then the
plots, then the detail; settings and raw JSON come last, folded.

- :func:`render_run` -- one folder: a MIL run, a robustness run or a
  before/after comparison, an adaptation experiment, an adapter, a sweep, or
  any other stage's JSON and PNG outputs.
- :func:`render_side_by_side` -- two run folders next to each other.
- :func:`render_index` -- a workdir: the study card, the LODO table,
  robustness with chance levels, QC thumbnails and a link to every run.

The pages are Jinja2 templates (``raypath/report/templates/``) filled by one
small module per kind of page (:mod:`~raypath.report.mil`,
:mod:`~raypath.report.robustness`, :mod:`~raypath.report.sweep`,
:mod:`~raypath.report.experiment`, :mod:`~raypath.report.index`).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Callable

import yaml

from raypath.errors import RaypathError
from raypath.evaluation.meanings import METRICS
from raypath.io.storage import S3Options, atomic_write_bytes, join, redact
from raypath.report import experiment as E
from raypath.report import index as I
from raypath.report import mil as M
from raypath.report import robustness as R
from raypath.report import sweep as S
from raypath.report.folder import Folder
from raypath.report.html import data_uri, is_number, pretty_json, render

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"

#: One sentence per metric: (label, how to read it, direction) -- from the one table.
METRIC_HELP: dict[str, tuple[str, str, str | None]] = {k: (m.label, m.help, m.better) for k, m in METRICS.items()}

#: folders of machinery, never shown on a page (Ray Tune state, checkpoints, Ray Train runs)
INTERNAL_DIRS = ("tune/", "checkpoints/", "ray/", "trials/")

ROBUSTNESS_PLOTS = {
    "tsne.png": "t-SNE of tiles, coloured by cohort and by biology: cohorts in separate islands = site signal",
    "umap.png": "UMAP of tiles, coloured by cohort and by biology",
    "purity_per_cluster.png": "KMeans clusters sorted by their largest cohort's share; dashed = chance purity",
    "ri_curve.png": "Robustness index over the neighbourhood size k; dashed = RI of random neighbours",
    "croma_hist.png": "CRoMa per tile: < 0 where a same-centre tile of other biology is nearer than the biological match",
    "gallery.png": "Tiles of the purest clusters",
}
SWEEP_PLOTS = {
    "pareto_front.png": "Pareto front of the objectives (every complete trial; the front highlighted)",
    "objective_per_trial.png": "Objectives per trial, in trial order",
}


# --------------------------------------------------------------------------- shared pieces


def _visible(files: list[str]) -> list[str]:
    return [f for f in files if not f.startswith(INTERNAL_DIRS) and "/tune/" not in f]


def _plots(folder: Folder, files: list[str], captions: dict[str, str] | None = None,
           exclude: set[str] | frozenset = frozenset()) -> list[tuple[str, str]]:
    """(data URI, caption) of the PNGs: the captioned ones first, in caption order."""
    captions = captions or {}
    pngs = [f for f in _visible(files) if f.endswith(".png") and f not in exclude]
    order = {name: i for i, name in enumerate(captions)}
    pngs.sort(key=lambda f: (order.get(f, len(order)), f))
    return [(data_uri(folder.read(f)), captions.get(f, f)) for f in pngs]


def _raws(folder: Folder, files: list[str], skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(name, text) of the config and the JSON results, folded at the end of a page."""
    out = []
    for f in ["config.yaml", "space.yaml"] + [f for f in _visible(files) if f.endswith(".json")]:
        if f not in files or f.startswith(skip):
            continue
        text = folder.text(f)
        if text is None:  # a pickle under a .json name
            continue
        try:  # secrets masked again here, whoever wrote the file
            if f.endswith(".json"):
                text = pretty_json(redact(json.loads(text)))
            else:
                text = yaml.safe_dump(redact(yaml.safe_load(text)), sort_keys=False)
        except (ValueError, yaml.YAMLError):
            pass
        out.append((f"{f} (resolved settings)" if f == "config.yaml" else f, text))
    return out


def _config(folder: Folder) -> dict[str, Any]:
    text = folder.text("config.yaml") if folder.exists("config.yaml") else None
    try:
        doc = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        return {}
    doc = doc if isinstance(doc, dict) else {}
    return redact(doc.get("config", doc)) if isinstance(doc.get("config", doc), dict) else {}


def _nav(folder: Folder, linked: set[str] | None) -> dict[str, Any]:
    """Relative links from a page in ``<workdir>/<kind>/<name>/`` to the index and its siblings."""
    parts = folder.uri.rsplit("/", 2)
    workdir = Folder(parts[0], folder.s3) if len(parts) == 3 and parts[1] in I.KINDS else None

    def href_ok(rel: str) -> bool:
        if workdir is None:
            return False
        return (linked is not None and rel in linked) or workdir.exists(f"{rel}/{REPORT_FILE}")

    index_ok = workdir is not None and (linked is not None or workdir.exists(REPORT_FILE))
    return {"index_href": f"../../{REPORT_FILE}" if index_ok else None, "href_ok": href_ok, "rel_prefix": "../../"}


# --------------------------------------------------------------------------- one page per kind


def _mil_page(folder: Folder, doc: dict, files: list[str], nav: dict) -> str:
    cfg = _config(folder)
    keys = ("features", "model", "loss", "epochs", "lr", "weight_decay", "batch_size", "max_tiles_per_slide",
            "repeats", "folds", "internal_fraction", "seed", "num_workers")
    settings = {k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}
    ctx = M.context(folder, doc, settings)
    return render("mil.html.j2", **ctx, **nav, plots=_plots(folder, files, M.PLOT_CAPTIONS),
                  raws=_raws(folder, files))


def _robustness_page(folder: Folder, doc: dict, files: list[str], nav: dict) -> str:
    head = doc.get("headline", {})
    return render("robustness.html.j2", **nav, title=f"Robustness run {folder.name}",
                  subtitle=f"feature store {doc.get('inputs', {}).get('feature_dir', '?')}",
                  verdict=R.verdict(head), short_rows=R.metric_rows(doc, R.SHORT), rows=R.metric_rows(doc),
                  skipped=R.skipped(doc), inputs=R.inputs(doc),
                  plots=_plots(folder, files, ROBUSTNESS_PLOTS), raws=_raws(folder, files))


def _comparison_page(folder: Folder, doc: dict, files: list[str], nav: dict) -> str:
    la, lb = doc["labels"]["a"], doc["labels"]["b"]
    names = sorted({f.split("/", 1)[1] for f in files if f.startswith(("a/", "b/")) and f.endswith(".png")},
                   key=lambda n: (list(ROBUSTNESS_PLOTS).index(n) if n in ROBUSTNESS_PLOTS else 99, n))
    pairs = [(n, *[data_uri(folder.read(f"{s}/{n}")) if f"{s}/{n}" in files else None for s in ("a", "b")])
             for n in names]
    raws = _raws(folder, files, skip=("a/", "b/"))
    return render("comparison.html.j2", **nav, title=f"Robustness comparison {folder.name}: {la} vs {lb}",
                  verdict=R.comparison_verdict(doc), rows=R.comparison_rows(doc), label_a=la, label_b=lb,
                  dir_a=doc.get("feature_dirs", {}).get("a"), dir_b=doc.get("feature_dirs", {}).get("b"),
                  pairs=pairs, raws=raws)


def _sweep_page(folder: Folder, doc: dict | None, files: list[str], nav: dict) -> str:
    ctx = S.context(folder, doc or {})
    imp_png = {"param_importances.png"}
    plots = _plots(folder, files, SWEEP_PLOTS, exclude=imp_png)
    if len(ctx["objectives"]) < 2:
        plots = [p for p in plots if not p[1].startswith("Pareto")]
    imp_plots = _plots(folder, [f for f in files if f in imp_png], {"param_importances.png": "importances"}) \
        if ctx["importance"]["show"] else []
    return render("sweep.html.j2", **ctx, **nav, plots=plots, importance_plots=imp_plots,
                  raws=_raws(folder, files, skip=("best/",)))


def _experiment_page(folder: Folder, doc: dict, files: list[str], nav: dict) -> str:
    ctx = E.experiment_context(folder, doc)
    return render("experiment.html.j2", **ctx, **nav, raws=_raws(folder, files))


def _adapter_page(folder: Folder, doc: dict | None, files: list[str], nav: dict) -> str:
    ctx = E.adapter_context(folder)
    return render("adapter.html.j2", **ctx, **nav, plots=_plots(folder, files), raws=_raws(folder, files))


def _flatten(d: Any, prefix: str = "", out: dict | None = None, max_list: int = 12) -> dict:
    """Dotted keys of the scalar leaves (short lists of scalars kept as text)."""
    out = {} if out is None else out
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, max_list)
    elif isinstance(d, list):
        if len(d) <= max_list and all(not isinstance(v, (dict, list)) for v in d):
            out[prefix] = ", ".join(str(v) for v in d)
    else:
        out[prefix] = d
    return out


def _generic_page(folder: Folder, doc: Any, files: list[str], nav: dict) -> str:
    """Any other stage: its scalar results, tables of records, plots and raw JSON."""
    scalar_tables, record_tables = [], []
    for jf in [f for f in _visible(files) if f.endswith(".json")]:
        parsed = folder.text(jf)
        try:
            d = json.loads(parsed) if parsed is not None else None
        except ValueError:
            d = None
        if not isinstance(d, dict):
            continue
        scalar_tables.append((jf, list(_flatten(d).items())))
        for key, val in d.items():
            if isinstance(val, list) and val and all(isinstance(r, dict) for r in val):
                rows = [_flatten(r) for r in val]
                record_tables.append((f"{jf}: {key}", rows, list(dict.fromkeys(k for r in rows for k in r))))
    plots = _plots(folder, files)
    if not scalar_tables and not plots:
        raise RaypathError(f"{folder.uri!r} holds no JSON results or PNG plots: run a stage into it first")
    head = [(k, v) for k, v in (scalar_tables[0][1] if scalar_tables else []) if is_number(v)][:12]
    stage = _config_stage(folder)
    verdict = (f"Outputs of {stage or 'a run'}: {len(scalar_tables)} result file(s), {len(plots)} plot(s)."
               + (f"  First numbers of {scalar_tables[0][0]}:" if head else ""))
    return render("generic.html.j2", **nav, title=f"Run {folder.name}", verdict=verdict, head=head,
                  scalar_tables=scalar_tables, record_tables=record_tables, plots=plots, raws=_raws(folder, files))


def _config_stage(folder: Folder) -> str | None:
    text = folder.text("config.yaml") if folder.exists("config.yaml") else None
    try:
        doc = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return None
    return doc.get("stage") if isinstance(doc, dict) else None


_PAGES: dict[str, Callable[..., str]] = {
    "mil": _mil_page, "robustness": _robustness_page, "comparison": _comparison_page, "sweep": _sweep_page,
    "experiment": _experiment_page, "adapter": _adapter_page,
}


def render_run(run_dir: str, s3: S3Options | None = None, linked: set[str] | None = None) -> str:
    """HTML of one run folder (any stage).  Raises if the folder holds nothing to show.

    ``linked`` names the ``<kind>/<name>`` folders whose pages are being written
    in the same pass (so links to them are not broken).
    """
    folder = Folder(run_dir, s3)
    if not folder.exists():
        raise RaypathError(f"run folder {run_dir!r} not found: pass a runs/<run> folder or the workdir")
    files = folder.files()
    kind, doc = I.classify(folder)
    if kind == "sweep" and not (isinstance(doc, dict) and "objectives" in doc):
        kind = "other"  # a sweep folder of another shape: shown as plain outputs
    page = _PAGES.get(kind)
    if page is None or (doc is None and kind not in ("sweep", "adapter")):
        page = _generic_page
    return page(folder, doc, files, _nav(folder, linked))


def _headline_of(folder: Folder) -> tuple[dict, dict]:
    """(headline numbers, metrics) of a run for the side-by-side page."""
    files = set(folder.files(max_depth=1))
    if "robustness.json" in files:
        doc = folder.json("robustness.json")
        return doc.get("headline", {}), doc.get("metrics", {})
    if "metrics.json" in files:
        doc = folder.json("metrics.json")
        if M.is_mil(doc):
            s = doc["summary"]
            flat = {f"{s.get('metric', 'score')} held-out {c}": v for c, v in (s.get("per_cohort") or {}).items()}
            flat.update({"mean": s.get("mean"), "worst": s.get("worst")} if "mean" in s else
                        {"internal mean": (s.get("internal") or {}).get("mean")})
            return flat, {}
        return {k: v for k, v in _flatten(doc).items() if is_number(v)}, {}
    return {}, {}


def render_side_by_side(run_a: str, run_b: str, s3: S3Options | None = None,
                        label_a: str | None = None, label_b: str | None = None) -> str:
    """HTML with two run folders next to each other: headlines, then matching plots."""
    fa, fb = Folder(run_a, s3), Folder(run_b, s3)
    for f, u in ((fa, run_a), (fb, run_b)):
        if not f.exists():
            raise RaypathError(f"run folder {u!r} not found")
    la, lb = label_a or fa.name, label_b or fb.name
    (ha, ma), (hb, mb) = _headline_of(fa), _headline_of(fb)
    delta = {}
    for k in dict.fromkeys(list(ha) + list(hb)):
        va, vb = ha.get(k), hb.get(k)
        d = vb - va if is_number(va) and is_number(vb) else None
        direction = METRICS[k].better if k in METRICS else None
        who = None if not d or not direction else ("b" if (d < 0) == (direction == "lower") else "a")
        delta[k] = {"a": va, "b": vb, "delta": d, "more_robust": who}
    doc = {"labels": {"a": la, "b": lb}, "delta": delta, "a": {"headline": ha, "metrics": ma},
           "b": {"headline": hb, "metrics": mb}, "n_common_slides": "?"}
    pa = {p for p in _visible(fa.files()) if p.endswith(".png")}
    pb = {p for p in _visible(fb.files()) if p.endswith(".png")}
    pairs = [(n, data_uri(fa.read(n)) if n in pa else None, data_uri(fb.read(n)) if n in pb else None)
             for n in sorted(pa | pb, key=lambda n: (list(ROBUSTNESS_PLOTS).index(n) if n in ROBUSTNESS_PLOTS else 99, n))]
    return render("comparison.html.j2", title=f"raypath comparison: {la} vs {lb}",
                  verdict=f"{la} ({fa.uri}) next to {lb} ({fb.uri}); each run's own slides and settings.",
                  rows=R.comparison_rows(doc), label_a=la, label_b=lb, dir_a=fa.uri, dir_b=fb.uri,
                  pairs=pairs, raws=[])


def render_index(workdir: str, s3: S3Options | None = None, linked: set[str] | None = None) -> str:
    """HTML of a workdir: the study card, LODO table, robustness, QC strip and every run."""
    folder = Folder(workdir, s3)
    if not folder.exists():
        raise RaypathError(f"workdir {workdir!r} not found")
    return render("index.html.j2", **I.context(folder, linked))


# --------------------------------------------------------------------------- writers


def write_run_report(run_dir: str, s3: S3Options | None = None, linked: set[str] | None = None) -> str:
    """Write ``<run_dir>/report.html``; returns its URI."""
    uri = join(run_dir, REPORT_FILE)
    atomic_write_bytes(uri, render_run(run_dir, s3, linked).encode(), s3)
    return uri


def write_index_report(workdir: str, s3: S3Options | None = None) -> list[str]:
    """Write a page for every run, sweep and adapter folder and ``<workdir>/report.html``; returns the URIs."""
    folder = Folder(workdir, s3)
    folders = [f"{kind}/{n}" for kind in I.KINDS for n in folder.subdirs(kind)]
    renderable = {rel for rel in folders if I.classify(folder.sub(rel))[0] != "empty"}
    written, linked = [], set()
    for rel in folders:
        try:
            if I.classify(folder.sub(rel))[0] in I.OWN_PAGE and folder.exists(f"{rel}/{REPORT_FILE}"):
                linked.add(rel)  # the patch benchmark's and predict's own pages are kept
                continue
            written.append(write_run_report(join(workdir, rel), s3, linked=renderable))
            linked.add(rel)
        except RaypathError as e:
            log.info("no page for %s: %s", rel, e)
    uri = join(workdir, REPORT_FILE)
    atomic_write_bytes(uri, render_index(workdir, s3, linked).encode(), s3)
    return [uri] + written


def write_workdir_report(workdir: str, s3: S3Options | None = None) -> str:
    """Pages for every run/sweep/adapter plus the index; returns the index URI (``<workdir>/report.html``)."""
    return write_index_report(workdir, s3)[0]


def report(path: str, compare_to: str | None = None, out: str | None = None,
           s3: S3Options | None = None) -> list[str]:
    """Python entry of ``raypath report``: a workdir, a run folder, or two run folders.

    Returns the URIs of the HTML files written (the main page first).

    Example
    -------
    >>> report("work")                                   # doctest: +SKIP
    ['work/report.html', 'work/runs/mil-lodo/report.html', ...]
    """
    folder = Folder(path, s3)
    if not folder.exists():
        raise RaypathError(f"{path!r} not found: pass a workdir (--workdir) or a run folder (--run)")
    if compare_to:
        uri = out or join(path, f"report_vs_{Folder(compare_to, s3).name}.html")
        atomic_write_bytes(uri, render_side_by_side(path, compare_to, s3).encode(), s3)
        return [uri]
    if any(folder.isdir(k) for k in I.KINDS) or folder.exists("slides.parquet"):
        return write_index_report(path, s3)
    if I.classify(folder)[0] in I.OWN_PAGE and folder.exists(REPORT_FILE) and not out:
        return [join(path, REPORT_FILE)]  # the patch benchmark and predict write their own pages
    uri = out or join(path, REPORT_FILE)
    atomic_write_bytes(uri, render_run(path, s3).encode(), s3)
    return [uri]


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="self-contained HTML report of a run, a comparison, or a whole workdir",
        description=(
            "Write self-contained HTML pages (images inlined, no external assets) that lead with the answer. "
            "With --workdir: the study index (report.html) plus one page per run, sweep and adapter. "
            "With --run: one run folder's page; add --compare-to for two run folders side by side."
        ),
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--workdir", metavar="PATH", help="project folder (local or s3://): index + every run's page "
                    "[default: none; --workdir or --run is required]")
    io.add_argument("--run", metavar="PATH", help="one run folder (<workdir>/runs/<run>, sweeps/<name>, "
                    "adapters/<run>) [default: none]")
    io.add_argument("--compare-to", dest="compare_to", metavar="PATH",
                    help="second run folder shown next to --run [default: none]")
    p.add_argument("--compare", dest="compare_to", help=argparse.SUPPRESS)  # older spelling
    io.add_argument("--out", metavar="FILE", help="output HTML file of --run (default: report.html in the run folder)")
    io.add_argument("--json", action="store_true", help="print the written files as JSON")
    p.add_argument("path", nargs="?", help=argparse.SUPPRESS)  # older spelling: `raypath report PATH`

    def _main(args: argparse.Namespace) -> int:
        target = args.run or args.workdir or args.path
        if not target:
            raise RaypathError("report needs --workdir DIR (the index and every page) or --run RUN_DIR (one page)")
        uris = report(target, args.compare_to, args.out)
        print(json.dumps({"written": uris}) if args.json else "\n".join(f"wrote {u}" for u in uris))
        return 0

    p.set_defaults(func=_main)
