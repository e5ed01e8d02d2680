"""The sweep's YAML file: what is searched, what is fixed, what is optimised.

A sweep file (see ``sweeps/examples/*.yaml``) has these keys::

    kind: mil | adapter | patch  # MIL-only on fixed features, adapt -> embed -> MIL per fold, or the patch
                              # benchmark (raypath.patch.sweep: fixed.patch, patch.method/rank/lr/fraction;
                              # objectives val_mean / val_worst: validation patients only)
    features: <model key>     # kind mil: feature folder or key under <workdir>/features
    objectives:               # 1 objective = TPE; >= 2 = multi-objective TPE + Pareto front
      - {metric: mean_external, mode: max}
      - {metric: site_probe_bacc, mode: min}
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # over folds done
    cohorts: [A, B, C]        # held-out cohorts (LODO folds); default: every cohort
    fixed:                    # settings of each stage that are not searched
      adapt: {model: tiny-vit, epochs: 1, ...}
      embed: {batch_size: 32}
      mil: {task: survival, epochs: 5, ...}
    space:                    # "<stage>.<field>": distribution
      adapt.rank: {type: int, low: 2, high: 16, log: true}
      adapt.alpha_over_rank: {type: float, low: 0.5, high: 4}     # alpha = ratio x rank
      adapt.target_modules: {type: categorical, choices: [[qkv], [qkv, proj]]}
      mil.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    points_to_evaluate:       # optional configurations tried first
      - {mil.lr: 0.001}

Stage fields are those of ``AdaptConfig``, ``EmbedConfig`` and ``MilConfig``
(checked when a trial builds them).  ``adapt.alpha_over_rank`` is the one
derived parameter: it sets ``adapt.alpha = ratio * rank``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from raypath.errors import RaypathError
from raypath.evaluation.meanings import METRICS

STAGES = ("adapt", "embed", "mil", "patch")

#: Metrics a trial reports that can be objectives, with the direction that is
#: better (from the one table of metric meanings).
OBJECTIVE_METRICS = {
    k: METRICS[k].mode for k in ("mean_external", "worst_external", "mean_internal", "site_probe_bacc", "kmeans_purity",
                                 "mean_inconsistency", "mean_flip_rate")  # last two: MIL on technical variants
}

#: Objectives of a ``kind: patch`` sweep (raypath.patch.sweep): scores on the validation patients of
#: each fit's training domains, never on test patients; the test-set scores (mean_external, ...) are
#: reported next to them but cannot be selected on.
PATCH_OBJECTIVES = {"val_mean": "max", "val_worst": "max"}
OBJECTIVE_METRICS.update(PATCH_OBJECTIVES)

#: Separator that turns a list choice (e.g. target modules) into an Optuna label.
LIST_SEP = "+"

ALPHA_RATIO = "adapt.alpha_over_rank"

#: MIL settings that decide the nested-LODO split: fixed for the whole sweep.
PROTOCOL_KEYS = ("task", "internal_fraction", "seed", "repeats", "cohorts", "protocol", "clinical", "features")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Strict):
    """One searched parameter."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty `choices` list")
        else:
            if self.low is None or self.high is None or self.low > self.high:
                raise ValueError(f"a {self.type} parameter needs `low` <= `high`")
            if self.log and self.low <= 0:
                raise ValueError("`log: true` needs `low` > 0")
        return self

    def labels(self) -> list:
        """Optuna-safe categorical choices (lists become 'a+b' strings)."""
        return [encode_choice(c) for c in self.choices or []]


class Objective(_Strict):
    metric: str
    mode: Literal["min", "max"] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.metric not in OBJECTIVE_METRICS:
            raise ValueError(
                f"unknown objective metric {self.metric!r}: choose from {', '.join(OBJECTIVE_METRICS)}"
            )
        if self.mode is None:
            self.mode = OBJECTIVE_METRICS[self.metric]
        return self


class SchedulerSpec(_Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, description="folds a trial always gets before ASHA may stop it")
    reduction_factor: float = 2.0


class RobustnessSpec(_Strict):
    enabled: bool | None = Field(None, description="default: on for kind adapter, off for mil")
    tiles_per_slide: int = 32
    kmeans_k: int = 20
    kmeans_repeats: int = 3
    probe_folds: int = 3


class SweepSpace(_Strict):
    """A parsed and validated sweep file."""

    kind: Literal["mil", "adapter", "patch"] = "mil"
    features: str | None = None
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(metric="mean_external")])
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    cohorts: list[str] | None = None
    inner_selection: Literal["last_epoch", "best_internal_epoch"] = "last_epoch"
    robustness: RobustnessSpec = Field(default_factory=RobustnessSpec)
    fixed: dict[str, dict[str, Any]] = Field(default_factory=dict)
    space: dict[str, ParamSpec]
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self):
        bad = [s for s in self.fixed if s not in STAGES]
        if bad:
            raise ValueError(f"`fixed` has unknown stage(s) {bad}: use {', '.join(STAGES)}")
        if not self.space:
            raise ValueError("`space` is empty: name at least one parameter to search")
        for key in self.space:
            stage, _, field = key.partition(".")
            if stage not in STAGES or not field:
                raise ValueError(f"search key {key!r} must look like '<stage>.<field>' with stage in {STAGES}")
            if stage == "mil" and field in PROTOCOL_KEYS:
                raise ValueError(
                    f"{key!r} decides the nested-LODO split and cannot be searched: set it under fixed.mil"
                )
            if (self.kind == "patch") != (stage == "patch"):
                raise ValueError(f"search key {key!r}: a `kind: patch` sweep searches patch.* only, and patch.* "
                                 "only fits kind: patch")
            if self.kind == "mil" and stage != "mil":
                raise ValueError(f"search key {key!r}: a `kind: mil` sweep searches mil.* only (use kind: adapter)")
        if ALPHA_RATIO in self.space and "adapt.alpha" in self.space:
            raise ValueError("search either adapt.alpha or adapt.alpha_over_rank, not both")
        for p in self.points_to_evaluate:
            unknown = sorted(set(p) - set(self.space))
            if unknown:
                raise ValueError(f"points_to_evaluate names {unknown}, which are not in `space`")
            for k, v in p.items():
                spec = self.space[k]
                if spec.type == "categorical" and encode_choice(v) not in spec.labels():
                    raise ValueError(f"points_to_evaluate: {k}={v!r} is not one of {spec.choices}")
                if spec.log and not (isinstance(v, (int, float)) and v > 0):
                    raise ValueError(f"points_to_evaluate: {k}={v!r} must be > 0 (log scale)")
        self._check_patch_objectives()
        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) != len(metrics) or not metrics:
            raise ValueError("`objectives` must list distinct metrics")
        if not self.robustness_enabled and any(m in ("site_probe_bacc", "kmeans_purity") for m in metrics):
            raise ValueError("a robustness objective needs `robustness: {enabled: true}`")
        return self

    def _check_patch_objectives(self) -> None:
        """A patch sweep selects on validation patients only (default val_mean); others never on val_*."""
        if self.kind == "patch" and "objectives" not in self.model_fields_set:
            self.objectives = [Objective(metric="val_mean")]
        metrics = [o.metric for o in self.objectives]
        if self.kind == "patch":
            bad = [m for m in metrics if m not in PATCH_OBJECTIVES]
            if bad:
                raise ValueError(
                    f"objective(s) {bad} are test-set scores, and a `kind: patch` sweep selects on validation "
                    f"patients only: use {' or '.join(PATCH_OBJECTIVES)} (the test scores are reported next to "
                    "them in trials.csv)"
                )
        elif any(m in PATCH_OBJECTIVES for m in metrics):
            raise ValueError(f"objectives {sorted(PATCH_OBJECTIVES)} belong to `kind: patch` sweeps only")

    @property
    def robustness_enabled(self) -> bool:
        if self.robustness.enabled is None:
            return self.kind == "adapter"
        return self.robustness.enabled

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]  # type: ignore[misc]


def encode_choice(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return LIST_SEP.join(str(v) for v in value)
    return value


def load_space(path: str | Path) -> SweepSpace:
    """Read and validate a sweep YAML file (errors name the file and the key)."""
    p = Path(path)
    if not p.exists():
        raise RaypathError(f"sweep space {str(p)!r} not found: pass --space with a YAML file (see sweeps/examples/)")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RaypathError(f"sweep space {str(p)!r} is not valid YAML: {e}") from e
    return parse_space(doc, where=str(p))


def parse_space(doc: dict, where: str = "sweep space") -> SweepSpace:
    from pydantic import ValidationError

    try:
        return SweepSpace.model_validate(doc)
    except ValidationError as e:
        raise RaypathError(f"{where}: {e}") from e


def optuna_space(space: SweepSpace) -> dict:
    """The search space as Optuna distributions (what ``OptunaSearch`` takes)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, p in space.space.items():
        if p.type == "float":
            out[key] = FloatDistribution(p.low, p.high, log=p.log, step=None if p.log else p.step)
        elif p.type == "int":
            step = 1 if p.log or p.step is None else int(p.step)
            out[key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=step)
        else:
            out[key] = CategoricalDistribution(p.labels())
    return out


def decode_params(space: SweepSpace, params: dict) -> dict[str, Any]:
    """Trial params (flat ``stage.field`` keys, Optuna labels) -> real values."""
    out = {}
    for key, value in _flatten(params).items():
        spec = space.space.get(key)
        if spec is not None and spec.type == "categorical":
            for choice in spec.choices or []:
                if encode_choice(choice) == value:
                    value = list(choice) if isinstance(choice, (list, tuple)) else choice
                    break
        out[key] = value
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key.split(".")[0] in STAGES and "." not in key:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def stage_settings(space: SweepSpace, params: dict, workdir: str) -> dict[str, dict[str, Any]]:
    """Fixed settings merged with one trial's params, per stage.

    Returns ``{"adapt": {...}, "embed": {...}, "mil": {...}}`` (plain dicts;
    the trial adds fold-specific fields such as cohorts, run names and paths).
    """
    values = decode_params(space, params)
    out: dict[str, dict[str, Any]] = {s: dict(space.fixed.get(s, {})) for s in STAGES}
    for s in STAGES:
        out[s]["workdir"] = workdir
    ratio = values.pop(ALPHA_RATIO, None)
    for key, v in values.items():
        stage, _, field = key.partition(".")
        out[stage][field] = v
    if ratio is not None:
        rank = out["adapt"].get("rank")
        if rank is None:
            raise RaypathError("adapt.alpha_over_rank needs adapt.rank (fixed or searched)")
        out["adapt"]["alpha"] = float(ratio) * float(rank)
    if space.kind == "mil" and space.features:
        out["mil"].setdefault("features", space.features)
    return out
