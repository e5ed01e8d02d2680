"""Jinja2 rendering shared by every report page: the environment, number
formats and inlined images.

Pages are ``templates/<page>.html.j2`` extending ``base.html.j2``; a page
module builds a plain dict (the *context*) and calls :func:`render`.
Numbers are formatted here only, so every page writes a C-index, a
mean +- sd and a confidence interval the same way.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
from functools import lru_cache
from typing import Any

from raypath import __version__

#: digits after the decimal point of every metric on every page
DIGITS = 3


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def num(v: Any, digits: int = DIGITS) -> str:
    """A number as a reader wants it: ``0.812``, ``12``, ``1,234``, ``–`` for missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "\u2013"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "\u221e" if v > 0 else "-\u221e"
        if v != 0 and abs(v) < 10 ** -digits:
            return f"{v:.2g}"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def param(v: Any) -> str:
    """A hyper-parameter: 3 significant digits (``0.00125``, ``84``, ``abmil``)."""
    if isinstance(v, float) and not math.isnan(v) and v != 0 and (abs(v) < 0.01 or abs(v) >= 1000):
        return f"{v:.3g}"
    return num(v)


def pm(stat: Any, digits: int = DIGITS) -> str:
    """``mean ± sd`` of a summary dict (``mean``, ``sd``, ``n``); the mean alone when n <= 1."""
    if not isinstance(stat, dict):
        return num(stat, digits)
    mean, sd, n = stat.get("mean"), stat.get("sd"), stat.get("n")
    if not is_number(mean):
        return "\u2013"
    if not is_number(sd) or (is_number(n) and n <= 1):
        return num(mean, digits)
    return f"{num(mean, digits)} \u00b1 {num(sd, digits)}"


def ci(stat: Any, digits: int = DIGITS) -> str:
    """``[low, high]`` of a summary dict, empty when absent or a single value."""
    if not isinstance(stat, dict):
        return ""
    lo, hi = stat.get("ci_low"), stat.get("ci_high")
    if not (is_number(lo) and is_number(hi)) or lo == hi:
        return ""
    return f"[{num(lo, digits)}, {num(hi, digits)}]"


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode()}"


def thumbnail_uri(png: bytes, max_px: int = 160) -> str:
    """A small JPEG of an image, inlined (QC strips stay light for 1,000 slides)."""
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    im.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return data_uri(buf.getvalue(), "image/jpeg")


def pretty_json(doc: Any, limit_chars: int = 200_000) -> str:
    text = json.dumps(doc, indent=2, default=str)
    return text if len(text) <= limit_chars else text[:limit_chars] + "\n... (cut; the full file is next to this page)"


@lru_cache(maxsize=1)
def environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("raypath.report", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(num=num, param=param, pm=pm, ci=ci, data_uri=data_uri, is_number=is_number)
    env.tests["number"] = is_number
    return env


#: environment variables whose values must never appear on a page, whatever file they leaked into
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def scrub(text: str) -> str:
    """``text`` with the value of every secret environment variable replaced by ``***``."""
    import os

    for name in SECRET_ENV:
        value = os.environ.get(name) or ""
        if len(value) >= 8 and value in text:
            text = text.replace(value, "***")
    return text


def render(template: str, **context: Any) -> str:
    """Render ``templates/<template>`` with the page context (plus version and time)."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    context.setdefault("index_href", None)
    context.setdefault("banners", [])
    context.setdefault("subtitle", None)
    return scrub(environment().get_template(template).render(version=__version__, written=now, **context))
