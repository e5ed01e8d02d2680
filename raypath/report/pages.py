"""``raypath report``: self-contained HTML pages for runs, comparisons and a workdir.

A page inlines every image as base64 and carries its own CSS, so it opens
from a mail attachment or an S3 console download with no other file.

- :func:`render_run` — one ``runs/<run>/`` folder of any stage: the
  robustness headline (``robustness.json``), a before/after comparison
  (``comparison.json`` with ``a/`` and ``b/``), or any other stage's
  ``metrics.json``/JSON files, plus every PNG found and the saved
  ``config.yaml``, so each number sits next to the settings that made it.
- :func:`render_side_by_side` — two run folders next to each other.
- :func:`render_index` — a workdir: one line per run/sweep with its headline,
  linking to each run's ``report.html``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import logging
import os
import posixpath
from typing import Any, Iterable

from raypath.errors import RaypathError
from raypath.evaluation.meanings import METRICS
from raypath.io.storage import S3Options, atomic_write_bytes, filesystem_for, is_remote, join, strip_protocol

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"

#: One sentence per metric: (label, how to read it, direction) -- from the one table.
METRIC_HELP: dict[str, tuple[str, str, str | None]] = {k: (m.label, m.help, m.better) for k, m in METRICS.items()}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#1a7f37;font-weight:600}.worse{color:#b42318}
figure{display:inline-block;margin:6px 10px 14px 0;vertical-align:top}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555}.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.grid img{max-width:100%}pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:480px}
.muted{color:#777;font-size:12px}
"""


# --------------------------------------------------------------------------- file access


class _Folder:
    """Read-only view of a local or remote folder."""

    def __init__(self, uri: str, s3: S3Options | None = None):
        self.uri = str(uri).rstrip("/")
        self.fs = filesystem_for(self.uri, s3)
        self.path = self.uri if is_remote(self.uri) else strip_protocol(self.uri)

    def _p(self, rel: str) -> str:
        return posixpath.join(self.path, rel) if rel else self.path

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._p(rel))

    def isdir(self, rel: str = "") -> bool:
        return self.fs.isdir(self._p(rel))

    def read(self, rel: str) -> bytes:
        with self.fs.open(self._p(rel), "rb") as f:
            return f.read()

    def json(self, rel: str) -> Any:
        return json.loads(self.read(rel).decode())

    def files(self, max_depth: int = 3) -> list[str]:
        """Relative paths (``/``-separated) of files below the folder, sorted."""
        if not self.exists():
            return []
        # fsspec returns absolute local paths and protocol-less remote keys
        base = strip_protocol(self.uri) if is_remote(self.uri) else os.path.abspath(self.path)
        base = base.replace(os.sep, "/").rstrip("/")
        out = []
        for p in self.fs.find(self.path, maxdepth=max_depth):
            p = str(p).replace(os.sep, "/")
            if p.startswith(base + "/"):
                out.append(p[len(base) + 1 :])
        return sorted(out)

    def subdirs(self, rel: str) -> list[str]:
        if not self.exists(rel):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(rel), detail=False)
                      if self.fs.isdir(p))


# --------------------------------------------------------------------------- HTML pieces


def _e(v: Any) -> str:
    return html.escape(str(v))


def _fmt(v: Any) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v)


def _img(data: bytes, caption: str) -> str:
    b64 = base64.b64encode(data).decode()
    return (f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _page(title: str, body: Iterable[str]) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class='muted'>raypath report, written {now}</p>"
            + "".join(body) + "</body></html>")


def _flatten(d: Any, prefix: str = "", out: dict | None = None, max_list: int = 12) -> dict:
    """Dotted keys of the scalar leaves (short lists of scalars kept as text)."""
    out = {} if out is None else out
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, max_list)
    elif isinstance(d, list):
        if len(d) <= max_list and all(not isinstance(v, (dict, list)) for v in d):
            out[prefix] = ", ".join(_fmt(v) if not isinstance(v, str) else v for v in d)
    else:
        out[prefix] = d
    return out


def _scalar_table(d: dict, skip_prefixes: tuple[str, ...] = (), max_rows: int = 300) -> str:
    flat = [(k, v) for k, v in _flatten(d).items() if not k.startswith(skip_prefixes)]
    rows = [f"<tr><th>{_e(k)}</th><td class='num'>{_fmt(v) if not isinstance(v, str) else _e(v)}</td></tr>"
            for k, v in flat[:max_rows]]
    if len(flat) > max_rows:
        rows.append(f"<tr><td colspan=2 class='muted'>{len(flat) - max_rows} more values in the raw JSON below</td></tr>")
    out = "<table>" + "".join(rows) + "</table>" if rows else ""
    # lists of records (e.g. per-fold metrics) as tables with one column per field
    for key, val in (d.items() if isinstance(d, dict) else []):
        if isinstance(val, list) and val and all(isinstance(r, dict) for r in val):
            out += f"<h3>{_e(key)}</h3>" + _records_table(val, max_rows)
    return out or "<p class='muted'>(no scalar values)</p>"


def _records_table(records: list[dict], max_rows: int = 300) -> str:
    flat = [_flatten(r) for r in records]
    cols = list(dict.fromkeys(k for r in flat for k in r))
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
    body = ["<tr>" + "".join(
        f"<td class='num'>{_fmt(r.get(c)) if not isinstance(r.get(c), str) else _e(r.get(c))}</td>" for c in cols)
        + "</tr>" for r in flat[:max_rows]]
    more = (f"<tr><td colspan={len(cols)} class='muted'>{len(flat) - max_rows} more rows in the raw JSON</td></tr>"
            if len(flat) > max_rows else "")
    return "<table>" + head + "".join(body) + more + "</table>"


def _details(summary: str, text: str) -> str:
    return f"<details><summary>{_e(summary)}</summary><pre>{_e(text)}</pre></details>"


def _headline_table(headline: dict) -> str:
    rows = []
    for key, value in headline.items():
        label, help_, direction = METRIC_HELP.get(key, (key, "", None))
        arrow = {"lower": "lower = more robust", "higher": "higher = more robust"}.get(direction, "")
        rows.append(f"<tr><th>{_e(label)}</th><td class='num'>{_fmt(value)}</td>"
                    f"<td>{_e(arrow)}</td><td class='muted'>{_e(help_)}</td></tr>")
    return ("<table><tr><th>metric</th><th>value</th><th>direction</th><th>meaning</th></tr>"
            + "".join(rows) + "</table>")


def _inputs_table(doc: dict) -> str:
    inputs = dict(doc.get("inputs", {}))
    return _scalar_table(inputs)


_PLOT_ORDER = ["tsne.png", "umap.png", "purity_per_cluster.png", "ri_curve.png", "croma_hist.png", "gallery.png"]


def _sorted_pngs(names: list[str]) -> list[str]:
    def key(n):
        base = n.rsplit("/", 1)[-1]
        return (_PLOT_ORDER.index(base) if base in _PLOT_ORDER else len(_PLOT_ORDER), n)

    return sorted(names, key=key)


# --------------------------------------------------------------------------- pages


def _robustness_section(doc: dict) -> list[str]:
    parts = ["<h2>Robustness headline</h2>", _headline_table(doc.get("headline", {}))]
    skipped = {k: v["skipped"] for k, v in doc.get("metrics", {}).items()
               if isinstance(v, dict) and "skipped" in v}
    if skipped:
        parts.append("<p><b>Skipped:</b> " + "; ".join(f"{_e(k)}: {_e(v)}" for k, v in skipped.items()) + "</p>")
    parts += ["<h3>Inputs</h3>", _inputs_table(doc)]
    return parts


def _comparison_section(folder: _Folder, doc: dict) -> list[str]:
    la, lb = doc["labels"]["a"], doc["labels"]["b"]
    rows = []
    for key, d in doc["delta"].items():
        label, _help, direction = METRIC_HELP.get(key, (key, "", None))
        who = d.get("more_robust")
        cls_a = "better" if who == "a" else ("worse" if who == "b" else "")
        cls_b = "better" if who == "b" else ("worse" if who == "a" else "")
        rows.append(
            f"<tr><th>{_e(label)}</th><td class='num {cls_a}'>{_fmt(d['a'])}</td>"
            f"<td class='num {cls_b}'>{_fmt(d['b'])}</td><td class='num'>{_fmt(d['delta'])}</td>"
            f"<td>{_e({'lower': 'lower', 'higher': 'higher'}.get(direction, ''))}</td></tr>")
    parts = [
        f"<h2>{_e(la)} vs {_e(lb)}</h2>",
        f"<p>Same {doc.get('n_common_slides')} slides and sampling for both stores. "
        f"A: <code>{_e(doc['feature_dirs']['a'])}</code><br>B: <code>{_e(doc['feature_dirs']['b'])}</code></p>",
        f"<table><tr><th>metric</th><th>{_e(la)}</th><th>{_e(lb)}</th><th>B - A</th>"
        "<th>more robust if</th></tr>" + "".join(rows) + "</table>",
    ]
    files = folder.files()
    names = _sorted_pngs(sorted({f.split("/", 1)[1] for f in files
                                 if f.startswith(("a/", "b/")) and f.endswith(".png")}))
    if names:
        parts.append("<h2>Plots side by side</h2>")
    for name in names:
        cells = []
        for side, label in (("a", la), ("b", lb)):
            rel = f"{side}/{name}"
            cells.append(_img(folder.read(rel), f"{label}: {name}") if rel in files
                         else f"<p class='muted'>{_e(label)}: no {_e(name)}</p>")
        parts.append("<div class='grid'>" + "".join(f"<div>{c}</div>" for c in cells) + "</div>")
    return parts


def render_run(run_dir: str, s3: S3Options | None = None) -> str:
    """HTML of one run folder (any stage).  Raises if the folder holds nothing to show."""
    folder = _Folder(run_dir, s3)
    if not folder.exists():
        raise RaypathError(f"run folder {run_dir!r} not found: pass a runs/<run> folder or the workdir")
    files = folder.files()
    name = folder.uri.rsplit("/", 1)[-1]
    body: list[str] = []
    shown_png: set[str] = set()
    json_files = [f for f in files if f.endswith(".json")]
    if "comparison.json" in files:
        doc = folder.json("comparison.json")
        body += _comparison_section(folder, doc)
        shown_png |= {f for f in files if f.startswith(("a/", "b/"))}
        json_files = ["comparison.json"]
    elif "robustness.json" in files:
        body += _robustness_section(folder.json("robustness.json"))
    for jf in json_files:
        if jf in ("robustness.json",) and "comparison.json" not in files:
            continue
        try:
            doc = folder.json(jf)
        except (ValueError, UnicodeDecodeError):
            continue
        if jf != "comparison.json":
            body += [f"<h2>{_e(jf)}</h2>", _scalar_table(doc) if isinstance(doc, dict) else ""]
    pngs = _sorted_pngs([f for f in files if f.endswith(".png") and f not in shown_png])
    if pngs:
        body.append("<h2>Plots</h2>")
        body += [_img(folder.read(p), p) for p in pngs]
    if not body:
        raise RaypathError(f"{run_dir!r} holds no JSON results or PNG plots: run a stage into it first")
    body.append("<h2>Provenance</h2>")
    if "config.yaml" in files:
        body.append(_details("config.yaml (resolved settings)", folder.read("config.yaml").decode()))
    for jf in [f for f in files if f.endswith(".json")]:
        try:  # Ray Tune keeps pickled state under .json names: not provenance a person reads
            text = folder.read(jf).decode()
        except UnicodeDecodeError:
            continue
        body.append(_details(jf, text))
    return _page(f"raypath run: {name}", body)


def render_side_by_side(run_a: str, run_b: str, s3: S3Options | None = None,
                        label_a: str | None = None, label_b: str | None = None) -> str:
    """HTML with two run folders next to each other: headlines, then matching plots."""
    fa, fb = _Folder(run_a, s3), _Folder(run_b, s3)
    for f, u in ((fa, run_a), (fb, run_b)):
        if not f.exists():
            raise RaypathError(f"run folder {u!r} not found")
    la = label_a or fa.uri.rsplit("/", 1)[-1]
    lb = label_b or fb.uri.rsplit("/", 1)[-1]
    heads = []
    for f in (fa, fb):
        files = f.files()
        if "robustness.json" in files:
            heads.append(f.json("robustness.json").get("headline", {}))
        elif "metrics.json" in files:
            heads.append(_flatten(f.json("metrics.json")))
        else:
            heads.append({})
    keys = list(dict.fromkeys(list(heads[0]) + list(heads[1])))
    rows = []
    for k in keys:
        va, vb = heads[0].get(k), heads[1].get(k)
        label, _h, direction = METRIC_HELP.get(k, (k, "", None))
        cls_a = cls_b = ""
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and direction and va != vb:
            b_better = (vb < va) == (direction == "lower")
            cls_a, cls_b = ("worse", "better") if b_better else ("better", "worse")
        d = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        rows.append(f"<tr><th>{_e(label)}</th><td class='num {cls_a}'>{_fmt(va)}</td>"
                    f"<td class='num {cls_b}'>{_fmt(vb)}</td><td class='num'>{_fmt(d)}</td></tr>")
    body = [f"<h2>{_e(la)} vs {_e(lb)}</h2>",
            f"<p>A: <code>{_e(fa.uri)}</code><br>B: <code>{_e(fb.uri)}</code></p>",
            f"<table><tr><th>metric</th><th>{_e(la)}</th><th>{_e(lb)}</th><th>B - A</th></tr>"
            + "".join(rows) + "</table>"]
    pa = {p for p in fa.files() if p.endswith(".png")}
    pb = {p for p in fb.files() if p.endswith(".png")}
    for name in _sorted_pngs(sorted(pa | pb)):
        cells = [(_img(f.read(name), f"{lab}: {name}") if name in have else
                  f"<p class='muted'>{_e(lab)}: no {_e(name)}</p>")
                 for f, have, lab in ((fa, pa, la), (fb, pb, lb))]
        body.append("<div class='grid'>" + "".join(f"<div>{c}</div>" for c in cells) + "</div>")
    return _page(f"raypath comparison: {la} vs {lb}", body)


def _mil_line(doc: dict) -> str | None:
    """One line for a MIL run: held-out scores per cohort (lodo/pairwise) or the CV score."""
    s = doc.get("summary") or {}
    metric = s.get("metric", "score")
    head = f"{_e(doc.get('task', ''))}, {_e(doc.get('protocol', ''))}, {doc.get('n_slides', '?')} slides: "
    per = ", ".join(f"{_e(c)} {_fmt(v)}" for c, v in (s.get("per_cohort") or {}).items())
    if doc.get("protocol") == "internal":
        cv = s.get("internal") or {}
        if cv.get("mean") is None:
            return None
        by = f"; by cohort {per}" if per else ""
        return head + f"{_e(metric)} {_fmt(cv['mean'])} &plusmn; {_fmt(cv.get('sd'))} (n={cv.get('n')}){by}"
    if not per:
        return None
    tail = f"; mean {_fmt(s.get('mean'))}, worst {_fmt(s.get('worst'))}" if s.get("mean") is not None else ""
    return head + f"held-out {_e(metric)} {per}{tail}"


def _run_summary(folder: _Folder, rel: str, s3: S3Options | None = None) -> str:
    sub = _Folder(join(folder.uri, rel), s3)
    try:
        names = set(sub.files(max_depth=1))
        if "comparison.json" in names:
            doc = sub.json("comparison.json")
            bits = [f"{METRIC_HELP.get(k, (k,))[0]}: {_fmt(d['a'])} &rarr; {_fmt(d['b'])}"
                    for k, d in doc["delta"].items()
                    if k in ("site_probe_balanced_accuracy", "kmeans_purity", "robustness_index")]
            return f"{_e(doc['labels']['a'])} vs {_e(doc['labels']['b'])}: " + "; ".join(bits)
        if "robustness.json" in names:
            h = sub.json("robustness.json").get("headline", {})
            return "; ".join(f"{METRIC_HELP[k][0]} {_fmt(h.get(k))}"
                             for k in ("site_probe_balanced_accuracy", "kmeans_purity", "robustness_index",
                                       "croma_median"))
        if "metrics.json" in names:
            doc = sub.json("metrics.json")
            line = _mil_line(doc) if isinstance(doc, dict) and "protocol" in doc else None
            if line:
                return line
        for jf in ("metrics.json", "best.json", "summary.json"):
            if jf in names:
                flat = _flatten(sub.json(jf))
                items = [(k, v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
                return "; ".join(f"{_e(k)} {_fmt(v)}" for k, v in items[:6])
    except Exception as e:  # a broken run never breaks the index
        return f"<span class='worse'>unreadable: {_e(e)}</span>"
    return "<span class='muted'>no results yet</span>"


def render_index(workdir: str, s3: S3Options | None = None) -> str:
    """HTML of a workdir: every run and sweep with its headline and a link to its report."""
    folder = _Folder(workdir, s3)
    if not folder.exists():
        raise RaypathError(f"workdir {workdir!r} not found")
    body = []
    for kind in ("runs", "sweeps"):
        names = folder.subdirs(kind)
        if not names:
            continue
        rows = []
        for n in names:
            link = f"{kind}/{n}/{REPORT_FILE}"
            rows.append(f"<tr><th><a href='{_e(link)}'>{_e(n)}</a></th><td>{_run_summary(folder, f'{kind}/{n}', s3)}</td></tr>")
        body += [f"<h2>{kind}</h2><table>", *rows, "</table>"]
    if not body:
        body.append("<p>No runs yet: run a stage (e.g. <code>raypath robustness</code>) first.</p>")
    files = set(folder.files(max_depth=1))
    extras = [f for f in ("cohort.csv", "slides.parquet", "tiles.parquet", "tiling_summary.parquet")
              if f in files or (f == "tiles.parquet" and folder.exists(f))]  # tiles.parquet/: a dataset directory
    if extras:
        body.append("<h2>Project files</h2><p>" + ", ".join(f"<code>{_e(f)}</code>" for f in extras) + "</p>")
    return _page(f"raypath project: {folder.uri}", body)


# --------------------------------------------------------------------------- writers


def write_run_report(run_dir: str, s3: S3Options | None = None) -> str:
    """Write ``<run_dir>/report.html``; returns its URI."""
    uri = join(run_dir, REPORT_FILE)
    atomic_write_bytes(uri, render_run(run_dir, s3).encode(), s3)
    return uri


def write_index_report(workdir: str, s3: S3Options | None = None) -> list[str]:
    """Write a report for every run/sweep folder and ``<workdir>/report.html``; returns the URIs."""
    folder = _Folder(workdir, s3)
    written = []
    for kind in ("runs", "sweeps"):
        for n in folder.subdirs(kind):
            try:
                written.append(write_run_report(join(workdir, kind, n), s3))
            except RaypathError as e:
                log.info("skipping %s/%s: %s", kind, n, e)
    uri = join(workdir, REPORT_FILE)
    atomic_write_bytes(uri, render_index(workdir, s3).encode(), s3)
    return [uri] + written


def write_workdir_report(workdir: str, s3: S3Options | None = None) -> str:
    """Reports for every run/sweep plus the index page; returns the index URI (``<workdir>/report.html``)."""
    return write_index_report(workdir, s3)[0]


def report(path: str, compare_to: str | None = None, out: str | None = None,
           s3: S3Options | None = None) -> list[str]:
    """Python entry of ``raypath report``: a workdir, a run folder, or two run folders.

    Returns the URIs of the HTML files written (the main page first).
    """
    folder = _Folder(path, s3)
    if not folder.exists():
        raise RaypathError(f"{path!r} not found: pass a workdir or a runs/<run> folder")
    if compare_to:
        name_b = str(compare_to).rstrip("/").rsplit("/", 1)[-1]
        uri = out or join(path, f"report_vs_{name_b}.html")
        atomic_write_bytes(uri, render_side_by_side(path, compare_to, s3).encode(), s3)
        return [uri]
    if folder.isdir("runs") or folder.isdir("sweeps"):
        uris = write_index_report(path, s3)
        return uris
    uri = out or join(path, REPORT_FILE)
    atomic_write_bytes(uri, render_run(path, s3).encode(), s3)
    return [uri]


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="self-contained HTML report of a run, a comparison, or a whole workdir",
        description=(
            "Write a self-contained HTML page (images inlined, no external assets). PATH is "
            "a run folder (runs/<run>: robustness, comparison, MIL or any stage with JSON/PNG "
            "outputs) or a workdir (an index of all runs and sweeps plus one report per run). "
            "With --compare, two run folders side by side."
        ),
    )
    p.add_argument("path", help="run folder (workdir/runs/<run>) or workdir")
    p.add_argument("--compare", metavar="RUN_DIR", help="second run folder shown side by side")
    p.add_argument("--out", help="output HTML file (default: report.html in PATH)")
    p.add_argument("--json", action="store_true", help="print the written files as JSON")

    def _main(args: argparse.Namespace) -> int:
        uris = report(args.path, args.compare, args.out)
        print(json.dumps({"written": uris}) if args.json else "\n".join(f"wrote {u}" for u in uris))
        return 0

    p.set_defaults(func=_main)
