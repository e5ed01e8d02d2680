"""Quiet logs: only lines a user should act on reach the terminal.

Each silencer names the exact message it removes and why it is harmless, so
nothing else is hidden:

- :func:`configure_cli_logging` -- ``-v`` turns on raypath's debug lines, not
  matplotlib's font search, PIL's PNG chunks or numexpr's thread count.
- :func:`quiet_ray_data` -- Ray Data warns "Progress bars disabled" once per
  process because raypath disables its bars on purpose (raypath prints its
  own progress, :mod:`raypath.io.progress`).
- :func:`drop_stderr_lines` -- Ray 2.60's core worker logs an ERROR for every
  Ray Data actor pool ("constructor arguments in the object store and
  max_restarts > 0", ray-project/ray#57733): the arguments are Ray Data's own
  driver-owned references, which live as long as the driver, so actor restarts
  after a worker-node loss still work.  The line is written by C++ straight to
  file descriptor 2, so it is dropped there, only while an actor pool starts
  (``embed``); every other byte is passed on at once.  It stays in Ray's
  ``python-core-driver-*.log``.
- :func:`hub_reachable` -- without a network, ``huggingface_hub`` retries for
  about a minute before failing; one 3-second probe decides ``HF_HUB_OFFLINE``
  instead, so a missing model fails at once with its remedy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import threading
from typing import Iterator
from urllib.parse import urlparse

log = logging.getLogger(__name__)

#: the upstream false alarm of every Ray Data actor pool (ray-project/ray#57733)
RAY_ACTOR_ARGS_NOTICE = re.compile(rb"constructor arguments in the object store and max_restarts > 0")

_saved_isatty: bool | None = None  # stderr's terminal-ness while fd 2 is a pipe


def saved_stderr_isatty() -> bool | None:
    """Whether stderr was a terminal before :func:`drop_stderr_lines` replaced it (else None)."""
    return _saved_isatty


# --------------------------------------------------------------------------- Python logging


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_ray_data() -> None:
    """Drop Ray Data's "Progress bars disabled" warnings (raypath disables them on purpose)."""
    lg = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _DropMessages) for f in lg.filters):
        lg.addFilter(_DropMessages("Progress bars disabled", "Progress bars for operators disabled"))


#: third-party loggers that print pages of debug detail nobody asked for with ``-v``
_NOISY_LOGGERS = {"matplotlib": logging.WARNING, "PIL": logging.INFO, "numexpr": logging.WARNING,
                  "fsspec": logging.INFO, "s3fs": logging.INFO, "botocore": logging.INFO,
                  "urllib3": logging.INFO, "asyncio": logging.INFO, "filelock": logging.INFO,
                  "h5py": logging.INFO}


def configure_cli_logging(verbose: bool = False) -> None:
    """Logging of the ``raypath`` command: INFO lines, ``-v`` adds raypath's DEBUG lines."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # third-party libraries stay at INFO under -v; only raypath's own debug lines are added
    logging.getLogger("raypath").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name, level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    quiet_ray_data()


# --------------------------------------------------------------------------- file descriptor 2


def _pump(read_fd: int, write_fd: int, pattern: re.Pattern) -> None:
    """Copy ``read_fd`` to ``write_fd`` chunk by chunk, minus the lines matching ``pattern``;
    closes both at the end of the input."""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        if pattern.search(chunk):
            chunk = b"".join(ln for ln in chunk.splitlines(keepends=True) if not pattern.search(ln))
        view = memoryview(chunk)
        while view:
            try:
                view = view[os.write(write_fd, view):]
            except OSError:
                view = view[:0]
    os.close(read_fd)
    os.close(write_fd)


@contextlib.contextmanager
def drop_stderr_lines(pattern: re.Pattern = RAY_ACTOR_ARGS_NOTICE) -> Iterator[None]:
    """While inside, lines written to file descriptor 2 that match ``pattern`` are dropped.

    Everything else is forwarded as soon as it is written.  Disabled by
    ``RAYPATH_STDERR_FILTER=0`` and where fd 2 cannot be duplicated.
    """
    global _saved_isatty
    if os.environ.get("RAYPATH_STDERR_FILTER", "1") == "0" or _saved_isatty is not None:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_fd, write_fd = os.pipe()
    except (OSError, AttributeError, ValueError):
        yield
        return
    _saved_isatty = os.isatty(saved)
    # the pump owns its own copy of the target: it may outlive this block if a child holds the pipe
    pump = threading.Thread(target=_pump, args=(read_fd, os.dup(saved), pattern), name="raypath-stderr",
                            daemon=True)
    pump.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump drains and stops
        pump.join(timeout=2.0)
        os.close(saved)
        _saved_isatty = None


# --------------------------------------------------------------------------- Hugging Face


_hub_cache: dict[str, bool] = {}


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint (``HF_ENDPOINT``) accepts a TCP connection."""
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if url not in _hub_cache:
        u = urlparse(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            with socket.create_connection((u.hostname or "huggingface.co", port), timeout=timeout_s):
                _hub_cache[url] = True
        except OSError:
            _hub_cache[url] = False
    return _hub_cache[url]


def offline_unless_hub_reachable() -> bool:
    """Set ``HF_HUB_OFFLINE=1`` when the hub cannot be reached; returns whether offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    if hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    log.info("no connection to %s: HF_HUB_OFFLINE=1 (weights come from the local cache only)",
             os.environ.get("HF_ENDPOINT") or "huggingface.co")
    return True
