"""Typed configs shared by every stage.

Each stage has a pydantic model (``SynthConfig``, ``TileConfig``, ...) that
is the single source of its parameters: the CLI builds its flags from the
model's fields, notebooks construct the model directly, and every output
folder gets the resolved config as ``config.yaml`` (secrets redacted) so a
number can always be traced to what produced it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict

from raypath import __version__
from raypath.io.storage import atomic_write_bytes, join, redact

C = TypeVar("C", bound="StageConfig")


class StageConfig(BaseModel):
    """Base class of stage configs: strict (unknown keys are errors), YAML I/O."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def to_dict(self) -> dict[str, Any]:
        return redact(json.loads(self.model_dump_json()))

    def save(self, out_dir: str, name: str = "config.yaml") -> str:
        """Write the resolved config (redacted) next to a stage's outputs."""
        doc = {
            "stage": type(self).__name__,
            "raypath_version": __version__,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": self.to_dict(),
        }
        uri = join(out_dir, name)
        atomic_write_bytes(uri, yaml.safe_dump(doc, sort_keys=False).encode())
        return uri

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        """Load from a YAML file written by :meth:`save` or by hand."""
        doc = yaml.safe_load(Path(path).read_text()) or {}
        if isinstance(doc, dict) and "config" in doc and "stage" in doc:
            doc = doc["config"]
        return cls.model_validate(doc)


# --------------------------------------------------------------------------- CLI glue


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_config_arguments(parser: argparse.ArgumentParser, model: type[StageConfig]) -> None:
    """Add one ``--flag`` per field of ``model`` plus ``--config FILE.yaml``.

    Flags default to ``None`` so that only what the user typed overrides the
    YAML file, which overrides the model's defaults.
    """
    parser.add_argument("--config", help="YAML file with any of the options below (flags win)")
    for name, field in model.model_fields.items():
        tp = _unwrap_optional(field.annotation)
        help_text = (field.description or "").strip()
        default = None if field.is_required() else field.default
        if default is not None and not callable(default):
            help_text += f" [default: {default}]"
        kw: dict[str, Any] = {"dest": name, "default": None, "help": help_text or None}
        if tp is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kw)
            continue
        origin = get_origin(tp)
        if origin is Literal:
            parser.add_argument(_flag(name), choices=list(get_args(tp)), **kw)
        elif origin in (list, tuple):
            (inner,) = get_args(tp)[:1] or (str,)
            inner = inner if inner in (int, float, str) else str
            parser.add_argument(_flag(name), nargs="+", type=inner, **kw)
        elif tp in (int, float, str):
            parser.add_argument(_flag(name), type=tp, **kw)
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            parser.add_argument(_flag(name), type=json.loads, metavar="JSON", **kw)
        else:
            parser.add_argument(_flag(name), type=str, **kw)


def config_from_args(model: type[C], args: argparse.Namespace, **fixed: Any) -> C:
    """Build ``model`` from defaults < ``--config`` YAML < flags < ``fixed``."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        doc = yaml.safe_load(Path(args.config).read_text()) or {}
        if isinstance(doc, dict) and "config" in doc and "stage" in doc:
            doc = doc["config"]
        data.update(doc)
    for name in model.model_fields:
        v = getattr(args, name, None)
        if v is not None:
            data[name] = v
    data.update(fixed)
    return model.model_validate(data)
