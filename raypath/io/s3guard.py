"""S3 that fails clearly: bounded retries, timeouts, and telling an outage from a bad file.

Every S3 client raypath creates (:class:`GuardedS3FileSystem`) has

- connect / read timeouts (10 s / 60 s by default) so a frozen endpoint cannot
  stall a read for minutes;
- botocore's *adaptive* retry mode (exponential backoff with jitter, plus
  client-side rate limiting when the server throttles), and on top of it a
  time budget: once an endpoint has failed continuously for about
  ``retry_total_s`` (120 s by default) no further retry is started, and for
  a short cool-down every request to it fails at once instead of waiting for
  its own timeouts.  The budget is per endpoint and per process, so the
  nested retries of s3fs and botocore cannot multiply it;
- a log line when requests to an endpoint have been waiting for 30 s with no
  answer, naming the slides being processed.

:func:`outage_cause` recognises an exception caused by the endpoint (refused
or reset connections, timeouts, 5xx after retries, raypath's own
:class:`StorageOutageError`), so that stages stop with exit 4 instead of
recording a healthy slide as corrupt.

Settings come from :class:`raypath.io.storage.S3Options`, whose defaults read
``RAYPATH_S3_RETRY_TOTAL_S``, ``RAYPATH_S3_CONNECT_TIMEOUT_S`` and
``RAYPATH_S3_READ_TIMEOUT_S`` (the CLI's ``--s3-retry-total-s`` ... flags set
them, and Ray workers inherit them).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterator

import botocore.exceptions
import s3fs

from raypath.io.activity import current_activities

log = logging.getLogger(__name__)

#: Seconds without any answer after which a waiting request is reported in the log.
STALL_LOG_S = 30.0
#: After giving up, requests fail at once for this long, at most the retry budget (then one
#: real attempt is allowed again: a process that outlives an outage recovers by itself).
COOLDOWN_S = 10.0
#: botocore attempts per request; the time budget, not this number, is what ends retries.
MAX_ATTEMPTS = 100

AWS_ENDPOINT = "the AWS S3 endpoint"


class StorageOutageError(botocore.exceptions.ConnectionError):
    """Raised instead of sending a request while an endpoint is known to be down."""

    fmt = "no answer from {endpoint_url} for {seconds:.0f} s (last error: {error}); raypath stopped retrying"


# --------------------------------------------------------------------------- per-endpoint health


class EndpointHealth:
    """Outage state of one endpoint in this process, shared by its clients and threads."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self.first_failure: float | None = None
        self.last_error = ""
        self.tripped_until = 0.0
        self.inflight = 0
        self.last_event = time.monotonic()
        self.last_stall_log = 0.0

    def attempt_started(self) -> None:
        with self._lock:
            if self.inflight == 0:
                self.last_event = time.monotonic()
            self.inflight += 1

    def attempt_done(self) -> None:
        with self._lock:
            self.inflight = max(0, self.inflight - 1)
            self.last_event = time.monotonic()

    def record_ok(self) -> None:
        with self._lock:
            self.first_failure = None
            self.tripped_until = 0.0
            self.last_error = ""

    def record_failure(self, error: str, now: float) -> float:
        """Note a failed attempt; return for how long the endpoint has been failing."""
        with self._lock:
            if self.first_failure is None:
                self.first_failure = now
            self.last_error = error
            return now - self.first_failure

    def trip(self, now: float, cooldown_s: float = COOLDOWN_S) -> bool:
        """Stop retrying for a cool-down; ``True`` when this call tripped it."""
        with self._lock:
            fresh = self.tripped_until <= now
            self.tripped_until = now + cooldown_s
            return fresh

    def tripped(self) -> bool:
        return time.monotonic() < self.tripped_until

    def failing_for(self) -> float | None:
        """Seconds since the current run of failures began (``None`` when healthy)."""
        f = self.first_failure
        return None if f is None else time.monotonic() - f

    def stalled_for(self) -> float:
        """Seconds requests have been waiting with no answer at all (0 when none waits)."""
        with self._lock:
            return time.monotonic() - self.last_event if self.inflight > 0 else 0.0


_HEALTH: dict[str, EndpointHealth] = {}
_HEALTH_LOCK = threading.Lock()


def health(endpoint: str | None) -> EndpointHealth:
    key = endpoint or AWS_ENDPOINT
    with _HEALTH_LOCK:
        if key not in _HEALTH:
            _HEALTH[key] = EndpointHealth(key)
        return _HEALTH[key]


def _stall_watch() -> None:
    while True:
        time.sleep(min(5.0, STALL_LOG_S / 2))
        now = time.monotonic()
        for h in list(_HEALTH.values()):
            waited = h.stalled_for()
            if waited >= STALL_LOG_S and now - h.last_stall_log >= STALL_LOG_S:
                h.last_stall_log = now
                doing = current_activities()
                log.warning(
                    "no progress for %.0f s: %d request(s) to storage endpoint %s waiting for an answer%s",
                    waited, h.inflight, h.endpoint, f" ({', '.join(doing[:5])})" if doing else "",
                )


_WATCH_STARTED = False


def _start_stall_watch() -> None:
    global _WATCH_STARTED
    with _HEALTH_LOCK:
        if _WATCH_STARTED:
            return
        _WATCH_STARTED = True
    threading.Thread(target=_stall_watch, name="raypath-s3-stall-watch", daemon=True).start()


# --------------------------------------------------------------------------- botocore hooks


def _describe(exc: BaseException | None, status: int | None) -> str:
    if exc is None:
        return f"HTTP {status}"
    return f"{type(exc).__name__}: {exc}"[:300]


class _Hooks:
    """The ``before-send`` and ``needs-retry`` handlers of one client."""

    def __init__(self, endpoint: str | None, retry_total_s: float):
        self.endpoint = endpoint or AWS_ENDPOINT
        self.health = health(endpoint)
        self.retry_total_s = float(retry_total_s)

    def before_send(self, **kw: Any) -> None:
        h = self.health
        if h.tripped():
            raise StorageOutageError(endpoint_url=self.endpoint, seconds=h.failing_for() or 0.0, error=h.last_error)
        h.attempt_started()

    def needs_retry(self, response=None, caught_exception=None, request_dict=None, **kw: Any):
        h = self.health
        if isinstance(caught_exception, StorageOutageError):
            return False  # failed before sending: nothing to retry
        h.attempt_done()
        status = None
        if response is not None:
            status = (response[1] or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if caught_exception is None and (status is None or status < 500) and status != 429:
            h.record_ok()
            return None
        now = time.monotonic()
        ctx = (request_dict or {}).get("context")
        ctx = ctx if isinstance(ctx, dict) else {}
        prev = ctx.get("raypath_prev_failure")
        ctx["raypath_prev_failure"] = now
        age = h.record_failure(_describe(caught_exception, status), now)
        cycle = now - prev if prev is not None else 0.0
        # the next attempt would likely end after the budget: do not start it
        if h.tripped() or age + cycle > self.retry_total_s:
            if h.trip(now, min(COOLDOWN_S, self.retry_total_s)):
                log.warning("storage endpoint %s: no answer for %.0f s (%s); giving up", self.endpoint, age, h.last_error)
            return False
        return None


class GuardedS3FileSystem(s3fs.S3FileSystem):
    """``s3fs.S3FileSystem`` whose clients carry raypath's retry budget and outage detection.

    Extra keyword: ``retry_total_s`` (the time budget of retries, per endpoint).
    Timeouts and botocore's retry mode come in ``config_kwargs``
    (:meth:`raypath.io.storage.S3Options.storage_options`).
    """

    def __init__(self, *args: Any, retry_total_s: float = 120.0, **kwargs: Any):
        self.retry_total_s = float(retry_total_s)
        super().__init__(*args, **kwargs)

    async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 - s3fs's signature
        client = await super().set_session(refresh=refresh, kwargs=kwargs)
        if getattr(client, "_raypath_hooks", None) is None:
            endpoint = self.endpoint_url or self.client_kwargs.get("endpoint_url")
            hooks = _Hooks(endpoint, self.retry_total_s)
            client.meta.events.register_first("before-send.s3", hooks.before_send)
            client.meta.events.register_first("needs-retry.s3", hooks.needs_retry)
            client._raypath_hooks = hooks
            _start_stall_watch()
        return client


# --------------------------------------------------------------------------- classifying exceptions

#: Exception type names that mean "the endpoint did not answer", whatever S3 library raised them.
_OUTAGE_NAMES = {
    "StorageOutageError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "ResponseStreamingError", "ClientConnectorError", "ClientConnectionError",
    "ServerDisconnectedError", "ServerTimeoutError", "ClientOSError", "ClientPayloadError",
    "FSTimeoutError", "ProxyConnectionError", "StorageUnavailable",
}
#: Builtin errors that mean the same only when an S3/HTTP library is in the chain (else: a pipe, Ray, ...).
_WEAK_NAMES = {"ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError", "IncompleteRead",
               "TimeoutError"}
_S3_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3", "raypath.io")


def _chain(exc: BaseException | None, limit: int = 30) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < limit:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]


def _server_error(e: BaseException) -> bool:
    resp = getattr(e, "response", None)
    if not isinstance(resp, dict):
        return False
    code = resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return int(code) >= 500 or resp.get("Error", {}).get("Code") in ("SlowDown", "ServiceUnavailable")


def outage_cause(exc: BaseException | None) -> BaseException | None:
    """The exception in ``exc``'s chain that says the storage endpoint did not answer, or ``None``."""
    chain = list(_chain(exc))
    s3_involved = any(type(e).__module__.startswith(_S3_MODULES) for e in chain)
    for e in chain:
        names = {t.__name__ for t in type(e).__mro__}
        if names & _OUTAGE_NAMES or _server_error(e):
            return e
    if s3_involved:
        for e in chain:
            if {t.__name__ for t in type(e).__mro__} & _WEAK_NAMES:
                return e
    return None


def failing_endpoint() -> EndpointHealth | None:
    """An endpoint this process currently sees failing (or has given up on), if any."""
    for h in list(_HEALTH.values()):
        if h.tripped() or h.first_failure is not None:
            return h
    return None
