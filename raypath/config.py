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
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from raypath import __version__
from raypath.errors import RaypathError
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
        """Load from a YAML file written by :meth:`save` or by hand.

        Raises :class:`RaypathError` (one sentence, no pydantic URL) for a
        missing file, bad YAML, a non-mapping or invalid values.
        """
        doc = load_config_file(path)
        return validate_config(cls, doc, from_file=set(doc), path=str(path))


# --------------------------------------------------------------------------- errors a user can act on


def load_config_file(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """The options in a YAML config file (a saved ``config.yaml`` or a hand-written one).

    Raises
    ------
    RaypathError
        The file is missing or unreadable, not valid YAML, or not a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise RaypathError(f"{flag} {path}: no such file; check the path") from None
    except IsADirectoryError:
        raise RaypathError(f"{flag} {path} is a folder; pass a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RaypathError(f"{flag} {path} cannot be read ({type(e).__name__}); pass a readable UTF-8 YAML file") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise RaypathError(f"{flag} {path} is not valid YAML ({problem}{where}); fix the file") from None
    if doc is None:
        return {}
    if isinstance(doc, dict) and "config" in doc and "stage" in doc:
        doc = doc["config"]
    if not isinstance(doc, dict):
        raise RaypathError(
            f"{flag} {path} holds a {type(doc).__name__}, not a mapping; write one `option: value` per line "
            "(the options are the verb's flags without the leading --, e.g. `batch_size: 64`)"
        )
    return {str(k): v for k, v in doc.items()}


def _describe_error(err: dict[str, Any], from_file: set[str], path: str | None) -> str:
    loc = [str(x) for x in err.get("loc", ())]
    msg = str(err.get("msg", "invalid value"))
    if not loc:  # a model-level check (two options that contradict each other)
        return msg.removeprefix("Value error, ")
    name = loc[0]
    where = _flag(name) + "".join(f"[{x}]" for x in loc[1:])
    if name in from_file and path:
        where = f"`{name}` in {path}"
    kind = err.get("type", "")
    if kind == "missing":
        return f"{where} is required: pass {_flag(name)} VALUE"
    if kind == "extra_forbidden":
        return (f"{path or 'the config'} has an unknown option `{name}`: remove it or fix its spelling "
                "(options are the verb's flags without the leading --)")
    msg = msg.removeprefix("Value error, ")
    msg = msg.replace("Input should be", "must be").replace("Input", "the value")
    value = err.get("input")
    shown = repr(value) if isinstance(value, str) else str(value)
    return f"{where} {shown[:60]}: {msg}"


def format_validation_error(e: ValidationError, from_file: set[str] | None = None, path: str | None = None) -> str:
    """pydantic's errors as one sentence naming each flag and what it must be (no URL)."""
    parts = [_describe_error(err, from_file or set(), path) for err in e.errors(include_url=False)]
    return "; ".join(dict.fromkeys(parts)) or "invalid options"


def validate_config(model: type[C], data: dict[str, Any], from_file: set[str] | None = None,
                    path: str | None = None) -> C:
    """``model.model_validate(data)``, with errors a user can act on (:class:`RaypathError`)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RaypathError(format_validation_error(e, from_file, path)) from None


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


#: help sections, in the order ``--help`` shows them
HELP_GROUPS = ("inputs and outputs", "generated study", "model", "training", "evaluation", "demo steps",
               "Ray resources", "other options")

#: where a field's flag is listed, by name (first match wins); a field may name its
#: section itself: ``Field(..., json_schema_extra={"group": "training"})``
_GROUP_RULES: tuple[tuple[str, str], ...] = (
    (r"^(num_workers|use_gpu|num_gpus.*|num_cpus.*|num_actors|actor_concurrency|.*_per_trial|max_concurrent.*|"
     r"object_store.*|read_threads|device|max_in_flight|use_ray|.*_num_actors|.*_num_workers|workers|"
     r"channels_last|compile)$", "Ray resources"),
    (r"^(workdir|features|feature_dir|out|run|cohort|clinical|space|name|bucket|s3|study_uri|resume|force|"
     r"cohorts|tune_cohorts|tune_slides|held_out|adapter|prompts?|tiles|labels|annotations|slides)$",
     "inputs and outputs"),
    (r"^(model|weights|method|rank|alpha|dropout|target_modules|dtype|amp|head_.*|readout|decode|prompt_.*|"
     r"plugin)$", "model"),
    (r"^(task|protocol|folds|repeats|internal_fraction|eval_every|biology_column|centre_column|kmeans_.*|"
     r"robustness_.*|mil_.*|tsne.*|umap.*|gallery.*|plots|cluster_score_k|num_samples|metric.*|site_probe.*|"
     r"ri_.*|croma_.*|.*_fraction|fractions?)$", "evaluation"),
    (r"^(epochs|lr|min_lr|weight_decay.*|batch_size|warmup.*|momentum.*|.*_temp|center_momentum|clip_grad|"
     r"freeze_.*|seed|loss|n_bins|nll_alpha|balanced_sampling|max_tiles_per_slide|augmentation|strength|"
     r"n_local_crops|tiles_per_slide|lambda_.*|tau|score_loss|variant_.*|checkpoint_.*|stop_after_.*|patience|"
     r"optimizer|scheduler)$", "training"),
)

#: unit suffixes of field names (STYLE: units in names) -> (metavar, unit shown after the default)
_UNITS: tuple[tuple[str, str, str], ...] = (
    (r"_s$", "SECONDS", "s"), (r"_px$", "PX", "px"), (r"_mb$", "MIB", "MiB"), (r"_bytes$", "BYTES", "bytes"),
    (r"(^|_)mpp$", "UM_PER_PX", "\u00b5m/px"), (r"_um$", "UM", "\u00b5m"), (r"_mm$", "MM", "mm"),
)
_PATH_NAMES = re.compile(r"^(workdir|out|feature_dir|features|clinical|space|cohort|weights|adapter|prompts|"
                         r"sweep_space|bucket|annotations|labels)$")


def _field_extra(field) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def help_group(name: str, field, default: str | None = None) -> str:
    """The ``--help`` section of a field (see :data:`HELP_GROUPS`).  ``default``
    (a config's ``help_section``, e.g. "generated study" for ``synth``) takes
    every field that is not an input/output or a Ray resource."""
    group = _field_extra(field).get("group")
    if group:
        return group
    group = next((g for pattern, g in _GROUP_RULES if re.match(pattern, name)), "other options")
    return default if default and group not in ("inputs and outputs", "Ray resources") else group


def _clean_help(text: str) -> str:
    """No reST/Markdown markup or Python literals in ``--help``."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    text = text.replace("``", "").replace("**", "")
    text = re.sub(r"`([^`]+)`", r"\1", text)
    return re.sub(r"\bNone\b", "none", text).strip()


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "none"
    return "none" if value is None else str(value)


def flag_help(name: str, field) -> tuple[str, str | None]:
    """(help text with default and unit, metavar) of a field's flag."""
    unit = next(((mv, u) for pattern, mv, u in _UNITS if re.search(pattern, name)), None)
    text = _clean_help(field.description or "")
    if field.is_required():
        text += " [required]"
    elif not callable(field.default) and not re.search(r"default|required", text.lower()):
        shown = _show(field.default)
        text += f" [default: {shown}{' ' + unit[1] if unit and field.default is not None else ''}]"
    tp = _unwrap_optional(field.annotation)
    if unit:
        metavar = unit[0]
    elif _PATH_NAMES.match(name):
        metavar = "PATH"
    elif tp is int:
        metavar = "N"
    elif tp is float:
        metavar = "X"
    else:
        metavar = None
    return text.strip(), metavar


def add_config_arguments(parser: argparse.ArgumentParser, model: type[StageConfig]) -> None:
    """Add one ``--flag`` per field of ``model`` plus ``--config FILE.yaml``, in help sections.

    Flags default to ``None`` so that only what the user typed overrides the
    YAML file, which overrides the model's defaults.  A field may rename its
    flag and keep older spellings as hidden aliases:
    ``Field(..., json_schema_extra={"flag": "--features", "aliases": ["--feature-dir"]})``.
    """
    fields = list(model.model_fields.items())
    section = getattr(model, "help_section", None)
    used = {help_group(n, f, section) for n, f in fields} | {"inputs and outputs"}
    groups = {g: parser.add_argument_group(g) for g in HELP_GROUPS if g in used}
    groups.update({g: parser.add_argument_group(g) for g in sorted(used - set(groups))})
    groups["inputs and outputs"].add_argument("--config", metavar="FILE.yaml",
                                              help="YAML file with any of the options below; flags win [default: none]")
    for name, field in fields:
        _add_field(groups[help_group(name, field, section)], parser, name, field)
    _add_storage_arguments(parser, model)


def _add_field(group, parser: argparse.ArgumentParser, name: str, field) -> None:
    tp = _unwrap_optional(field.annotation)
    help_text, metavar = flag_help(name, field)
    extra = _field_extra(field)
    flag = extra.get("flag") or _flag(name)
    kw: dict[str, Any] = {"dest": name, "default": None}
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif get_origin(tp) is Literal:
        kw["choices"] = list(get_args(tp))
    elif get_origin(tp) in (list, tuple):
        (inner,) = get_args(tp)[:1] or (str,)
        kw.update(nargs="+", type=inner if inner in (int, float, str) else str,
                  metavar=metavar or name.rsplit("_", 1)[-1].removesuffix("s").upper() or "VALUE")
    elif tp in (int, float, str):
        kw.update(type=tp, metavar=metavar or ("NAME" if name in ("run", "name") else name.upper()))
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        kw.update(type=json.loads, metavar="JSON")
    else:
        kw.update(type=str, metavar=metavar or name.upper())
    group.add_argument(flag, help=help_text or None, **kw)
    for alias in extra.get("aliases") or []:  # older spellings keep working, unlisted
        parser.add_argument(alias, help=argparse.SUPPRESS, **kw)


#: Storage flags every verb with a config gets (they are process settings, not stage options).
_STORAGE_FLAGS = {
    "s3_retry_total_s": "retry an unanswering S3 endpoint for about this long, then stop with exit 4 "
                        "[default: 120, or $RAYPATH_S3_RETRY_TOTAL_S]",
    "s3_connect_timeout_s": "S3 connect timeout [default: 10, or $RAYPATH_S3_CONNECT_TIMEOUT_S]",
    "s3_read_timeout_s": "S3 read timeout [default: 60, or $RAYPATH_S3_READ_TIMEOUT_S]",
}


def _add_storage_arguments(parser: argparse.ArgumentParser, model: type[StageConfig]) -> None:
    group = parser.add_argument_group("storage (S3 timeouts and retries)")
    for name, help_text in _STORAGE_FLAGS.items():
        if name not in model.model_fields:
            group.add_argument(_flag(name), dest=name, type=float, default=None, metavar="SECONDS", help=help_text)


def config_from_args(model: type[C], args: argparse.Namespace, **fixed: Any) -> C:
    """Build ``model`` from defaults < ``--config`` YAML < flags < ``fixed``.

    Also applies the storage flags (``--s3-retry-total-s`` ...) to this
    process (:func:`raypath.io.storage.configure_s3`).

    Raises
    ------
    RaypathError
        A missing/unreadable/invalid ``--config`` file or an invalid value:
        one sentence naming the flag and what it must be (exit 2).
    """
    from raypath.io.storage import configure_s3

    data: dict[str, Any] = {}
    from_file: set[str] = set()
    path = getattr(args, "config", None)
    if path:
        doc = load_config_file(path)
        data.update(doc)
        from_file = set(doc)
    for name in model.model_fields:
        v = getattr(args, name, None)
        if v is not None:
            data[name] = v
            from_file.discard(name)
    data.update(fixed)
    from_file -= set(fixed)
    cfg = validate_config(model, data, from_file, path)
    configure_s3(**{k.removeprefix("s3_"): getattr(args, k, None) for k in _STORAGE_FLAGS if k not in model.model_fields})
    return cfg
