"""Robustness metrics: direction on constructed embeddings, equality with the
``croma`` reference, bounded memory, and the stage end to end on a workdir."""

from __future__ import annotations

import json
import time
import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest

from raypath.robustness import metrics as M


def constructed(site: float, bio: float, n_slides=36, tiles=10, dim=32, n_centres=3, seed=0):
    """Embeddings = site * centre vector + bio * biology vector + slide and tile noise.

    Biology is balanced across centres (slide s: centre s % 3, class (s // 3) % 2),
    so neither factor is confounded with the other.
    """
    rng = np.random.default_rng(seed)
    centre_vec = rng.normal(size=(n_centres, dim))
    bio_vec = rng.normal(size=(2, dim))
    X, rows = [], []
    for s in range(n_slides):
        c, b = s % n_centres, (s // n_centres) % 2
        X.append(site * centre_vec[c] + bio * bio_vec[b] + 0.3 * rng.normal(size=dim)
                 + rng.normal(size=(tiles, dim)))
        rows += [{"slide_id": f"s{s:03d}", "patient_id": f"p{s // 2:03d}", "cohort": f"site{c}",
                  "label": f"class{b}"}] * tiles
    return np.concatenate(X).astype(np.float32), pd.DataFrame(rows)


SITE = constructed(site=2.5, bio=0.4)
BIO = constructed(site=0.4, bio=2.5)


def _all(X, m):
    return dict(
        ri=M.robustness_index(X, m.label, m.cohort, m.slide_id)["ri"],
        croma=M.croma(X, m.label, m.cohort, m.slide_id)["median"],
        probe=M.site_probe(X, m.cohort, m.patient_id)["balanced_accuracy"],
        purity=M.kmeans_purity(X, m.cohort, k=200, repeats=2)["purity"],
        cs=M.clustering_score(X, m.label, m.cohort)["score"],
        sil=M.cohort_cluster_metrics(X, m.cohort)["silhouette"],
    )


def test_site_dominated_vs_biology_dominated():
    site, bio = _all(*SITE), _all(*BIO)
    assert site["ri"] < 0.3 < 0.7 < bio["ri"]
    assert site["croma"] < 0 < bio["croma"]
    assert site["purity"] > bio["purity"] + 0.2
    assert site["probe"] > 0.9 and bio["probe"] < site["probe"]
    assert site["cs"] < 0 < bio["cs"]
    assert site["sil"] > bio["sil"]


def test_purity_reports_chance_and_caps_k_on_small_data():
    X, m = BIO
    res = M.kmeans_purity(X, m.cohort, k=200, repeats=2, seed=1)
    assert res["k"] == len(X) // 20 and res["k_requested"] == 200
    # three balanced cohorts: full mixing gives purity well below 1 but above 1/3
    assert 1 / 3 <= res["chance_purity"] < res["purity"] + 0.15
    assert len(res["purity_per_repeat"]) == 2
    sizes = res["clusters"]["size"]
    assert sum(sizes) == len(X) and len(sizes) == res["k"]


def test_minibatch_kmeans_path_keeps_the_purity_picture(monkeypatch):
    monkeypatch.setattr(M, "MINIBATCH_KMEANS_ABOVE", 100)  # large-data path on small data
    site = M.kmeans_purity(SITE[0], SITE[1].cohort, k=200, repeats=1)["purity"]
    bio = M.kmeans_purity(BIO[0], BIO[1].cohort, k=200, repeats=1)["purity"]
    assert site > 0.9 and bio < site - 0.2


def test_site_probe_chance_and_grouping():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    centre = np.repeat(["a", "b", "c"], 100)
    patients = np.repeat([f"p{i}" for i in range(30)], 10)
    res = M.site_probe(X, centre, patients, n_splits=5)
    assert res["chance"] == pytest.approx(1 / 3)
    # pure noise: the probe is near chance
    assert abs(res["balanced_accuracy"] - 1 / 3) < 0.15
    assert M.site_probe(X, np.repeat("a", 300), patients)["skipped"]


# --------------------------------------------------------------------------- reference


def _croma_manifest(m: pd.DataFrame) -> pd.DataFrame:
    return m.assign(sample_id=[str(i) for i in range(len(m))], image_path="-", group_id=m.slide_id)


def _random_set(seed):
    """An embedding set the implementation was never tuned on: random sizes, mixed signal."""
    rng = np.random.default_rng(seed)
    n_centres, n_slides = int(rng.integers(2, 5)), int(rng.integers(12, 30))
    tiles, dim = int(rng.integers(3, 9)), int(rng.integers(4, 40))
    cv, bv = rng.normal(size=(n_centres, dim)), rng.normal(size=(3, dim))
    X, rows = [], []
    for s in range(n_slides):
        c, b = int(rng.integers(n_centres)), int(rng.integers(3))
        X.append(rng.uniform(0, 1.5) * cv[c] + rng.uniform(0, 1.5) * bv[b] + rng.normal(size=(tiles, dim)))
        rows += [{"slide_id": f"s{s}", "cohort": f"c{c}", "label": f"b{b}"}] * tiles
    return np.concatenate(X), pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_ri_and_croma_equal_croma_package(seed):
    croma = pytest.importorskip("croma")
    X, m = _random_set(seed)
    man = _croma_manifest(m)
    ks = [1, 3, 5, 10, 20]
    with warnings.catch_warnings():  # croma warns about low support on random sets
        warnings.simplefilter("ignore")
        ref = croma.RI.compute(X, man, confounder_column="cohort", k_candidates=ks)
        ref_curve = croma.RI.compute_curve(X, man, confounder_column="cohort", k_values=ks)
    mine = M.robustness_index(X, m.label, m.cohort, m.slide_id, k_candidates=ks)
    assert mine["k"] == ref.k
    assert mine["ri"] == pytest.approx(ref.value, abs=1e-12)
    for k in ks:
        assert mine["curve"][str(k)] == pytest.approx(ref_curve[k], abs=1e-12)
    try:
        ref_c = croma.CRoMa.compute(X, man, confounder_column="cohort")
    except RuntimeError:  # some tile lacks 5 SO/OS neighbours: croma refuses, we report NaN
        vals = M.croma_per_sample(X, m.label, m.cohort, m.slide_id)
        assert np.isnan(vals).any()
        return
    mine_c = M.croma(X, m.label, m.cohort, m.slide_id)
    assert mine_c["median"] == pytest.approx(ref_c.value, abs=1e-5)
    assert mine_c["worst_tail_mean"] == pytest.approx(ref_c.ltm_alpha, abs=1e-5)
    assert mine_c["frac_le_0"] == pytest.approx(ref_c.f0, abs=1e-12)


def test_ri_chance_level():
    # balanced 2 centres x 2 classes: 0.5; 3 centres x 2 classes: 2 / (2 + 1)
    b, c = np.repeat([0, 1], 20), np.tile(np.repeat([0, 1], 10), 2)
    assert M.robustness_index_chance(b, c, np.arange(40) // 5) == pytest.approx(0.5)
    b3, c3 = np.repeat([0, 1], 30), np.tile(np.repeat([0, 1, 2], 10), 2)
    assert M.robustness_index_chance(b3, c3, np.arange(60) // 5) == pytest.approx(2 / 3)


def test_ri_and_croma_by_hand():
    """Six points on a circle, small enough to count by hand (cosine geometry)."""
    ang = np.deg2rad([0, 10, 20, 180, 190, 200])
    X = np.stack([np.cos(ang), np.sin(ang)], 1)
    slide = ["a", "b", "c", "d", "e", "f"]
    centre = ["x", "y", "x", "y", "x", "y"]
    bio = ["p", "p", "q", "q", "q", "p"]
    # k=1: nearest other-slide neighbours: 0->1 (SO), 1->0|2 tie broken by order (0: SO),
    # 2->1 (OO), 3->4 (SO), 4->3|5 (3: SO), 5->4 (OO)  =>  SO=4, OS=0
    res = M.robustness_index(X, bio, centre, slide, k=1, k_candidates=[1])
    assert (res["n_so"], res["n_os"], res["ri"]) == (4, 0, 1.0)
    # k=2 for point 0: neighbours 1 (p,y: SO) and 2 (q,x: OS)
    res2 = M.robustness_index(X, bio, centre, slide, k=2, k_candidates=[2])
    assert res2["n_so"] + res2["n_os"] > 0
    # CRoMa m=1, point 0: d_SO = d(0,1) = 1-cos10, d_OS = d(0,2) = 1-cos20
    vals = M.croma_per_sample(X, bio, centre, slide, m=1)
    d_so, d_os = 1 - np.cos(np.deg2rad(10)), 1 - np.cos(np.deg2rad(20))
    assert vals[0] == pytest.approx((d_os - d_so) / (d_os + d_so), rel=1e-5)


def test_chunked_neighbours_equal_unchunked():
    X, m = _random_set(5)
    a_idx, a_d = M.neighbours_excluding_groups(X, m.slide_id, 7)
    b_idx, b_d = M.neighbours_excluding_groups(X, m.slide_id, 7, memory_bytes=5000)
    assert np.array_equal(a_idx, b_idx)
    np.testing.assert_allclose(a_d, b_d, rtol=1e-5)
    # never a neighbour from the same slide
    g = m.slide_id.to_numpy()
    assert not (g[a_idx] == g[:, None]).any()


def test_large_set_bounded_memory_and_time():
    """200k x 64 tiles: slide-balanced cap + chunked exact kNN keep memory and time bounded."""
    rng = np.random.default_rng(0)
    n, dim = 200_000, 64
    X = rng.normal(size=(n, dim)).astype(np.float32)
    slides = np.repeat(np.arange(2000), 100)
    centre = slides % 4
    bio = (slides // 4) % 2
    idx = M.cap_per_group(slides, 4000, seed=0)
    assert len(idx) == 4000 and len(np.unique(slides[idx])) == 2000  # 2 tiles from every slide
    M.robustness_index(X[:50], bio[:50], centre[:50], slides[:50], k_candidates=[1])  # warm imports
    t0 = time.perf_counter()
    tracemalloc.start()
    res = M.robustness_index(X[idx], bio[idx], centre[idx], slides[idx], k_candidates=[5, 20],
                             memory_bytes=8 * 2**20)
    cr = M.croma(X[idx], bio[idx], centre[idx], slides[idx], memory_bytes=8 * 2**20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    # random features: RI is what random neighbours give: (C-1)/((C-1)+(B-1)) = 3/4
    assert res["chance"] == pytest.approx(0.75, abs=0.01)
    assert abs(res["ri"] - res["chance"]) < 0.03
    assert abs(cr["median"]) < 0.05
    # peak traced memory stays near the 8 MiB chunk budget, far below one
    # 4000 x 4000 float32 distance matrix (61 MiB)
    assert peak < 24 * 2**20, peak
    assert elapsed < 60, elapsed


# --------------------------------------------------------------------------- stage end to end


def _workdir(tmp_path, cmu_slide, X, meta, key):
    """slides.parquet + tiles.parquet (real tiles of the CMU slide) + a feature store."""
    from raypath.embed.store import write_bag_table

    wd = tmp_path / "wd"
    slides = meta.drop_duplicates("slide_id")[["slide_id", "patient_id", "cohort", "label"]].copy()
    slides["uri"] = str(cmu_slide)
    slides["status"] = "ok"
    wd.mkdir()
    slides.to_parquet(wd / "slides.parquet")
    tiles = []
    for sid, grp in meta.groupby("slide_id", sort=False):
        n = len(grp)
        t = pd.DataFrame({"slide_id": sid, "tile_id": np.arange(n),
                          "x": (np.arange(n) % 8) * 240, "y": (np.arange(n) // 8) * 240,
                          "level": 0, "read_px": 224, "tile_px": 64})
        tiles.append(t)
        write_bag_table(str(wd / "features" / key), sid, t.tile_id.to_numpy(),
                        t[["x", "y"]].to_numpy(), X[grp.index.to_numpy()])
    pd.concat(tiles).to_parquet(wd / "tiles.parquet")
    return wd


def test_run_and_compare_end_to_end(tmp_path, cmu_slide):
    from raypath.embed.store import write_bag_table
    from raypath.robustness import RobustnessConfig, compare, run_robustness

    X, meta = SITE
    wd = _workdir(tmp_path, cmu_slide, X, meta, "fm")
    for sid, grp in meta.groupby("slide_id", sort=False):  # same tiles, "adapted" features
        write_bag_table(str(wd / "features" / "fm-adapted"), sid, np.arange(len(grp)),
                        np.zeros((len(grp), 2), int), BIO[0][grp.index.to_numpy()])
    cfg = RobustnessConfig(workdir=str(wd), features="fm", tiles_per_slide=8, kmeans_repeats=2, cluster_score_k=3,
                           gallery_tiles=2, gallery_clusters=2, umap=False, tsne_tiles_per_slide=3,
                           tsne_iterations=250)
    out = run_robustness(cfg)
    run_dir = wd / "runs" / "robustness-fm"
    doc = json.loads((run_dir / "robustness.json").read_text())
    assert doc["inputs"]["n_slides"] == 36 and doc["inputs"]["n_tiles"] == 36 * 8
    assert doc["inputs"]["feature_dir"].endswith("features/fm")
    assert doc["config"]["tiles_per_slide"] == 8
    assert doc["headline"]["robustness_index"] == out["headline"]["robustness_index"] < 0.3
    assert (run_dir / "config.yaml").exists()
    for png in ("tsne.png", "purity_per_cluster.png", "ri_curve.png", "croma_hist.png", "gallery.png"):
        assert (run_dir / png).stat().st_size > 1000, png
    assert doc["metrics"]["kmeans_purity"]["gallery"], doc.get("plots_skipped")

    cmp = compare("fm", "fm-adapted", cfg.model_copy(update={"run": "before-after", "gallery": False,
                                                              "plots": False, "cluster_score_k": 3}),
                  label_a="frozen", label_b="adapted")
    d = cmp["delta"]
    assert d["robustness_index"]["more_robust"] == "b" and d["robustness_index"]["delta"] > 0.3
    assert d["kmeans_purity"]["more_robust"] == "b"
    assert d["site_probe_balanced_accuracy"]["more_robust"] == "b"
    assert (wd / "runs" / "before-after" / "comparison.json").exists()


def test_missing_biology_is_skipped_not_fatal(tmp_path, cmu_slide):
    from raypath.robustness import RobustnessConfig, run_robustness

    X, meta = BIO
    wd = _workdir(tmp_path, cmu_slide, X, meta, "fm")
    cfg = RobustnessConfig(workdir=str(wd), biology_column="true_phenotype", tiles_per_slide=4,
                           kmeans_repeats=1, plots=False)
    out = run_robustness(cfg)
    assert "skipped" in out["metrics"]["robustness_index"]
    assert out["headline"]["robustness_index"] is None
    assert out["headline"]["site_probe_balanced_accuracy"] is not None


def test_load_sample_bounds_tiles_on_large_cohorts(tmp_path, cmu_slide):
    from raypath.robustness.api import load_sample

    X, meta = BIO
    wd = _workdir(tmp_path, cmu_slide, X, meta, "fm")
    slides = pd.read_parquet(wd / "slides.parquet")
    Xs, m, info = load_sample(str(wd / "features" / "fm"), slides, 100, 0, max_total=72, min_per_slide=1)
    assert info["tiles_per_slide_loaded"] == 2 and len(Xs) == 72  # 36 slides x 2
    assert m.groupby("slide_id").size().eq(2).all()
    assert {"cohort", "label", "patient_id", "uri"} <= set(m.columns)
    _, _, info = load_sample(str(wd / "features" / "fm"), slides, 100, 0, max_total=72, min_per_slide=5)
    assert info["tiles_per_slide_loaded"] == 5


def test_cli_json_and_errors(tmp_path, cmu_slide, capsys):
    from raypath.cli import main

    X, meta = BIO
    wd = _workdir(tmp_path, cmu_slide, X, meta, "fm")
    rc = main(["robustness", "--workdir", str(wd), "--tiles-per-slide", "4", "--kmeans-repeats", "1",
               "--no-plots", "--knn-k", "5", "--cluster-score-k", "3", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["headline"]["robustness_index_k"] == 5
    assert out["headline"]["robustness_index"] > 0.7
    rc = main(["robustness", "--workdir", str(tmp_path / "nowhere"), "--features", "fm"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and ("raypath ingest" in err or "raypath embed" in err)  # names input and remedy
    assert not (tmp_path / "nowhere").exists()  # nothing written for a bad input
