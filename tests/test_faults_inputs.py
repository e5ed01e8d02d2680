"""Bad input, bad files, secrets and the cluster's life (issue 13): one regression test per item.

Each test fails on the code before the fix: a traceback or exit 1 for a bad flag, a
secret in Ray's logs, a KeyError taken for a codec problem, damaged JPEG data decoded
silently, a Ray cluster left behind by a killed driver, a wait without end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from fuzz_slides import layout
from raypath import cli
from raypath.errors import RaypathError, StorageUnavailable
from raypath.wsi.ingest import IngestConfig, inspect_slide

PYDANTIC_URL = "errors.pydantic.dev"


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors (unknown choice, not a number)
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


# --------------------------------------------------------------------------- 5: bad options, bad --config


@pytest.mark.parametrize("argv, flag", [
    (["embed", "--workdir", "w", "--model", "tiny-vit", "--batch-size", "-1"], "--batch-size"),
    (["embed", "--workdir", "w", "--model", "tiny-vit", "--num-actors", "0"], "--num-actors"),
    (["embed", "--workdir", "w", "--model", "tiny-vit", "--read-threads", "0"], "--read-threads"),
    (["embed", "--workdir", "w"], "--model"),
    (["tile", "--workdir", "w", "--tile-px", "2"], "--tile-px"),
    (["ingest", "--workdir", "w", "--s3-cache-type", "nosuch"], "--s3-cache-type"),
    (["tile", "--workdir", "w", "--s3-retry-total-s", "-1"], "--s3-retry-total-s"),
])
def test_invalid_values_are_one_sentence_exit_2(argv, flag, capsys):
    rc, err = _cli(argv, capsys)
    assert rc == 2, err
    assert flag in err and "Traceback" not in err and PYDANTIC_URL not in err, err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1, err


CONFIG_VERBS = ["ingest", "tile", "embed", "mil", "robustness", "sweep", "adapt", "synth", "demo"]


@pytest.mark.parametrize("verb", CONFIG_VERBS)
@pytest.mark.parametrize("content, says", [
    (None, "no such file"),
    ("a: [1\n", "not valid YAML"),
    ("- 1\n- 2\n", "not a mapping"),
    ("workdir: w\nbatch_sise: 3\n", "unknown option `batch_sise`"),
])
def test_config_file_problems_on_every_verb(verb, content, says, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    if content is not None:
        cfg.write_text(content)
    rc, err = _cli([verb, "--config", str(cfg)], capsys)
    assert rc == 2 and says in err and str(cfg) in err, err
    assert "Traceback" not in err and PYDANTIC_URL not in err, err


# --------------------------------------------------------------------------- 13: bucket names


@pytest.mark.parametrize("name", ["b", "My_Bucket", "a..b", "192.168.0.1", "xn--bucket", "-dash"])
def test_s3_serve_rejects_bucket_names_s3_rejects(name, tmp_path, capsys):
    rc, err = _cli(["s3", "serve", str(tmp_path), f"--bucket={name}"], capsys)
    assert rc == 2 and "not a valid S3 bucket name" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- 1: secrets never through Ray


def test_submit_refuses_a_secret_in_the_job_environment(capsys, tmp_path):
    rc, err = _cli(["submit", "--address", "http://127.0.0.1:9", "--env", "HF_TOKEN=hf_marker", "--",
                    "raypath", "--help"], capsys)
    assert rc == 2 and "HF_TOKEN" in err and "hf_marker" not in err, err
    env = tmp_path / "env.yaml"
    env.write_text("env_vars:\n  AWS_SECRET_ACCESS_KEY: marker\n")
    rc, err = _cli(["submit", "--address", "http://127.0.0.1:9", "--runtime-env", str(env), "--",
                    "raypath", "--help"], capsys)
    assert rc == 2 and "AWS_SECRET_ACCESS_KEY" in err and "marker" not in err, err


def test_shipped_job_specs_carry_no_secret():
    from raypath.io.storage import _is_secret_key
    from raypath.submit import _VAR, load_job_spec

    for spec in sorted(Path(__file__).parents[1].glob("jobs/*.yaml")):
        if spec.name.startswith("runtime_env"):
            continue
        names = set(_VAR.findall(spec.read_text()))
        env = load_job_spec(spec, {n: "x" for n in names}).runtime_env.get("env_vars", {})
        assert not [k for k in env if _is_secret_key(k)], spec


def test_secrets_reach_no_ray_log_config_report_or_output(tmp_path, s3_server, cmu_slide):
    """A whole run (local Ray started by raypath, slides on S3) with marker secrets in the
    environment; the markers appear nowhere: Ray's session logs, saved configs, reports, output."""
    secret, token = "AWSSECRETMARKER123", "hf_TOKENMARKER456"
    s3_server.create_bucket("secrets")
    s3_server.filesystem().put_file(str(cmu_slide), "secrets/cmu.svs")
    pd.DataFrame({"slide_id": ["cmu"], "uri": ["s3://secrets/cmu.svs"], "patient_id": ["p"],
                  "cohort": ["c"]}).to_csv(tmp_path / "cohort.csv", index=False)
    ray_tmp = tempfile.mkdtemp(prefix="rp13-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=secret, HF_TOKEN=token, RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    work = tmp_path / "work"
    script = textwrap.dedent(f"""
        from raypath import cli
        assert cli.main(["ingest", "--workdir", {str(work)!r}, "--cohort", {str(tmp_path / "cohort.csv")!r}]) == 0
        assert cli.main(["report", "--workdir", {str(work)!r}]) == 0
    """)
    try:
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        sessions = list(Path(ray_tmp).glob("ray/session_2*"))
        assert sessions, "the run did not start its own Ray"
        logs = [p for s in sessions for p in s.rglob("*") if p.is_file()]
        assert any(p.name.startswith("runtime_env") for p in logs)  # the log that used to hold them
        files = logs + [p for p in work.rglob("*") if p.is_file()]
        for p in files:
            data = p.read_bytes()
            assert secret.encode() not in data and token.encode() not in data, p
        assert secret not in out.stdout + out.stderr and token not in out.stdout + out.stderr
    finally:
        subprocess.run(["rm", "-rf", ray_tmp])


# --------------------------------------------------------------------------- 12: the cluster's life


def test_attached_cluster_gets_no_watcher(monkeypatch):
    import ray

    from raypath.io import ray_env

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray_env, "start_watcher", lambda *a: calls.append("watcher"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ray_env.ensure_ray()
    assert "watcher" not in calls and "num_cpus" not in calls[0]
    monkeypatch.delenv("RAY_ADDRESS")
    ray_env.ensure_ray()
    assert calls[-1] == "watcher"


def test_killed_driver_leaves_no_ray_process(tmp_path):
    """The dashboard and runtime-env agents used to survive a SIGKILL of the driver."""
    import psutil

    script = textwrap.dedent("""
        import os, sys, time
        from raypath.io.ray_env import ensure_ray
        ray = ensure_ray(num_cpus=1)
        print(os.getpid(), flush=True)
        time.sleep(600)
    """)
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="rp13-", dir="/tmp"))
    env.pop("RAY_ADDRESS", None)
    drv = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        drv.stdout.readline()
        time.sleep(2)
        tree = [p for p in psutil.Process(drv.pid).children(recursive=True)]
        names = " ".join(p.name() for p in tree)
        assert "raylet" in names and any("watch" in " ".join(p.cmdline()) for p in tree), names
        drv.send_signal(signal.SIGKILL)
        drv.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.is_running() and p.status() != "zombie" for p in tree):
            time.sleep(0.5)
        left = [f"{p.pid} {p.name()}" for p in tree if p.is_running() and p.status() != "zombie"]
        assert not left, left
    finally:
        if drv.poll() is None:
            drv.kill()
        subprocess.run(["rm", "-rf", env["RAY_TMPDIR"]])


# --------------------------------------------------------------------------- 4: resources that can never come


def test_resource_requests_beyond_the_cluster_fail_fast(ray_session, tmp_path):
    from raypath.embed.api import EmbedConfig, derive_resources

    cpus = int(ray_session.cluster_resources()["CPU"])
    with pytest.raises(RaypathError, match=r"--num-actors \d+ x --num-cpus-per-actor 1 needs .* use --num-actors"):
        derive_resources(EmbedConfig(workdir=str(tmp_path), model="tiny-vit", num_actors=cpus + 3))
    with pytest.raises(RaypathError, match="largest node .* has .* CPUs"):
        derive_resources(EmbedConfig(workdir=str(tmp_path), model="tiny-vit", num_cpus_per_actor=64))


def test_autoscaling_cluster_is_judged_by_its_maximum(monkeypatch):
    from raypath.io import ray_env

    cap = {"total": {"CPU": 64.0, "GPU": 8.0}, "largest_node": {"CPU": 16.0, "GPU": 4.0}, "autoscaling": True}
    monkeypatch.setattr(ray_env, "cluster_capacity", lambda: cap)
    ray_env.check_actor_resources(8, 4, 1)  # not up now, but within the configured maximum
    with pytest.raises(RaypathError, match="configured maximum of the autoscaling cluster"):
        ray_env.check_actor_resources(9, 4, 1)
    with pytest.raises(RaypathError, match="GPUs"):
        ray_env.check_actor_resources(2, 1, 8)


# --------------------------------------------------------------------------- 6: weights checked on the driver


def test_bad_weights_fail_on_the_driver_before_ray(tmp_path, monkeypatch):
    import raypath.embed.api as api
    from raypath.embed.api import EmbedConfig, embed

    monkeypatch.setattr(api, "plan_embed", lambda *a, **k: pytest.fail("planned a run with bad weights"))
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(100))
    with pytest.raises(RaypathError, match="not a readable .safetensors file"):
        embed(EmbedConfig(workdir=str(tmp_path), model="tiny-vit", weights=str(bad)))
    other = tmp_path / "other.bin"
    import torch

    torch.save({"head.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(RaypathError, match="do not match model 'tiny-vit'"):
        embed(EmbedConfig(workdir=str(tmp_path), model="tiny-vit", weights=str(other)))
    assert not (tmp_path / "features").exists()


# --------------------------------------------------------------------------- 8, 9: verdicts by cause at ingest


def _cmu_variant(tmp_path: Path, cmu: Path, name: str, edit) -> str:
    b = bytearray(cmu.read_bytes())
    edit(b, layout(bytes(b)))
    p = tmp_path / f"{name}.svs"
    p.write_bytes(bytes(b))
    return str(p)


def _verdict(uri: str) -> str:
    out = inspect_slide({"uri": uri}, IngestConfig(workdir="x", use_ray=False))
    return out["error"] or "ok"


def test_cut_inside_the_image_description_is_truncated_not_no_mpp(tmp_path, cmu_slide):
    lay = layout(cmu_slide.read_bytes())
    off, n = lay.description
    p = tmp_path / "cut.svs"
    p.write_bytes(cmu_slide.read_bytes()[: off + n // 2])
    v = _verdict(str(p))
    assert v.startswith("truncated:") and "copy it again" in v, v


def test_header_claiming_more_pixels_than_stored_tiles_is_corrupt(tmp_path, cmu_slide):
    def wide(b, lay):
        e, dtype, count, voff = lay.tags[256]
        struct.pack_into(lay.byteorder + {3: "H", 4: "I"}[dtype], b, voff, 65535)
    v = _verdict(_cmu_variant(tmp_path, cmu_slide, "wide", wide))
    assert v.startswith("corrupt_structure:") and "65535" in v and "130" in v, v


def test_a_lying_compression_tag_is_not_a_missing_codec(tmp_path, cmu_slide):
    def j2k(b, lay):
        e, dtype, count, voff = lay.tags[259]
        struct.pack_into(lay.byteorder + "H", b, voff, 34712)
    v = _verdict(_cmu_variant(tmp_path, cmu_slide, "j2k", j2k))
    assert v.startswith("corrupt_structure:") and "JPEG" in v and "vips" not in v, v


def test_damaged_tile_data_is_corrupt_tile_data_with_its_remedy(tmp_path, cmu_slide):
    def flips(b, lay):
        rng = np.random.default_rng(0)
        for o, n in zip(lay.tile_offsets[::3], lay.tile_bytes[::3]):  # a third of the stored tiles
            for i in rng.integers(o + n // 4, o + n - 4, 6):
                b[int(i)] ^= 0x10
    v = _verdict(_cmu_variant(tmp_path, cmu_slide, "flips", flips))
    assert v.startswith("corrupt_tile_data:") and "copy the file again" in v, v


# --------------------------------------------------------------------------- 9: damaged tiles recorded by the reader


def test_reader_records_every_tile_built_from_a_damaged_stored_tile(tmp_path, cmu_slide):
    from embed_helpers import grid_tiles
    from raypath.wsi.reader import read_tiles

    data = bytearray(cmu_slide.read_bytes())
    lay = layout(bytes(data))
    o, n = int(lay.tile_offsets[44]), int(lay.tile_bytes[44])  # stored tile (row 4, col 4) of 10 x 13
    data[o + n // 2 : o + n // 2 + 2] = b"\xff\xd9"  # an end-of-image marker inside the scan: libjpeg only warns
    bad = tmp_path / "bad.svs"
    bad.write_bytes(bytes(data))
    tiles = grid_tiles("bad", 2220, 2967, read_px=224)
    damaged: dict[int, str] = {}
    list(read_tiles(str(bad), tiles, batch_tiles=32, damaged=damaged))
    want = {int(t.tile_id) for t in tiles.itertuples() if t.x < 1200 and t.x + 224 > 960 and t.y < 1200
            and t.y + 224 > 960}
    assert set(damaged) == want and want, (sorted(damaged), sorted(want))
    assert all(m.startswith("corrupt_tile_data: stored tile 44 of level 0") for m in damaged.values())
    clean: dict[int, str] = {}
    list(read_tiles(str(cmu_slide), tiles, batch_tiles=32, damaged=clean))
    assert clean == {}


# --------------------------------------------------------------------------- 10: exit codes, failures by cause


def test_ingest_exit_3_when_some_slides_failed_with_counts_by_cause(tmp_path, cmu_slide, capsys):
    (tmp_path / "empty.svs").write_bytes(b"")
    pd.DataFrame({"slide_id": ["ok", "gone", "empty"], "uri": [str(cmu_slide), "nope.svs", "empty.svs"],
                  "patient_id": ["a", "b", "c"], "cohort": ["x"] * 3}).to_csv(tmp_path / "c.csv", index=False)
    rc = cli.main(["ingest", "--workdir", str(tmp_path / "w"), "--cohort", str(tmp_path / "c.csv"), "--no-use-ray"])
    out = capsys.readouterr().out
    assert rc == 3, out
    assert "failures by cause: empty_file 1, not_found 1" in out, out


def test_readme_has_the_exit_code_table():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    for code, words in ((0, "ok"), (2, "bad input"), (3, "some slides failed"), (4, "storage unavailable")):
        assert re.search(rf"\|\s*`?{code}`?\s*\|[^\n]*{words}", text, re.I), (code, words)


# --------------------------------------------------------------------------- 2, 3: an outage is the endpoint's, within bounds


@pytest.fixture()
def child_endpoint(tmp_path):
    folder = tmp_path / "srv"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(os.urandom(300_000))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "raypath.cli", "s3", "serve", str(folder), "--bucket", "blobs",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("stop with"):
            break
    yield proc, f"http://127.0.0.1:{port}"
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_one_request_gives_up_within_the_budget_and_blames_the_endpoint(child_endpoint, fault, monkeypatch, caplog):
    from raypath.io import s3guard
    from raypath.io.storage import S3Options, as_outage, filesystem_for

    proc, url = child_endpoint
    monkeypatch.setattr(s3guard, "STALL_LOG_S", 1.0)
    read_s = 2.0 if fault == "kill" else 4.0  # frozen: long enough for a stall log line (1 s here, 30 s by default)
    s3 = S3Options(endpoint_url=url, retry_total_s=3.0, connect_timeout_s=1.0, read_timeout_s=read_s)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    fs = filesystem_for("s3://blobs", s3)
    assert len(fs.cat_file("blobs/blob.bin", start=0, end=10)) == 10
    if fault == "kill":
        proc.kill()
        proc.wait()
    else:
        os.kill(proc.pid, signal.SIGSTOP)
    t = time.monotonic()
    with pytest.raises(Exception) as e:
        fs.cat_file("blobs/blob.bin", start=100, end=200)
    took = time.monotonic() - t
    outage = as_outage(e.value, s3)
    assert isinstance(outage, StorageUnavailable) and url in str(outage), e.value
    assert took < 3.0 + read_s + 1.0 + 3.0, took  # budget + one attempt's timeouts + slack
    if fault == "freeze":  # a request waiting without an answer is reported in the log
        assert any("no progress for" in r.getMessage() and url in r.getMessage() for r in caplog.records)


def test_endpoint_down_before_the_run_is_found_by_the_probe(child_endpoint, tmp_path, monkeypatch, capsys):
    proc, url = child_endpoint
    proc.kill()
    proc.wait()
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                 "RAYPATH_S3_RETRY_TOTAL_S": "2", "RAYPATH_S3_CONNECT_TIMEOUT_S": "1"}.items():
        monkeypatch.setenv(k, v)
    pd.DataFrame({"slide_id": ["a"], "uri": ["s3://blobs/a.svs"], "patient_id": ["p"], "cohort": ["c"]}).to_csv(
        tmp_path / "c.csv", index=False)
    t = time.monotonic()
    rc, err = _cli(["ingest", "--workdir", str(tmp_path / "w"), "--cohort", str(tmp_path / "c.csv"),
                    "--no-use-ray"], capsys)
    assert rc == 4 and url in err and "probe of bucket 'blobs'" in err, err
    assert time.monotonic() - t < 15 and not (tmp_path / "w" / "slides.parquet").exists()
