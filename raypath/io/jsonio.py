"""The one JSON sanitiser: numpy scalars/arrays, pandas timestamps and
non-finite floats made JSON-safe (NaN/inf -> null, so every file parses in
strict readers such as browsers' ``JSON.parse``)."""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any

import numpy as np


def to_jsonable(v: Any) -> Any:
    """``v`` with every value a plain JSON type: dict keys as strings, numpy
    scalars and arrays as Python numbers and lists, NaN/inf as ``None``,
    dates as ISO strings; anything else unknown as its ``str``."""
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, np.ndarray)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (_dt.datetime, _dt.date)) or hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item"):
        return to_jsonable(v.item())
    return str(v)


def dumps(v: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`to_jsonable` (strict JSON: no NaN)."""
    return json.dumps(to_jsonable(v), allow_nan=False, **kwargs)
