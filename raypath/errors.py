"""User-facing errors and the exit codes every verb shares.

=====  ==========================================================================
code   meaning
=====  ==========================================================================
0      everything asked for was done
1      an unexpected error (a bug: the traceback is printed)
2      bad input (flag, config file, table, missing file): one message with the remedy
3      the run finished but some slides failed (recorded with their cause; chained
       job steps can go on with the slides that worked)
4      storage unavailable: the endpoint did not answer within the retry budget;
       what was finished is kept, re-run the same command when it is back
=====  ==========================================================================
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_SOME_FAILED = 3
EXIT_STORAGE_UNAVAILABLE = 4


class RaypathError(Exception):
    """A user-facing error: its message names the input and the remedy.

    The CLI prints it without a traceback and exits with :attr:`exit_code` (2).
    """

    exit_code = EXIT_BAD_INPUT


class StorageUnavailable(RaypathError):
    """Object storage did not answer within the retry budget (exit 4).

    Never a verdict on a slide: the run stops, keeps what it finished, and the
    same command resumes once the endpoint is back.
    """

    exit_code = EXIT_STORAGE_UNAVAILABLE

    def __init__(self, endpoint: str, detail: str, done: str | None = None):
        self.endpoint = endpoint
        self.detail = detail
        self.done = done
        msg = f"storage endpoint {endpoint} is unavailable ({detail}); "
        if done:
            msg += f"{done}; "
        msg += "nothing was marked failed: re-run the same command when the endpoint is back to resume"
        super().__init__(msg)

    def __reduce__(self):  # crosses Ray task boundaries
        return (type(self), (self.endpoint, self.detail, self.done))

    def with_progress(self, done: str) -> "StorageUnavailable":
        """The same outage, with what the stopped run had finished."""
        return StorageUnavailable(self.endpoint, self.detail, done)

    #: prefix of :meth:`as_record` (a task hands the outage to the driver as data, without a traceback)
    RECORD_PREFIX = "storage_unavailable: "

    def as_record(self) -> str:
        return f"{self.RECORD_PREFIX}{self.endpoint} | {self.detail}"

    @classmethod
    def from_record(cls, text: str | None) -> "StorageUnavailable | None":
        """The outage a task recorded with :meth:`as_record` (``None`` for any other text)."""
        if not text or not str(text).startswith(cls.RECORD_PREFIX):
            return None
        endpoint, _, detail = str(text)[len(cls.RECORD_PREFIX):].partition(" | ")
        return cls(endpoint, detail)


def cause_of(error: str | None) -> str:
    """The failure kind of a recorded error (``"truncated: ..."`` -> ``"truncated"``)."""
    if not error:
        return "unknown"
    head = str(error).split(":", 1)[0].strip()
    return head if head and " " not in head and len(head) <= 40 else "other"


def failure_counts(errors: Iterable[str | None]) -> str:
    """``"failures by cause: truncated 2, corrupt_tile_data 1"`` (``"failures: none"``)."""
    c = Counter(cause_of(e) for e in errors)
    if not c:
        return "failures: none"
    return "failures by cause: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
