"""Storage outages: the S3 endpoint (raypath's moto server, ``raypath s3 serve``) runs as a
child process and is killed or frozen (SIGSTOP) while ``tile`` and ``embed`` read slides
from it.  Each run stops with exit 4 and one message naming the endpoint, within the
configured retry budget and timeouts; no healthy slide is marked failed; after recovery
the same commands finish every slide exactly once.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tiny_slides import tissue_slide
from raypath import cli

RETRY_S, CONNECT_S, READ_S = 3.0, 1.0, 1.0
#: retry budget + one attempt's timeouts + Ray's own propagation of a failed task (loaded 2-core CI)
BOUND_S = RETRY_S + CONNECT_S + READ_S + 30.0
STORAGE_FLAGS = ["--s3-retry-total-s", str(RETRY_S), "--s3-connect-timeout-s", str(CONNECT_S),
                 "--s3-read-timeout-s", str(READ_S)]
N_SLIDES = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """``raypath s3 serve DIR`` as a child process (in memory: a restart re-uploads DIR)."""

    def __init__(self, folder: Path, bucket: str):
        self.folder, self.bucket, self.port = folder, bucket, _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.slide_reads = 0  # GETs of slide objects, counted from the server's request log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raypath.cli", "s3", "serve", str(self.folder), "--bucket", self.bucket,
             "--port", str(self.port), "--log-requests"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        for line in self.proc.stdout:
            if line.startswith("stop with"):
                threading.Thread(target=self._count, args=(self.proc.stdout,), daemon=True).start()
                return
        raise RuntimeError("the S3 endpoint did not start")

    def _count(self, stream) -> None:
        for line in stream:
            if re.search(r'GET /' + self.bucket + r'/\S+\.svs', line):
                self.slide_reads += 1

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


class Fault:
    """Applies ``action`` once, as soon as ``ready()`` is true, from a background thread."""

    def __init__(self, ready, action):
        self.at: float | None = None
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                if ready():
                    action()
                    self.at = time.monotonic()
                    return
                time.sleep(0.02)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def done(self) -> None:
        self._stop.set()
        self.thread.join(5)


class _LogFlag(logging.Handler):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern, self.seen = re.compile(pattern), threading.Event()

    def emit(self, record):
        if self.pattern.search(record.getMessage()):
            self.seen.set()


@pytest.fixture()
def outage_env(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(N_SLIDES):
        tissue_slide(src / f"s{i}.svs", seed=i)
    ep = Endpoint(src, "slides")
    ep.start()
    for k, v in {"AWS_ENDPOINT_URL": ep.url, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                 "AWS_DEFAULT_REGION": "us-east-1", "RAYPATH_S3_RETRY_TOTAL_S": str(RETRY_S),
                 "RAYPATH_S3_CONNECT_TIMEOUT_S": str(CONNECT_S), "RAYPATH_S3_READ_TIMEOUT_S": str(READ_S),
                 "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
                 "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}.items():
        monkeypatch.setenv(k, v)
    cohort = pd.DataFrame({"slide_id": [f"s{i}" for i in range(N_SLIDES)],
                           "uri": [f"s3://slides/s{i}.svs" for i in range(N_SLIDES)]})
    cohort["patient_id"], cohort["cohort"] = cohort["slide_id"], "c"
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    work = tmp_path / "work"
    yield ep, work
    if ep.proc.poll() is None:
        ep.thaw()
        ep.kill()


def _run(argv, capsys) -> tuple[int, str, str, float]:
    t = time.monotonic()
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err, t


def _assert_outage(rc, err, fault: Fault, ep: Endpoint, verb: str) -> None:
    fault.done()
    took = time.monotonic() - fault.at
    assert rc == 4, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"raypath {verb}: error:")]
    assert len(lines) == 1 and ep.url in lines[0] and "re-run the same command" in lines[0], err[-2000:]
    assert took < BOUND_S, f"{verb} took {took:.1f} s after the fault (bound {BOUND_S:.0f} s)"
    print(f"{verb}: exit 4 {took:.1f} s after the fault")  # shown with -s


def _parts(work: Path) -> list[Path]:
    d = work / "tiles.parquet"
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


def test_endpoint_killed_and_frozen_during_tile_and_embed(outage_env, ray_session, capsys):
    ep, work = outage_env
    w = str(work)
    rc, out, err, _ = _run(["ingest", "--workdir", w, "--cohort", str(work.parent / "cohort.csv"),
                            "--no-use-ray", *STORAGE_FLAGS], capsys)
    assert rc == 0, err

    # -- tile: killed after the first slide's tiles are written, then frozen likewise
    for action, recover in ((ep.kill, ep.start), (ep.freeze, ep.thaw)):
        shutil.rmtree(work / "tiles.parquet", ignore_errors=True)
        fault = Fault(lambda: len(_parts(work)) >= 1, action)
        rc, out, err, _ = _run(["tile", "--workdir", w, "--no-qc", *STORAGE_FLAGS], capsys)
        _assert_outage(rc, err, fault, ep, "tile")
        assert not (work / "tiling_summary.parquet").exists()  # nothing recorded as failed
        recover()
        time.sleep(RETRY_S)  # the give-up cool-down (at most the retry budget) passes
    rc, out, err, _ = _run(["tile", "--workdir", w, "--no-qc", *STORAGE_FLAGS], capsys)
    assert rc == 0, err
    summary = pd.read_parquet(work / "tiling_summary.parquet")
    assert (summary["status"] == "ok").all(), summary
    tiles = pd.read_parquet(work / "tiles.parquet")
    assert sorted(tiles["slide_id"].unique()) == [f"s{i}" for i in range(N_SLIDES)]
    assert not tiles.duplicated(["slide_id", "tile_id"]).any()

    # -- embed: killed, then frozen, once the read tasks are reading slides; then the run that finishes
    flag = _LogFlag(r"actor\(s\) x")  # the pipeline is starting (the probe before it has passed)
    logging.getLogger("raypath.embed.api").addHandler(flag)
    try:
        for action, recover in ((ep.kill, ep.start), (ep.freeze, ep.thaw)):
            flag.seen.clear()
            base = ep.slide_reads
            fault = Fault(lambda: flag.seen.is_set() and ep.slide_reads > base, action)
            rc, out, err, _ = _run(["embed", "--workdir", w, "--model", "tiny-vit", *STORAGE_FLAGS], capsys)
            _assert_outage(rc, err, fault, ep, "embed")
            recover()
            time.sleep(RETRY_S)
    finally:
        logging.getLogger("raypath.embed.api").removeHandler(flag)
    rc, out, err, _ = _run(["embed", "--workdir", w, "--model", "tiny-vit", *STORAGE_FLAGS], capsys)
    assert rc == 0, err
    counts = dict(re.findall(r"(\w+) (\d+)", re.search(r"^slides: (.*)$", out, re.M).group(1)))
    assert int(counts.get("done", 0)) + int(counts.get("skipped", 0)) == N_SLIDES and "failed" not in counts, out
    feats = sorted((work / "features").glob("*/s*.parquet"))
    assert [p.stem for p in feats] == [f"s{i}" for i in range(N_SLIDES)]
    for p in feats:  # each slide once, complete
        got = pd.read_parquet(p)
        assert got["tile_id"].is_unique and len(got) == (tiles["slide_id"] == p.stem).sum()
