"""The README's first command, in-process: the whole pipeline on a generated
study read over S3 (the session's embedded endpoint), ending in a report.

The demo runs once per module; its log (stdout, stderr at the file-descriptor
level, log records and Python warnings) is kept, and every report page is
opened in headless Chromium: no broken image or link, and the answer in the
first screen.  Under CI (``CI=true``) a missing Chromium fails the test
instead of skipping it (``scripts/bootstrap.sh`` installs it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import pytest
import yaml

#: a line that must never be in a demo log
BAD_LINE = re.compile(r"\bERROR\b|Traceback|RuntimeWarning|^\[[^\]]* E \d+ \d+\]")
SECRET = "hf_rpDemoMarkerSecret0123456789"


@contextlib.contextmanager
def demo_log(path: Path):
    """Everything the demo prints, at the fd level, plus log records and warnings, into ``path``."""
    f = open(path, "w+", buffering=1)
    handler = logging.StreamHandler(f)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    old_streams = sys.stdout, sys.stderr
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    sys.stdout = sys.stderr = f
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for w in caught:  # as Python would print them without pytest's capture
            f.write(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n")
        f.flush()
        sys.stdout, sys.stderr = old_streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        root.removeHandler(handler)
        root.setLevel(old_level)
        f.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_session, s3_server):
    from raypath.demo import DemoConfig, run_demo

    tmp = tmp_path_factory.mktemp("demo")
    bucket = s3_server.create_bucket("demo-test")
    log_path = tmp / "demo.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", SECRET)  # must reach no page, config or tracking store
        with demo_log(log_path):
            summary = run_demo(DemoConfig(workdir=str(tmp / "wd"), bucket=bucket, n_cohorts=3, slides_per_cohort=4,
                                          slide_px=1024, mil_epochs=3, mil_repeats=1, adapt_epochs=1,
                                          adapt_folds=1))
    return summary, log_path.read_text()


def test_demo_runs_end_to_end_over_s3(demo):
    summary, _ = demo
    wd = Path(summary["workdir"])
    assert summary["study_uri"].startswith("s3://demo-test/")
    slides = pd.read_parquet(wd / "slides.parquet")
    assert len(slides) == 12 + 3 and (slides["status"] == "ok").all()  # 3 cohorts x 4 + 3 technical variants (pair fraction 0.25)
    assert slides["uri"].str.startswith("s3://").all()  # the slides were read over S3
    tiles = pd.read_parquet(wd / "tiles.parquet")
    assert summary["tiles"] == len(tiles) > 0
    assert len(list((wd / "qc").glob("*.png"))) == 15
    feats = sorted(p.stem for p in Path(summary["features"]).glob("*.parquet"))
    assert feats == sorted(tiles["slide_id"].unique())
    for protocol in ("lodo", "internal"):
        metrics = json.loads((Path(summary["mil"][protocol]) / "metrics.json").read_text())
        assert metrics["protocol"] == protocol
    assert (Path(summary["robustness"]) / "robustness.json").exists()
    exp = json.loads((Path(summary["adaptation"]) / "experiment.json").read_text())  # the DoRA before/after step
    assert exp["table"] and set(exp["adapters"]) == {"c0"}
    index = Path(summary["report"]).read_text()  # the study card and LODO table, not raw JSON keys
    assert "slides ingested ok" in index and "patients" in index
    assert "held-out cohort" in index and "summary.groups" not in index
    for run in ("mil-lodo", "mil-internal", "robustness", "dora"):
        assert f"runs/{run}/report.html" in index
    assert "<img" in (wd / "runs" / "robustness" / "report.html").read_text()
    # robustness losses between the study's technical variants, beside the same run without them
    on = yaml.safe_load((Path(summary["robust_losses"]["on"]) / "config.yaml").read_text())["config"]
    assert on["lambda_emb"] > 0 and on["variant_source"] == "pairs"
    assert "runs/mil-lodo-robust/report.html" in index
    # the patch benchmark and a final model applied to a later cohort (raw slides -> predictions)
    assert (Path(summary["patch"]) / "metrics.csv").exists()
    pred = pd.read_parquet(Path(summary["predict"]) / "predictions.parquet")
    assert len(pred) >= 2 and pred["slide_id"].str.startswith("ext-").all() and not pred["trained_on"].any()
    assert list((Path(summary["predict"]) / "heatmaps").glob("*.png"))
    assert (Path(summary["final_model"]) / "model.json").exists()
    assert set(summary["step_times_s"]) >= {"synth", "ingest", "tile + QC", "report", "total"}
    assert json.loads((wd / "demo_summary.json").read_text()) == summary


def test_demo_log_is_clean(demo):
    """No ERROR, Traceback or RuntimeWarning line; progress with rate and ETA for the long steps."""
    _, log = demo
    bad = [ln for ln in log.splitlines() if BAD_LINE.search(ln)]
    assert not bad, "\n".join(bad[:10])
    for stage in ("synth", "ingest", "tile", "mil lodo"):
        assert re.search(rf"{stage}: \d+/\d+ \w+.* in \d", log), stage  # the closing line: count, time, rate
    assert "Progress bars disabled" not in log
    assert "[demo] report: open " in log


def test_demo_tracking_and_no_secret(demo):
    from mlflow.tracking import MlflowClient

    summary, log = demo
    wd = Path(summary["workdir"])
    client = MlflowClient(f"sqlite:///{wd}/mlruns.db")
    exp = client.get_experiment_by_name("raypath wd")
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"mil mil-lodo", "mil mil-internal", "adapt dora-c0"} <= names
    adapt_run = next(r for r in runs if r.info.run_name == "adapt dora-c0")
    assert "teacher_entropy" in adapt_run.data.metrics
    assert SECRET not in log
    for f in wd.rglob("*"):
        if f.is_file() and f.suffix in (".html", ".yaml", ".json", ".db", ".md", ".csv"):
            assert SECRET.encode() not in f.read_bytes(), f


# --------------------------------------------------------------------------- headless Chromium

_CHECK_JS = """<script>
window.addEventListener('load', function () {
  var bad = Array.prototype.filter.call(document.images, function (i) { return !(i.complete && i.naturalWidth > 0); });
  var a = document.getElementById('answer'), r = a ? a.getBoundingClientRect() : null;
  var out = {n_images: document.images.length, broken: bad.map(function (i) { return i.alt || 'img'; }),
             answer_top: r ? r.top : null, answer_text: a ? a.innerText.slice(0, 400) : '',
             links: Array.prototype.map.call(document.querySelectorAll('a[href]'), function (x) { return x.getAttribute('href'); })};
  var pre = document.createElement('pre'); pre.id = 'raypath-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    msg = "no headless Chromium: run scripts/bootstrap.sh (apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def open_in_browser(page: Path) -> dict:
    """The page as Chromium loaded it: images decoded, links, where the answer sits."""
    probe = page.with_name(page.stem + ".check.html")
    probe.write_text(page.read_text().replace("</body>", _CHECK_JS + "</body>"))
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-extensions", "--window-size=1280,900", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    probe.unlink()
    m = re.search(r'<pre id="raypath-check">(.*?)</pre>', out.stdout, re.S)
    assert m, f"{page}: Chromium rendered nothing ({out.stderr[-500:]})"
    import html

    return json.loads(html.unescape(m.group(1)))


def test_every_page_in_headless_chromium(demo):
    chromium()
    summary, _ = demo
    wd = Path(summary["workdir"])
    pages = [wd / "report.html", *sorted(wd.glob("runs/*/report.html")), *sorted(wd.glob("adapters/*/report.html")),
             *sorted(wd.glob("external/runs/*/report.html"))]  # the later cohort's predictions
    assert any("predict" in str(p) for p in pages) and any(p.parent.name == "patch" for p in pages)
    assert len(pages) >= 8, pages
    for page in pages:
        got = open_in_browser(page)
        assert got["broken"] == [], f"{page}: broken images {got['broken']}"
        assert got["answer_top"] is not None and got["answer_top"] < 900, f"{page}: answer below the first screen"
        assert re.search(r"\d", got["answer_text"]), f"{page}: no number in the answer: {got['answer_text']!r}"
        for href in got["links"]:
            u = urlparse(href)
            assert not u.scheme and not u.netloc, f"{page}: external link {href}"
            if href.startswith("#"):
                continue
            target = (page.parent / unquote(u.path)).resolve()
            assert target.exists(), f"{page}: broken link {href}"
