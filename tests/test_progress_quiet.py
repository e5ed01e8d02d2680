"""Progress lines (rate, ETA; bar on a terminal, lines otherwise) and quiet logs."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time

import pytest

from raypath.io import quiet
from raypath.io.progress import Progress, format_duration, format_rate


def test_formats():
    assert format_duration(8.2) == "8 s" and format_duration(150) == "2.5 min" and format_duration(5400) == "1.5 h"
    assert format_rate(3.14, "slides") == "3.1 slides/s"
    assert format_rate(42.0, "tiles") == "42 tiles/s"
    assert format_rate(0.1, "fits") == "10.0 s/fit"


def test_line_has_count_rate_and_eta(monkeypatch):
    p = Progress("tile", 36, "slides", mode="off")
    p.t0 -= 4.0  # 12 slides in 4 s: 3 slides/s, 24 left: ETA 8 s
    p.update(12)
    assert re.fullmatch(r"tile: 12/36 slides, 3\.0 slides/s, ETA 8 s", p.line()), p.line()
    p.update(24, note="2 failed")
    p.close()
    assert p.line().startswith("tile: 36/36 slides (2 failed) in 4 s, ")


def test_resumed_units_do_not_inflate_the_rate():
    p = Progress("mil lodo", 60, "epochs", mode="off")
    p.skip(30)
    p.t0 -= 10.0
    p.update(20)
    assert "2.0 epochs/s" in p.line() and "ETA 5 s" in p.line()


def test_log_mode_prints_without_logging_configured():
    """A notebook or plain script sees progress although nobody called logging.basicConfig."""
    code = ("from raypath.io.progress import Progress\n"
            "with Progress('tile', 3, 'slides', interval_s=0) as p:\n"
            "    for _ in range(3): p.update()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "RAYPATH_PROGRESS": ""}, timeout=60)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("tile: ")]
    assert len(lines) == 4 and lines[0].startswith("tile: 1/3 slides") and " in " in lines[-1], out.stderr


def test_log_mode_uses_logging_when_configured(caplog):
    with caplog.at_level(logging.INFO, logger="raypath.progress"):
        with Progress("ingest", 2, "slides", interval_s=0, mode="log") as p:
            p.update()
            p.update()
    msgs = [r.getMessage() for r in caplog.records if r.name == "raypath.progress"]
    assert msgs[0].startswith("ingest: 1/2 slides") and msgs[-1].startswith("ingest: 2/2 slides in")


def test_bar_mode_redraws_in_place():
    buf = io.StringIO()
    with Progress("synth", 4, "slides", stream=buf, mode="bar") as p:
        for _ in range(4):
            p.update()
            time.sleep(0.11)
    text = buf.getvalue()
    assert text.count("\r") >= 4 and text.endswith("\n")
    assert "[########################] synth: 4/4 slides in" in text


def test_stderr_filter_drops_only_the_ray_false_alarm(capfd):
    with quiet.drop_stderr_lines():
        assert quiet.saved_stderr_isatty() is not None
        os.write(2, b"[2026 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(X)' has "
                    b"constructor arguments in the object store and max_restarts > 0. If ...\n")
        os.write(2, b"a real error line\n")
        print("python stderr", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert "constructor arguments" not in err
    assert "a real error line" in err and "python stderr" in err
    assert quiet.saved_stderr_isatty() is None


def test_ray_data_progress_warning_filtered(caplog):
    quiet.quiet_ray_data()
    lg = logging.getLogger("ray.data._internal.progress")
    with caplog.at_level(logging.WARNING):
        lg.warning("Progress bars disabled. To enable, set ...")
        lg.warning("something else")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["something else"]


def test_cli_verbose_keeps_matplotlib_quiet():
    quiet.configure_cli_logging(verbose=True)
    assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("raypath.anything").isEnabledFor(logging.DEBUG)


def test_offline_fails_fast(monkeypatch):
    """No network: one probe sets HF_HUB_OFFLINE instead of a minute of retries."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    quiet._hub_cache.clear()
    t0 = time.perf_counter()
    assert quiet.offline_unless_hub_reachable() is True
    assert os.environ["HF_HUB_OFFLINE"] == "1" and time.perf_counter() - t0 < 5
    monkeypatch.delenv("HF_HUB_OFFLINE")


@pytest.mark.parametrize("mode", ["off"])
def test_env_override(monkeypatch, mode):
    monkeypatch.setenv("RAYPATH_PROGRESS", mode)
    assert Progress("x", 1).mode == mode
