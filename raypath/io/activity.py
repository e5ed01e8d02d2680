"""What this process is working on, by name, for log lines about stalls (``with activity("tile slide s3"):``)."""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

_ACTIVITIES: dict[int, str] = {}
_IDS = itertools.count()


@contextlib.contextmanager
def activity(label: str) -> Iterator[None]:
    """``with activity("tile slide s3"):`` names the work a storage stall log line is about."""
    key = next(_IDS)
    _ACTIVITIES[key] = label
    try:
        yield
    finally:
        _ACTIVITIES.pop(key, None)


def current_activities() -> list[str]:
    return sorted(set(_ACTIVITIES.values()))
