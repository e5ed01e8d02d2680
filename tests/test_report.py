"""HTML reports: self-contained, every plot inlined, for every kind of run folder."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from test_robustness import BIO, SITE, _workdir


def _inlined(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _external_refs(html: str) -> list[str]:
    """src/href that are not inline data or links to sibling report pages."""
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    return [r for r in refs if not r.startswith("data:") and not r.endswith("report.html")]


@pytest.fixture(scope="module")
def robust_workdir(tmp_path_factory, cmu_slide):
    """A workdir with a robustness run, a before/after comparison and a MIL-like run."""
    from raypath.embed.store import write_bag_table
    from raypath.robustness import RobustnessConfig, compare, run_robustness

    tmp = tmp_path_factory.mktemp("report")
    X, meta = SITE
    wd = _workdir(tmp, cmu_slide, X, meta, "fm")
    for sid, grp in meta.groupby("slide_id", sort=False):
        write_bag_table(str(wd / "features" / "fm-adapted"), sid, np.arange(len(grp)),
                        np.zeros((len(grp), 2), int), BIO[0][grp.index.to_numpy()])
    cfg = RobustnessConfig(workdir=str(wd), features="fm", tiles_per_slide=5, kmeans_repeats=1,
                           gallery_clusters=2, gallery_tiles=1, umap=False, cluster_score_k=3,
                           tsne_tiles_per_slide=3, tsne_iterations=250)
    run_robustness(cfg)
    compare("fm", "fm-adapted", cfg.model_copy(update={"run": "before-after", "gallery": False}),
            label_a="frozen", label_b="adapted")
    # a run of another stage: metrics.json + PNGs in a sub-folder + config.yaml
    from raypath.robustness.plots import ri_curve

    mil = wd / "runs" / "mil-lodo"
    (mil / "plots").mkdir(parents=True)
    (mil / "metrics.json").write_text(json.dumps({"c_index": {"mean": 0.71, "per_cohort": {"A": 0.7, "B": 0.72}}}))
    (mil / "plots" / "c_index.png").write_bytes(ri_curve({"1": 0.6, "5": 0.7}, 5, "stand-in plot"))
    (mil / "config.yaml").write_text("stage: MilConfig\nconfig:\n  lr: 0.0002\n")
    return wd


def test_robustness_run_report_inlines_every_plot(robust_workdir):
    from raypath.report.pages import write_run_report

    run = robust_workdir / "runs" / "robustness-fm"
    uri = write_run_report(str(run))
    html = open(uri).read()
    pngs = sorted(run.glob("*.png"))
    assert {p.name for p in pngs} >= {"tsne.png", "purity_per_cluster.png", "ri_curve.png",
                                      "croma_hist.png", "gallery.png"}
    inlined = _inlined(html)
    for p in pngs:
        assert p.read_bytes() in inlined, p.name
    assert _external_refs(html) == []
    doc = json.loads((run / "robustness.json").read_text())
    # the headline numbers and their inputs are on the page
    assert f"{doc['headline']['kmeans_purity']:.4g}" in html
    assert "Robustness index RI" in html and "features/fm" in html
    assert "config.yaml" in html and "tiles_per_slide" in html


def test_comparison_report_side_by_side(robust_workdir):
    from raypath.report.pages import render_run

    run = robust_workdir / "runs" / "before-after"
    html = render_run(str(run))
    assert "frozen" in html and "adapted" in html
    inlined = _inlined(html)
    for side in ("a", "b"):
        for p in (run / side).glob("*.png"):
            assert p.read_bytes() in inlined, f"{side}/{p.name}"
    # the comparison marks the adapted store as more robust on RI
    row = re.search(r"Robustness index RI</th>(.*?)</tr>", html).group(1)
    assert re.search(r"class='num better'>1(\.0+)?<", row)  # every metric with 3 decimals


def test_other_stage_run_and_index(robust_workdir, capsys):
    from raypath.cli import main

    rc = main(["report", str(robust_workdir), "--json"])
    assert rc == 0
    written = json.loads(capsys.readouterr().out)["written"]
    index = open(written[0]).read()
    for run in ("robustness-fm", "before-after", "mil-lodo"):
        assert f"runs/{run}/report.html" in index
        assert (robust_workdir / "runs" / run / "report.html").exists()
    mil = (robust_workdir / "runs" / "mil-lodo" / "report.html").read_text()
    assert "c_index.mean" in mil and "0.71" in mil
    assert (robust_workdir / "runs" / "mil-lodo" / "plots" / "c_index.png").read_bytes() in _inlined(mil)
    assert "lr: 0.0002" in mil


def test_two_runs_side_by_side(robust_workdir, tmp_path):
    from raypath.report.pages import report

    a = robust_workdir / "runs" / "before-after" / "a"
    b = robust_workdir / "runs" / "before-after" / "b"
    (uri,) = report(str(a), compare_to=str(b), out=str(tmp_path / "cmp.html"))
    html = open(uri).read()
    assert len(_inlined(html)) == len(list(a.glob("*.png"))) + len(list(b.glob("*.png")))
    assert "KMeans cohort purity" in html


def test_report_errors(tmp_path, capsys):
    from raypath.cli import main

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no JSON results or PNG plots" in capsys.readouterr().err


def test_robustness_and_report_on_s3(s3_server, robust_workdir):
    """The same stage with the workdir in object storage."""
    from raypath.report.pages import report
    from raypath.robustness import RobustnessConfig, run_robustness
    from raypath.io.storage import filesystem_for

    src = robust_workdir
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for name in ("slides.parquet", "tiles.parquet"):
            shutil.copy(src / name, f"{d}/{name}")
        shutil.copytree(src / "features" / "fm", f"{d}/features/fm")
        base = s3_server.upload_dir(d, "robust-report")
    out = run_robustness(RobustnessConfig(workdir=base, tiles_per_slide=3, kmeans_repeats=1, gallery=False,
                                          umap=False, cluster_score_k=3, tsne_tiles_per_slide=2,
                                          tsne_iterations=250))
    assert out["run_dir"] == f"{base}/runs/robustness-fm"
    fs = filesystem_for(base)
    assert fs.exists(f"{out['run_dir']}/robustness.json") and fs.exists(f"{out['run_dir']}/tsne.png")
    uris = report(out["run_dir"])
    html = fs.cat_file(uris[0]).decode()
    assert fs.cat_file(f"{out['run_dir']}/tsne.png") in _inlined(html)


def test_run_report_skips_binary_files_named_json(tmp_path):
    """Ray Tune writes pickled search state as *.json inside sweep folders."""
    from raypath.report.pages import render_run

    run = tmp_path / "sweeps" / "s"
    (run / "tune").mkdir(parents=True)
    (run / "sweep.json").write_text('{"best": 0.8}')
    (run / "tune" / "search_gen_state.json").write_bytes(b"\x80\x04\x95binary")
    html = render_run(str(run))
    assert "sweep.json" in html and "search_gen_state" not in html


def test_sweep_page_leads_with_the_best_trial(tmp_path):
    """Best trial numbered as in trials.csv, its reproduce command, failures with their reason,
    importances hidden below 10 complete trials, nothing of Tune's state."""
    from raypath.report.pages import render_run

    sw = tmp_path / "sweeps" / "s1"
    (sw / "tune").mkdir(parents=True)
    (sw / "tune" / "experiment_state.json").write_text('{"tune_internal_marker": 1}')
    best = {"trial_id": "bbbb2222", "objectives": {"mean_external": 0.81, "worst_external": 0.7},
            "metrics": {"worst_cohort": "c2"}, "params": {"mil.lr": 0.00125, "mil.model": "abmil"},
            "commands": ["raypath mil --config sweeps/s1/best/mil.yaml"]}
    (sw / "sweep.json").write_text(json.dumps({
        "name": "s1", "kind": "mil", "objectives": [{"metric": "mean_external", "mode": "max"},
                                                    {"metric": "worst_external", "mode": "max"}],
        "held_out_cohorts": ["c0", "c1", "c2"], "n_trials": 3, "n_complete": 2, "n_stopped": 0, "n_failed": 1,
        "best": best}))
    (sw / "trials.csv").write_text(
        "trial_id,trial_index,status,error,folds_done,mean_external,worst_external,param:mil.lr,param:mil.model,pareto\n"
        "aaaa1111,1.0,complete,,3,0.7,0.6,0.01,clam,False\n"
        "bbbb2222,2.0,complete,,3,0.81,0.7,0.00125,abmil,True\n"
        "cccc3333,3.0,error,ValueError: out of memory,0,,,0.1,abmil,False\n")
    (sw / "param_importances.json").write_text('{"mil.lr": 0.9, "mil.model": 0.1}')
    html = render_run(str(sw))
    answer = html[html.index('id="answer"'):html.index("</section>")]
    assert "Best trial #2 (bbbb2222)" in answer and "raypath mil --config sweeps/s1/best/mil.yaml" in answer
    assert "0.00125" in answer  # parameters with their significant digits
    assert "ValueError: out of memory" in html and "status-error" in html
    assert "need at least 10 complete trials" in html and "<th>mil.lr</th><td class=\"num\">0.900" not in html
    assert "tune_internal_marker" not in html and "experiment_state" not in html
