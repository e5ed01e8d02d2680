"""``raypath embed``: features on disk equal to the plain computation, resumable, local == S3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from embed_helpers import grid_tiles, write_slide
from raypath.embed.api import EmbedConfig, TileEmbedder, derive_resources, embed
from raypath.errors import RaypathError
from raypath.embed.store import FeatureStore
from raypath.wsi.reader import read_tiles
from raypath.schemas import features_schema

MODEL = "tiny-vit"


def make_workdir(root: Path, n_synth: int = 2, corrupt: bool = False, stride_px: int | None = None,
                 cmu: Path | None = None, size=(900, 700)) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """slides.parquet + tiles.parquet for a few small slides (tiles written by hand, TILES schema)."""
    (root / "slides").mkdir(parents=True, exist_ok=True)
    slides, tiles = [], []
    if cmu is not None:
        shutil.copy(cmu, root / "slides" / "cmu.svs")
        slides.append(("cmu", str(root / "slides" / "cmu.svs"), "fp-cmu"))
        tiles.append(grid_tiles("cmu", 2220, 2967, stride_px=300))
    for i in range(n_synth):
        p = write_slide(root / "slides" / f"s{i}.svs", *size, seed=i)
        slides.append((f"s{i}", str(p), f"fp-s{i}"))
        tiles.append(grid_tiles(f"s{i}", *size, stride_px=stride_px))
    if corrupt:
        bad = root / "slides" / "bad.svs"
        bad.write_bytes((root / "slides" / "s0.svs").read_bytes()[:5000])
        slides.append(("bad", str(bad), "fp-bad"))
        tiles.append(grid_tiles("bad", *size))
    sdf = pd.DataFrame(slides, columns=["slide_id", "uri", "fingerprint"]).assign(status="ok", error=None)
    tdf = pd.concat(tiles, ignore_index=True)
    sdf.to_parquet(root / "slides.parquet")
    tdf.to_parquet(root / "tiles.parquet")
    return root, sdf, tdf


def direct_features(uri: str, tiles: pd.DataFrame, batch_size: int = 64,
                    prompts: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The same computation without Ray: reader + fixed-shape embedder, sorted by tile_id."""
    emb = TileEmbedder(MODEL, None, None, batch_size, device="cpu", num_threads=1, prompts=prompts)
    ids, feats = [], []
    for tid, imgs in read_tiles(uri, tiles, batch_tiles=batch_size):
        ids.append(tid)
        feats.append(emb.embed(imgs))
    ids, feats = np.concatenate(ids), np.concatenate(feats)
    o = np.argsort(ids)
    return ids[o], feats[o]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ray_session, cmu_slide):
    root, sdf, tdf = make_workdir(tmp_path_factory.mktemp("embed_local"), corrupt=True, cmu=cmu_slide)
    res = embed(EmbedConfig(workdir=str(root), model=MODEL, progress_interval_s=1))
    return root, sdf, tdf, res


def test_features_equal_the_plain_computation(local_run):
    root, sdf, tdf, res = local_run
    status = dict(zip(res.slides.slide_id, res.slides.status))
    assert status == {"cmu": "done", "s0": "done", "s1": "done", "bad": "failed"}
    fdir = Path(res.feature_dir)
    assert fdir == root / "features" / res.model_key and res.model_key.startswith("tiny-vit-")
    assert sorted(p.name for p in fdir.iterdir()) == ["cmu.parquet", "config.yaml", "manifest.json",
                                                      "s0.parquet", "s1.parquet"]
    store = FeatureStore(str(fdir))
    for sid in ("cmu", "s0", "s1"):
        t = pq.read_table(fdir / f"{sid}.parquet")
        assert t.schema.remove_metadata() == features_schema(64)
        tiles = tdf[tdf.slide_id == sid]
        uri = sdf.set_index("slide_id").loc[sid, "uri"]
        ids, feats = direct_features(uri, tiles)
        bag = store.load_bag(sid)
        assert np.array_equal(bag.tile_ids, ids) and np.array_equal(bag.tile_ids, np.sort(tiles.tile_id))
        assert np.array_equal(bag.features, feats.astype(np.float32))
        xy = tiles.set_index("tile_id").loc[ids, ["x", "y"]].to_numpy()
        assert np.array_equal(bag.coords, xy)
    m = json.loads((fdir / "manifest.json").read_text())
    assert m["model_key"] == res.model_key and m["weights_sha256"] == "random:0"
    assert set(m["slides"]) == {"cmu", "s0", "s1"} and "bad" in m["failed"]
    assert all(len(e["cache_key"]) == 64 for e in m["slides"].values())


def test_rerun_skips_and_force_redoes_deterministically(local_run):
    from raypath.cli import main

    root, sdf, tdf, res = local_run
    fdir = Path(res.feature_dir)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in fdir.glob("*.parquet")}
    again = embed(EmbedConfig(workdir=str(root), model=MODEL, slide_ids=["cmu", "s0", "s1"]))
    assert set(again.slides.status) == {"skipped"} and again.tiles_embedded == 0
    assert {p.name: p.stat().st_mtime_ns for p in fdir.glob("*.parquet")} == {k: v[0] for k, v in before.items()}
    # the CLI, forcing two slides while one's tiling changed: both redone, the third untouched
    t2 = tdf[~((tdf.slide_id == "s1") & (tdf.tile_id == 0))]
    t2.to_parquet(root / "tiles.parquet")
    try:
        rc = main(["embed", "--workdir", str(root), "--model", MODEL, "--slide-ids", "s0", "s1", "--force"])
    finally:
        tdf.to_parquet(root / "tiles.parquet")
    assert rc == 0
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in fdir.glob("*.parquet")}
    assert after["s0.parquet"][0] != before["s0.parquet"][0]
    assert after["s0.parquet"][1] == before["s0.parquet"][1]  # deterministic
    assert after["cmu.parquet"] == before["cmu.parquet"]
    assert len(FeatureStore(str(fdir)).load_bag("s1").tile_ids) == len(tdf[tdf.slide_id == "s1"]) - 1
    # back to the original tiling: only s1 is stale now
    r3 = embed(EmbedConfig(workdir=str(root), model=MODEL, slide_ids=["cmu", "s0", "s1"], force=False))
    assert dict(zip(r3.slides.slide_id, r3.slides.status)) == {"cmu": "skipped", "s0": "skipped", "s1": "done"}


def test_s3_inputs_and_outputs_equal_local(local_run, s3_server):
    root, sdf, tdf, res = local_run
    fs = s3_server.filesystem()
    bucket = s3_server.create_bucket("embed-test")
    wd = f"{bucket}/wd"
    s3df = sdf[sdf.slide_id != "bad"].copy()
    for r in s3df.itertuples():
        fs.put_file(r.uri, f"{wd}/slides/{r.slide_id}.svs")
    s3df["uri"] = [f"{wd}/slides/{s}.svs" for s in s3df.slide_id]
    fs.pipe_file(f"{wd}/slides.parquet", s3df.to_parquet())
    fs.pipe_file(f"{wd}/tiles.parquet", tdf[tdf.slide_id != "bad"].to_parquet())
    r = embed(EmbedConfig(workdir=wd, model=MODEL))
    assert set(r.slides.status) == {"done"} and r.model_key == res.model_key
    remote, local = FeatureStore(r.feature_dir), FeatureStore(res.feature_dir)
    assert r.feature_dir.startswith("s3://")
    for sid in ("cmu", "s0", "s1"):
        a, b = remote.load_bag(sid), local.load_bag(sid)
        assert np.array_equal(a.features, b.features) and np.array_equal(a.coords, b.coords)


@pytest.mark.slow  # a second driver process (imports + Ray Data start-up) and a resumed run
def test_killed_driver_resumes_with_each_slide_once(tmp_path, ray_session):
    root, sdf, tdf = make_workdir(tmp_path / "wd", n_synth=6, stride_px=112, size=(700, 560))
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        from raypath.embed.api import EmbedConfig, embed
        embed(EmbedConfig(workdir={str(root)!r}, model={MODEL!r}, batch_size=16))
    """))
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
               PYTHONPATH=str(Path(__file__).parent.parent))
    child = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    fdir = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and child.poll() is None:
            found = list((root / "features").glob("*/*.parquet")) if (root / "features").exists() else []
            if found:
                fdir = found[0].parent
                break
            time.sleep(0.02)
        assert fdir is not None, "the child run never wrote a slide"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    written_at_kill = {p.name for p in fdir.glob("*.parquet")}
    assert 1 <= len(written_at_kill) < 6, "kill landed after the run finished; slides too small?"
    res = embed(EmbedConfig(workdir=str(root), model=MODEL, batch_size=16))
    status = dict(zip(res.slides.slide_id, res.slides.status))
    assert all(status[Path(n).stem] == "skipped" for n in written_at_kill)
    assert sorted(status.values()).count("done") == 6 - len(written_at_kill)
    assert sorted(p.name for p in fdir.iterdir() if p.suffix == ".parquet") == [f"s{i}.parquet" for i in range(6)]
    assert not [p for p in fdir.iterdir() if ".tmp-" in p.name]
    m = json.loads((fdir / "manifest.json").read_text())
    assert sorted(m["slides"]) == [f"s{i}" for i in range(6)]
    store = FeatureStore(str(fdir))
    for sid in ("s0", "s5"):
        ids, feats = direct_features(sdf.set_index("slide_id").loc[sid, "uri"], tdf[tdf.slide_id == sid], 16)
        bag = store.load_bag(sid)
        assert np.array_equal(bag.tile_ids, ids) and np.array_equal(bag.features, feats.astype(np.float32))


def test_resources_are_derived_from_the_cluster(ray_session, tmp_path):
    n, gpus, cpus = derive_resources(EmbedConfig(workdir=str(tmp_path), model=MODEL))
    assert gpus == 0 and n >= 1 and cpus == 1
    with pytest.raises(RaypathError, match="no GPUs"):
        derive_resources(EmbedConfig(workdir=str(tmp_path), model=MODEL, num_gpus_per_actor=1))


def test_missing_inputs_and_bad_model_are_clear(tmp_path):
    with pytest.raises(RaypathError, match="raypath ingest"):
        embed(EmbedConfig(workdir=str(tmp_path), model=MODEL))
    with pytest.raises(RaypathError, match="Known models"):
        embed(EmbedConfig(workdir=str(tmp_path), model="univ2"))


def test_embed_with_pathotune_prompts_runs_on_ray(local_run, tmp_path):
    """`raypath embed --prompts FILE` through the Ray Data actor pool: the features are the tuned network's,
    the store is a separate one named by the prompt file's sha256."""
    import torch

    from raypath.fm.backbone import load_backbone
    from raypath.fm.pathotune import PathoTuneConfig, apply_pathotune, save_pathotune

    root, sdf, tdf, plain = local_run
    bb = load_backbone(MODEL)
    torch.manual_seed(0)
    tuned = apply_pathotune(bb, PathoTuneConfig(n_tokens=4, ttp=False, ivp=False), text_embedding=None)
    path = str(tmp_path / "prompts.safetensors")
    sha = save_pathotune(tuned, path)
    res = embed(EmbedConfig(workdir=str(root), model=MODEL, prompts=path, slide_ids=["s0"]))
    assert res.feature_dir != plain.feature_dir
    m = json.loads((Path(res.feature_dir) / "manifest.json").read_text())
    assert m.get("prompt_sha256") == sha or sha in json.dumps(m)
    bag = FeatureStore(str(res.feature_dir)).load_bag("s0")
    uri = sdf.set_index("slide_id").loc["s0", "uri"]
    ids, plain_feats = direct_features(uri, tdf[tdf.slide_id == "s0"])
    ids_t, tuned_feats = direct_features(uri, tdf[tdf.slide_id == "s0"], prompts=path)
    assert np.array_equal(bag.tile_ids, ids) and np.array_equal(ids, ids_t)
    assert not np.allclose(bag.features, plain_feats, atol=1e-3)  # the prompts changed the features
    np.testing.assert_allclose(bag.features, tuned_feats, atol=1e-5)  # ... into the tuned network's
