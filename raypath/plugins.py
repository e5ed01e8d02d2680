"""Public extension points: private foundation models, MIL heads and losses from a user module.

A *plugin* is a module of yours that registers things with the functions
below: :func:`register_model` (a private foundation model, optionally with
its own network :class:`~raypath.fm.families.Family`), :func:`register_mil_head`
and :func:`register_loss`.  raypath finds plugins in three places, and loads
each one once per process:

1. installed packages' entry points of the group ``raypath.plugins``
   (``[project.entry-points."raypath.plugins"] mine = "my_pkg.raypath_plugin:register"``);
2. ``raypath --plugin my_pkg.raypath_plugin:register VERB ...`` (repeatable;
   ``path/to/file.py:register`` also works);
3. the ``RAYPATH_PLUGINS`` environment variable (comma-separated, same syntax).

A spec ``module:attr`` imports ``module`` and calls ``attr()`` (a function
that registers); ``attr`` may also be a :class:`~raypath.fm.registry.ModelSpec`
or a ``Family`` to register as is; a bare ``module`` registers at import.

Reaching the Ray workers: the CLI puts the plugins it loaded into
``RAYPATH_PLUGINS`` before Ray starts, so local workers inherit it and the
job's runtime environment carries it to a cluster's workers
(:mod:`raypath.io.ray_env`); stages that start actors on an already running
Ray also hand :func:`plugin_specs` to their actors, which call
:func:`load_plugins`.  Lookups (:func:`raypath.fm.backbone.load_backbone`,
:func:`mil_head`, :func:`loss`) load the plugins named there first, so a
worker needs nothing else.  A spec carries a module path and, as a fallback
for workers on the same machine, the module's file: never a secret.

This module imports no other raypath module at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any, Callable, Iterable

from raypath.errors import RaypathError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "raypath.plugins"
ENV_VAR = "RAYPATH_PLUGINS"

#: spec as given -> portable spec (with the module file as fallback) of every plugin loaded here
_LOADED: dict[str, str] = {}
#: entry points already loaded (installed packages: every worker finds them itself)
_EP_LOADED: set[str] = set()
_ENTRY_POINTS_DONE = False
_MIL_HEADS: dict[str, Callable[..., Any]] = {}
_LOSSES: dict[str, Callable[..., Any]] = {}


# --------------------------------------------------------------------------- registering


def register_model(spec: Any, family: Any = None, replace: bool = True) -> Any:
    """Register a private foundation model (a ``ModelSpec``) and, optionally, its network family.

    ``replace=True`` so that loading the same plugin twice (driver and worker
    in one process, a re-imported module) is harmless; built-in keys stay refused.
    """
    from raypath.fm.registry import register_spec

    if family is not None:
        register_family(family)
    return register_spec(spec, replace=replace)


def register_family(family: Any) -> Any:
    """Register a :class:`raypath.fm.families.Family` (how a private network is built and run)."""
    from raypath.fm.families import register_family as _register

    return _register(family, replace=True)


def register_mil_head(name: str, factory: Callable[..., Any]) -> None:
    """Register a MIL head: ``factory(in_dim, out_dim, **kwargs)`` returns an
    ``nn.Module`` whose ``forward(x [B, N, D], mask [B, N])`` returns ``(out [B, out_dim], attention [B, N])``."""
    _check_name(name, "MIL head")
    _MIL_HEADS[name] = factory


def register_loss(name: str, factory: Callable[..., Any]) -> None:
    """Register a loss: ``factory(task, n_classes=..., n_bins=..., **kwargs)`` returns a
    :class:`raypath.mil.losses.Objective`."""
    _check_name(name, "loss")
    _LOSSES[name] = factory


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise RaypathError(f"{what} name {name!r} must be a non-empty word")


def mil_head(name: str) -> Callable[..., Any] | None:
    """The factory of a plugin MIL head (after loading the plugins), or ``None``."""
    load_plugins()
    return _MIL_HEADS.get(name)


def loss(name: str) -> Callable[..., Any] | None:
    """The factory of a plugin loss (after loading the plugins), or ``None``."""
    load_plugins()
    return _LOSSES.get(name)


def mil_head_names() -> list[str]:
    load_plugins()
    return sorted(_MIL_HEADS)


def loss_names() -> list[str]:
    load_plugins()
    return sorted(_LOSSES)


# --------------------------------------------------------------------------- loading


def _split(spec: str) -> tuple[str, str | None, str | None]:
    """``module[:attr][@file]`` or ``file.py[:attr]`` -> (module or file, attr, fallback file)."""
    s = spec.strip()
    fallback = None
    if "@" in s:
        s, fallback = s.rsplit("@", 1)
    target, attr = s, None
    if ":" in s:
        target, attr = s.rsplit(":", 1)
    return target, attr or None, fallback


def _import_file(path: str) -> Any:
    name = os.path.splitext(os.path.basename(path))[0]
    mod = sys.modules.get(name)
    if mod is not None and os.path.abspath(getattr(mod, "__file__", "") or "") == os.path.abspath(path):
        return mod
    if not os.path.isfile(path):
        raise ModuleNotFoundError(f"no file {path!r}")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # classes defined there pickle by reference
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def _import(target: str, fallback: str | None) -> Any:
    if target.endswith(".py"):
        return _import_file(target)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError:
        if fallback:  # a worker that cannot import the driver's module by name: the same file
            return _import_file(fallback)
        raise


def _apply(obj: Any) -> None:
    from raypath.fm.families import Family
    from raypath.fm.registry import ModelSpec

    if isinstance(obj, ModelSpec):
        register_model(obj)
    elif isinstance(obj, Family):
        register_family(obj)
    elif callable(obj):
        obj()
    else:
        raise TypeError(f"{type(obj).__name__} is neither a function, a ModelSpec nor a Family")


def load_plugin(spec: str) -> str:
    """Import one plugin spec and run its registration (once per process); returns its portable form."""
    key = spec.strip()
    if key in _LOADED:
        return _LOADED[key]
    target, attr, fallback = _split(key)
    try:
        mod = _import(target, fallback)
        if attr:
            _apply(getattr(mod, attr))
    except RaypathError:
        raise
    except Exception as e:
        raise RaypathError(
            f"plugin {key!r} cannot be loaded ({type(e).__name__}: {e}): install the package that provides it, "
            "or pass module:function / path/to/file.py:function naming a function that registers"
        ) from e
    file = getattr(mod, "__file__", None)
    if target.endswith(".py"):
        portable = f"{os.path.abspath(target)}{':' + attr if attr else ''}"
    elif fallback or not file:
        portable = key
    else:
        portable = f"{key}@{os.path.abspath(file)}"
    _LOADED[key] = _LOADED[portable] = portable
    log.debug("plugin %s loaded", key)
    return portable


def _entry_points() -> None:
    global _ENTRY_POINTS_DONE
    if _ENTRY_POINTS_DONE:
        return
    _ENTRY_POINTS_DONE = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _EP_LOADED:
            continue
        try:
            _apply(ep.load())
            _EP_LOADED.add(ep.value)
        except Exception as e:  # a broken third-party plugin must not stop every command
            log.warning("plugin entry point %r (%s) failed to load: %s: %s", ep.name, ep.value, type(e).__name__, e)


def env_specs() -> list[str]:
    """The specs in ``RAYPATH_PLUGINS``."""
    return [s.strip() for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]


def load_plugins(specs: Iterable[str] | None = None) -> list[str]:
    """Load the entry points, ``RAYPATH_PLUGINS`` and ``specs`` (each once per process).

    Call it at the start of a Ray actor/worker with the driver's
    :func:`plugin_specs`.  Returns the portable specs of ``specs``.
    """
    _entry_points()
    for s in env_specs():
        load_plugin(s)
    return [load_plugin(s) for s in (specs or ()) if str(s).strip()]


def plugin_specs() -> list[str]:
    """The portable specs of the plugins loaded here from ``--plugin`` or
    ``RAYPATH_PLUGINS`` (hand them to workers; entry points they find themselves)."""
    return list(dict.fromkeys(_LOADED.values()))


def forget_plugins() -> None:
    """Forget which plugins were loaded and the heads/losses they registered (tests);
    models and families stay registered: remove them with ``unregister_spec`` / ``unregister_family``."""
    global _ENTRY_POINTS_DONE
    _LOADED.clear()
    _EP_LOADED.clear()
    _MIL_HEADS.clear()
    _LOSSES.clear()
    _ENTRY_POINTS_DONE = False


def export_to_env(specs: Iterable[str]) -> None:
    """Add ``specs`` to ``RAYPATH_PLUGINS`` so that processes started afterwards
    (local Ray workers, a cluster job's runtime environment) load them too."""
    merged = list(dict.fromkeys(env_specs() + [s for s in specs if s]))
    if merged:
        os.environ[ENV_VAR] = ",".join(merged)
