"""Tests of ``raypath synth``: the synthetic multi-cohort study generator."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypath.errors import RaypathError
from raypath.synth.study import SynthConfig, make_sites, plan_study, synthesize

COHORT_COLUMNS = ["slide_id", "uri", "patient_id", "cohort", "time", "event", "label", "scanner", "pair_id"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A small 3-site study with a 40x site, pairs, pen marks, a blank slide and confounding."""
    out = tmp_path_factory.mktemp("study")
    cfg = SynthConfig(
        out=str(out), n_cohorts=3, slides_per_cohort=4, slide_px=512, objective=[20, 20, 40],
        pair_fraction=0.5, pen_fraction=0.25, n_blank_slides=1, confounding=0.5, seed=3,
    )
    table = synthesize(cfg)
    return out, table


def _thumb(path: Path, size: int = 128) -> np.ndarray:
    import tiffslide

    with tiffslide.TiffSlide(path) as s:
        return np.asarray(s.get_thumbnail((size, size)).convert("RGB").resize((size, size)), np.int16)


def _tissue(rgb: np.ndarray) -> np.ndarray:
    """Stained pixels: saturated compared with the grey-white glass."""
    return (rgb.max(-1) - rgb.min(-1)) > 30


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_outputs_and_table_contract(study):
    out, table = study
    written = pd.read_csv(out / "cohort.csv")
    assert list(written.columns[: len(COHORT_COLUMNS)]) == COHORT_COLUMNS
    # the documented optional label_name column (README, "The cohort table") names the label's classes
    assert all(c in COHORT_COLUMNS + ["label_name"] or c.startswith("true_") for c in written.columns)
    assert written["slide_id"].is_unique
    # URIs are relative to the table's folder and point at the written slides
    assert not any(u.startswith("/") for u in written["uri"])
    assert all((out / u).is_file() for u in written["uri"])
    assert sorted(p.name for p in (out / "slides").iterdir()) == sorted(f"{s}.svs" for s in written["slide_id"])
    assert (out / "synth_config.yaml").is_file() and (out / "sites.json").is_file()
    assert SynthConfig.load(out / "synth_config.yaml").slides_per_cohort == 4
    # 12 originals + 1 blank + variants of half the originals
    assert len(written) == 12 + 1 + 6
    assert written["cohort"].nunique() == 3


def test_pyramid_structure_and_scan_properties(study):
    import tifffile
    import tiffslide

    out, table = study
    for cohort, objective, mpp in (("c0", 20, 0.5), ("c2", 40, 0.25)):
        row = table[(table["cohort"] == cohort) & table["true_variant_of"].isna()].iloc[0]
        with tiffslide.TiffSlide(out / row["uri"]) as s:
            assert s.dimensions == (512, 512)
            assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
            assert s.level_dimensions == ((512, 512), (128, 128), (32, 32))
            assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(mpp)
            assert float(s.properties["tiffslide.objective-power"]) == objective
            assert s.properties["tiffslide.vendor"] == "aperio"
            assert set(s.associated_images) == {"thumbnail", "label", "macro"}
        with tifffile.TiffFile(out / row["uri"]) as tf:
            level0 = tf.pages[0]
            assert level0.is_tiled and (level0.tilewidth, level0.tilelength) == (256, 256)
            assert level0.compression == tifffile.COMPRESSION.JPEG
            assert [p.subfiletype for p in tf.pages] == [0, 0, 0, 0, 1, 9]
            assert not tf.pages[1].is_tiled  # stripped thumbnail, as Aperio writes it


def test_tiffslide_and_openslide_read_identical_pixels(study):
    import openslide
    import tiffslide

    out, table = study
    path = out / table[table["true_pen"]].iloc[0]["uri"]
    with tiffslide.TiffSlide(path) as ts, openslide.OpenSlide(str(path)) as os_:
        assert os_.properties["openslide.vendor"] == "aperio"
        assert float(os_.properties["openslide.mpp-x"]) == pytest.approx(float(ts.properties["tiffslide.mpp-x"]))
        assert os_.level_dimensions == ts.level_dimensions
        for level, loc, size in ((0, (37, 200), (300, 250)), (1, (0, 0), (128, 128))):
            a = np.asarray(ts.read_region(loc, level, size).convert("RGB"))
            b = np.asarray(os_.read_region(loc, level, size).convert("RGB"))
            assert a.std() > 5  # not an empty read
            np.testing.assert_array_equal(a, b)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(n_cohorts=2, slides_per_cohort=1, slide_px=384, pair_fraction=1.0)
    a = synthesize(SynthConfig(out=str(tmp_path / "a"), seed=7, **kw))
    b = synthesize(SynthConfig(out=str(tmp_path / "b"), seed=7, **kw))
    c = synthesize(SynthConfig(out=str(tmp_path / "c"), seed=8, **kw))
    pd.testing.assert_frame_equal(a, b)
    for uri in a["uri"]:
        assert _sha(tmp_path / "a" / uri) == _sha(tmp_path / "b" / uri)
        assert _sha(tmp_path / "a" / uri) != _sha(tmp_path / "c" / uri)
    assert (tmp_path / "a" / "sites.json").read_text() == (tmp_path / "b" / "sites.json").read_text()
    # reuse: an identical request returns the existing study without rewriting it
    first = (tmp_path / "a" / a["uri"][0]).stat().st_mtime_ns
    again = synthesize(SynthConfig(out=str(tmp_path / "a"), seed=7, reuse=True, workers=2, **kw))
    assert (tmp_path / "a" / a["uri"][0]).stat().st_mtime_ns == first
    assert list(again["slide_id"]) == list(a["slide_id"])
    changed = synthesize(SynthConfig(out=str(tmp_path / "a"), seed=8, reuse=True, **kw))
    assert _sha(tmp_path / "a" / changed["uri"][0]) == _sha(tmp_path / "c" / changed["uri"][0])


def test_survival_sanity_and_risk_ordering(tmp_path):
    cfg = SynthConfig(out=str(tmp_path), n_cohorts=3, slides_per_cohort=300, censoring=0.3, seed=1)
    pats = plan_study(cfg).drop_duplicates("patient_id")
    assert (pats["time"] > 0).all()
    assert set(pats["event"].unique()) <= {0, 1}
    assert abs(1 - pats["event"].mean() - 0.3) < 0.06
    # higher risk -> shorter time to event, on average
    hi = pats["true_risk"] > pats["true_risk"].median()
    assert pats.loc[hi, "true_event_time"].median() < 0.6 * pats.loc[~hi, "true_event_time"].median()
    assert pats["true_risk"].corr(pats["true_event_time"], method="spearman") < -0.3
    # the label is the phenotype, and the phenotype drives risk
    assert (pats["label"] == (pats["true_phenotype"] == "high_grade")).all()
    assert pats.groupby("label")["true_risk"].mean().diff().iloc[-1] > 1.0
    # censoring is independent of the cohort
    assert pats.groupby("cohort")["event"].mean().max() - pats.groupby("cohort")["event"].mean().min() < 0.15


def test_confounding_changes_prevalence_by_cohort(tmp_path):
    def prevalence(conf: float) -> pd.Series:
        cfg = SynthConfig(out=str(tmp_path), n_cohorts=3, slides_per_cohort=40, confounding=conf)
        return plan_study(cfg).drop_duplicates("patient_id").groupby("cohort")["label"].mean()

    flat, confounded = prevalence(0.0), prevalence(1.0)
    assert flat.max() - flat.min() < 0.05
    assert confounded["c2"] - confounded["c0"] > 0.6


def test_pairs_share_tissue_and_truth_but_not_site(study):
    out, table = study
    variants = table[table["true_variant_of"].notna()]
    assert len(variants) == 6
    same = ["patient_id", "time", "event", "label", "true_risk", "true_phenotype", "true_density_per_10k_um2"]
    for _, v in variants.iterrows():
        o = table.set_index("slide_id").loc[v["true_variant_of"]]
        assert o["pair_id"] == v["pair_id"] and isinstance(v["pair_id"], str)
        assert o["cohort"] != v["cohort"] and o["scanner"] != v["scanner"]
        assert all(o[c] == v[c] for c in same)
        # same tissue shape (physical field of view), different colour
        to, tv = _thumb(out / o["uri"]), _thumb(out / v["uri"])
        mo, mv = _tissue(to), _tissue(tv)
        assert (mo & mv).sum() / (mo | mv).sum() > 0.8
        assert np.abs(to.mean((0, 1)) - tv.mean((0, 1))).max() > 2
    assert table["pair_id"].dropna().value_counts().eq(2).all()


def test_site_is_visible_in_colour_statistics(study):
    """Per-slide colour features identify the cohort (leave-one-out nearest centroid)."""
    out, table = study
    rows = table[~table["true_blank"]]
    feats = []
    for uri in rows["uri"]:
        t = _thumb(out / uri)
        m = _tissue(t)
        tissue = t[m].astype(float)
        chroma = (tissue / tissue.sum(-1, keepdims=True)).mean(0)  # stain colour, not amount
        feats.append(np.r_[np.median(t[~m], 0), 100 * chroma])  # glass white balance + stain hue
    feats = np.asarray(feats, float)
    cohorts = rows["cohort"].to_numpy()
    correct = 0
    for i in range(len(feats)):
        keep = np.arange(len(feats)) != i
        cents = {c: feats[keep & (cohorts == c)].mean(0) for c in np.unique(cohorts)}
        pred = min(cents, key=lambda c: np.linalg.norm(feats[i] - cents[c]))
        correct += pred == cohorts[i]
    assert correct / len(feats) >= 0.8  # chance is 1/3


def test_biology_is_visible_in_pixels(tmp_path):
    """High-grade tissue has more, larger nuclei: more dark haematoxylin pixels."""
    import tiffslide

    cfg = SynthConfig(out=str(tmp_path), n_cohorts=1, slides_per_cohort=6, slide_px=512, seed=2,
                      patients_share_slides=0.0)
    table = synthesize(cfg)
    frac = []
    for uri in table["uri"]:
        with tiffslide.TiffSlide(tmp_path / uri) as s:
            rgb = np.asarray(s.read_region((0, 0), 0, (512, 512)).convert("RGB"), np.int16)
        tissue = _tissue(rgb)
        nuclear = tissue & (rgb.mean(-1) < 150)
        frac.append(nuclear.sum() / max(tissue.sum(), 1))
    frac = np.asarray(frac)
    assert table["label"].nunique() == 2
    assert frac[table["label"] == 1].min() > frac[table["label"] == 0].max()


def test_tissue_fraction_blank_and_pen(study):
    out, table = study
    for _, r in table.iterrows():
        t = _thumb(out / r["uri"])
        measured = _tissue(t).mean()
        if r["true_blank"]:
            assert measured < 0.005
        elif not r["true_pen"]:
            assert abs(measured - r["true_tissue_fraction"]) < 0.15, r["slide_id"]
    assert table["true_pen"].sum() >= 2


def test_sites_differ_and_are_deterministic(tmp_path):
    cfg = SynthConfig(out=str(tmp_path), n_cohorts=4)
    a, b = make_sites(cfg), make_sites(cfg)
    assert [s["stain"].to_dict() for s in a] == [s["stain"].to_dict() for s in b]
    scales = [s["stain"].conc_scale[0] for s in a]
    assert max(scales) - min(scales) > 0.2
    flat = make_sites(SynthConfig(out=str(tmp_path), n_cohorts=4, site_strength=0.0))
    assert len({str(s["stain"].to_dict()) for s in flat}) == 1


def test_write_to_embedded_s3(s3_server):
    import tiffslide

    s3_server.create_bucket("synth-test")
    uri = "s3://synth-test/studies/one"
    table = synthesize(SynthConfig(out=uri, n_cohorts=1, slides_per_cohort=2, slide_px=256))
    fs = s3_server.filesystem()
    names = {p.rsplit("/", 1)[-1] for p in fs.find("synth-test/studies/one")}
    assert {"cohort.csv", "sites.json", "synth_config.yaml", "c0_s000.svs", "c0_s001.svs"} <= names
    with fs.open("synth-test/studies/one/cohort.csv", "rb") as f:
        remote = pd.read_csv(f)
    assert list(remote["uri"]) == list(table["uri"])
    with fs.open(f"synth-test/studies/one/{table['uri'][0]}", "rb") as f:
        data = f.read()
    with tiffslide.TiffSlide(io.BytesIO(data)) as s:
        assert s.dimensions == (256, 256)
    with pytest.raises(RaypathError, match="does not exist"):
        synthesize(SynthConfig(out="s3://no-such-bucket-here/x", n_cohorts=1, slides_per_cohort=1, slide_px=256))


def _synth_cli(argv: list[str]) -> int:
    """Run the ``synth`` verb through its own parser (independent of other verbs' modules)."""
    import argparse

    from raypath.synth.study import add_cli

    parser = argparse.ArgumentParser(prog="raypath")
    add_cli(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_study_and_reports_bad_options(tmp_path, capsys):
    rc = _synth_cli(["synth", "--out", str(tmp_path / "s"), "--n-cohorts", "2", "--slides-per-cohort", "1",
                     "--slide-px", "256", "--objective", "20", "40", "--jpeg-quality", "80"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "slides written: 2" in text and "events" in text
    table = pd.read_csv(tmp_path / "s" / "cohort.csv")
    assert list(table["true_objective"]) == [20, 40]
    with pytest.raises(RaypathError, match="objective"):
        _synth_cli(["synth", "--out", str(tmp_path / "t"), "--objective", "25"])
    with pytest.raises(RaypathError, match="--n-cohorts"):
        _synth_cli(["synth", "--out", str(tmp_path / "u"), "--n-cohorts", "1", "--pair-fraction", "0.5"])
    assert not (tmp_path / "t").exists() and not (tmp_path / "u").exists()


def test_real_texture_mode_renders_real_he_inside_the_tissue_mask(tmp_path):
    table = synthesize(SynthConfig(out=str(tmp_path), n_cohorts=1, slides_per_cohort=2, slide_px=512,
                                   texture="real", seed=5))
    assert (table["true_texture"] == "real").all()
    for _, r in table.iterrows():
        t = _thumb(tmp_path / r["uri"])
        tissue = _tissue(t)
        assert 0.4 * r["true_tissue_fraction"] < tissue.mean() < r["true_tissue_fraction"] + 0.15
        # real H&E has dark haematoxylin-rich nuclei inside the tissue
        assert (t[tissue].mean(-1) < 140).mean() > 0.05


def test_odd_sizes_and_40x_read_identically(tmp_path):
    """Sizes that are not multiples of the tile or of 16 still form a valid pyramid."""
    import openslide
    import tiffslide

    table = synthesize(SynthConfig(out=str(tmp_path), n_cohorts=1, slides_per_cohort=1, slide_px=300,
                                   slide_height_px=520, objective=[40], tile_px_stored=128))
    path = tmp_path / table["uri"][0]
    with tiffslide.TiffSlide(path) as ts, openslide.OpenSlide(str(path)) as os_:
        assert ts.level_dimensions == os_.level_dimensions == ((300, 520), (75, 130), (18, 32))
        assert float(os_.properties["openslide.objective-power"]) == 40
        assert float(ts.properties["tiffslide.mpp-y"]) == pytest.approx(0.25)
        for level in range(3):
            w, h = ts.level_dimensions[level]
            a = np.asarray(ts.read_region((0, 0), level, (w, h)).convert("RGB"))
            b = np.asarray(os_.read_region((0, 0), level, (w, h)).convert("RGB"))
            np.testing.assert_array_equal(a, b)


def test_beer_lambert_round_trip_of_the_real_image():
    """Deconvolving the real H&E image and re-rendering it with neutral site
    effects gives the image back: the real texture keeps real colours."""
    from importlib import resources

    from PIL import Image

    from raypath.synth import texture

    with resources.files("raypath.data").joinpath("he_target_1000.png").open("rb") as f:
        src = np.asarray(Image.open(f).convert("RGB"), float)
    c = texture._real_concentrations()
    conc = np.zeros((4, *c.shape[1:]), np.float32)
    conc[:2], conc[3] = c[:2], c[2]
    out = texture.beer_lambert_rgb(conc, texture.StainParams(white_rgb=(1.0, 1.0, 1.0)))
    assert np.abs(out - src).mean() < 1.0
    # a site with stronger haematoxylin makes the same tissue darker/bluer
    strong = texture.beer_lambert_rgb(conc, texture.StainParams(white_rgb=(1.0, 1.0, 1.0), conc_scale=(1.3, 1.0)))
    assert strong[..., 0].mean() < out[..., 0].mean() - 5


def test_id_prefix_keeps_studies_apart_and_mixed_texture_alternates(tmp_path):
    """A later cohort generated with another seed gets ids of its own (predict flags training patients by id)."""
    kw = dict(n_cohorts=2, slides_per_cohort=2, slide_px=384, pair_fraction=0.5)
    a = synthesize(SynthConfig(out=str(tmp_path / "a"), seed=1, **kw))
    b = synthesize(SynthConfig(out=str(tmp_path / "b"), seed=2, id_prefix="ext-", texture="mixed", **kw))
    for col in ("slide_id", "patient_id", "cohort"):
        assert set(a[col]).isdisjoint(b[col]), col
        assert b[col].str.startswith("ext-").all(), col
    assert b["pair_id"].dropna().str.startswith("ext-pair").all() and b["pair_id"].notna().any()
    assert (tmp_path / "b" / b["uri"].iloc[0]).exists()
    originals = b[b["true_variant_of"].isna()]
    assert set(originals["true_texture"]) == {"real", "synthetic"}
    with pytest.raises(ValueError):
        SynthConfig(out=str(tmp_path / "c"), id_prefix="bad prefix/")
