"""Progress of a long step, the same way in a terminal, a log file and a notebook.

One line per step, in the style ``embed`` set::

    tile: 12/36 slides, 3.1 slides/s, ETA 8 s
    mil lodo: 24/60 epochs (held-out c1, repeat 1/2), 2.4 epochs/s, ETA 15 s

On a terminal (stderr is a TTY) the line is redrawn in place with a bar;
otherwise it is written every ``interval_s`` seconds and once at the end.
Without any logging configured (a plain ``python`` script or a notebook
calling the Python API) the lines go straight to stderr, so progress is
visible without ``logging.basicConfig``; with logging configured they are
INFO records of the ``raypath.progress`` logger (and follow its level).

``RAYPATH_PROGRESS`` overrides the choice: ``bar``, ``log`` or ``off``.

Example
-------
>>> with Progress("tile", total=36, unit="slides") as p:   # doctest: +SKIP
...     for row in rows:
...         tile_one(row)
...         p.update()
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")

log = logging.getLogger("raypath.progress")

#: seconds between log lines when stderr is not a terminal
DEFAULT_INTERVAL_S = 10.0
#: seconds between redraws of the terminal bar
_BAR_REDRAW_S = 0.1
_BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """``8 s``, ``2.5 min``, ``1.3 h``."""
    if seconds != seconds or seconds < 0:  # NaN
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_rate(per_s: float, unit: str) -> str:
    """``3.1 slides/s``; below one per second ``12 s/fit`` reads better."""
    if per_s <= 0:
        return f"? {unit}/s"
    if per_s < 1:
        return f"{1 / per_s:.1f} s/{unit[:-1] if unit.endswith('s') else unit}"
    return f"{per_s:.1f} {unit}/s" if per_s < 10 else f"{per_s:.0f} {unit}/s"


def stderr_is_terminal() -> bool:
    """Whether the user sees stderr in a terminal (see :mod:`raypath.io.quiet`)."""
    from raypath.io import quiet

    saved = quiet.saved_stderr_isatty()
    if saved is not None:
        return saved
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _mode() -> str:
    env = os.environ.get("RAYPATH_PROGRESS", "").strip().lower()
    if env in ("bar", "log", "off"):
        return env
    return "bar" if stderr_is_terminal() else "log"


class Progress:
    """Counts ``done`` of ``total`` units of a named step and reports rate and ETA.

    Parameters
    ----------
    stage
        Name printed first (``tile``, ``mil lodo``, ``sweep s1``).
    total
        Units in the whole step (``None`` when unknown: no ETA).
    unit
        Plural noun of a unit (``slides``, ``epochs``, ``trials``).
    interval_s
        Seconds between log lines when not on a terminal.
    stream
        Where the bar (and logger-less lines) go; default ``sys.stderr``.
    mode
        ``bar``, ``log`` or ``off``; default from ``RAYPATH_PROGRESS`` or the terminal.
    """

    def __init__(self, stage: str, total: int | None, unit: str = "slides", *,
                 interval_s: float = DEFAULT_INTERVAL_S, stream: IO[str] | None = None,
                 mode: str | None = None):
        self.stage, self.total, self.unit = stage, total, unit
        self.interval_s = interval_s
        self.stream = stream
        self.mode = mode or _mode()
        self.done = 0
        self.note = ""
        self._skipped = 0  # units done before this process started (resume): not part of the rate
        self.t0 = time.perf_counter()
        self._last_emit = self.t0
        self._closed = False
        self._drawn = False

    # ------------------------------------------------------------------ counting

    def update(self, n: int = 1, note: str | None = None) -> None:
        """``n`` more units are done; ``note`` replaces the bracketed detail."""
        self.done += n
        if note is not None:
            self.note = note
        self._maybe_emit()

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting one unit as each is handed on (``list(p.track(pool.map(f, jobs)))``)."""
        for item in items:
            yield item
            self.update()

    def skip(self, n: int) -> None:
        """``n`` units were already done (a resumed run): counted, not in the rate."""
        self.done += n
        self._skipped += n

    def set_note(self, note: str) -> None:
        self.note = note
        self._maybe_emit()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self) -> float:
        return (self.done - self._skipped) / max(self.elapsed_s, 1e-9)

    def line(self) -> str:
        """``stage: done/total unit (note), rate, ETA t``."""
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        head = f"{self.stage}: {count} {self.unit}" + (f" ({self.note})" if self.note else "")
        rate = self.rate()
        if self._closed:
            return f"{head} in {format_duration(self.elapsed_s)}, {format_rate(rate, self.unit)}"
        tail = f", {format_rate(rate, self.unit)}"
        if self.total is not None:
            left = max(self.total - self.done, 0)
            tail += f", ETA {format_duration(left / rate) if rate > 0 else '?'}"
        return head + tail

    # ------------------------------------------------------------------ output

    def _out(self) -> IO[str]:
        return self.stream or sys.stderr

    def _emit_line(self, text: str) -> None:
        if log.hasHandlers():
            log.info(text)
        else:  # nobody set up logging: a notebook or a plain script still sees it
            print(text, file=self._out(), flush=True)

    def _bar(self) -> str:
        if not self.total:
            return ""
        filled = int(_BAR_WIDTH * min(self.done / self.total, 1.0))
        return "[" + "#" * filled + "." * (_BAR_WIDTH - filled) + "] "

    def _draw(self) -> None:
        text = self._bar() + self.line()
        try:
            width = os.get_terminal_size(self._out().fileno()).columns - 1
        except (OSError, AttributeError, ValueError):
            width = 120
        self._out().write("\r" + text[:width].ljust(width))
        self._out().flush()
        self._drawn = True

    def _maybe_emit(self) -> None:
        if self.mode == "off" or self._closed:
            return
        now = time.perf_counter()
        if self.mode == "bar":
            if now - self._last_emit >= _BAR_REDRAW_S or not self._drawn:
                self._last_emit = now
                self._draw()
        elif now - self._last_emit >= self.interval_s:
            self._last_emit = now
            self._emit_line(self.line())

    def close(self, note: str | None = None) -> None:
        """Print the final line (count, time, rate) once."""
        if self._closed:
            return
        if note is not None:
            self.note = note
        self._closed = True
        if self.mode == "bar":
            self._draw()
            self._out().write("\n")
            self._out().flush()
        elif self.mode == "log":
            self._emit_line(self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.mode == "bar" and self._drawn:  # leave the terminal on a fresh line
            self._out().write("\n")
            self._closed = True


def tune_progress(stage: str, num_samples: int):
    """A Ray Tune callback printing ``sweep s1: 3/16 trials (2 running, 1 failed), ..., ETA``.

    Tune callbacks run in the driver, so the line is printed once, by the
    process the user watches.
    """
    from ray.tune import Callback

    class _TuneProgress(Callback):
        def __init__(self):
            self.progress = Progress(stage, num_samples, "trials")
            self.failed = 0

        def _note(self, trials) -> str:
            running = sum(1 for t in trials if t.status == "RUNNING")
            return f"{running} running" + (f", {self.failed} failed" if self.failed else "")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.progress.update(note=self._note(trials))

        def on_trial_error(self, iteration, trials, trial, **info):
            self.failed += 1
            self.progress.update(note=self._note(trials))

        def on_experiment_end(self, trials, **info):
            self.progress.close(note=f"{self.failed} failed" if self.failed else "")

    return _TuneProgress()
