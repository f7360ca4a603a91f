"""Search-space YAML → validated model → Optuna define-by-run function.

One file per method, ``dmlbench/search_spaces/<method>.yaml`` (``--search-space FILE`` overrides)::

    method: ccp
    params:
      - {name: lam, type: float, low: 1.0e-5, high: 1.0e-1, log: true}
      - {name: proxies_per_class, type: int, low: 1, high: 16}
      - {name: base_loss, type: categorical, choices: [c1, c2, ms, triplet]}
      - {name: margin, type: float, low: 0.1, high: 0.5, condition: {param: base_loss, in: [c1, c2]}}
    fixed: {lr: 1.0e-5}

A name that is a :class:`~dmlbench.config.TrialConfig` field sets that field; any other name must be
a field of the method's ``Params`` and goes to ``TrialConfig.params``. A ``condition`` refers to a
parameter listed earlier; when it does not hold, the parameter is not sampled (the method's default
applies). Files are read with ``yaml.safe_load`` only, and every problem is one
:class:`~dmlbench.errors.ConfigError` sentence naming the file and the entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dmlbench.config import TrialConfig, format_validation_error
from dmlbench.errors import ConfigError, close_matches

SPACES_DIR = Path(__file__).resolve().parent
PARAM_TYPES = ("float", "int", "categorical")
Scalar = bool | int | float | str | None
#: trial settings the sweep itself owns; a search space may not search or fix them
PROTOCOL_FIELDS = frozenset(
    {"method", "params", "dataset", "data_root", "phase", "seed", "fold", "num_folds", "split_seed", "output_dir"}
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())


class Condition(_Strict):
    """Sample a parameter only when an earlier one ``equals`` a value or is ``in`` a list."""

    param: str
    in_: tuple[Scalar, ...] | None = Field(default=None, alias="in")
    equals: Scalar = None

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("in" in data or "in_" in data) == ("equals" in data):
            raise ValueError("a condition needs exactly one of 'in: [...]' or 'equals: value'")
        return data

    def allowed(self) -> tuple[Scalar, ...]:
        return self.in_ if self.in_ is not None else (self.equals,)

    def holds(self, value: Any) -> bool:
        return value in self.allowed()


class ParamSpec(_Strict):
    """One searched parameter."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Scalar, ...] | None = None
    condition: Condition | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type not in PARAM_TYPES:
            hint = close_matches(self.type, list(PARAM_TYPES))
            did = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise ValueError(f"unknown type {self.type!r}{did}; valid types: {', '.join(PARAM_TYPES)}")
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical parameter takes only 'choices' (no low/high/log/step)")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes low/high, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs both 'low' and 'high'")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is greater than high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale parameter needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("'step' cannot be combined with 'log: true'")
        if self.step is not None and self.step <= 0:
            raise ValueError("'step' must be positive")
        if self.type == "int":
            for key, v in (("low", self.low), ("high", self.high), ("step", self.step)):
                if v is not None and float(v) != int(v):
                    raise ValueError(f"an int parameter needs an integer {key} (got {v})")
        return self


class SearchSpace(_Strict):
    """A method's validated search space."""

    method: str
    params: tuple[ParamSpec, ...] = ()
    fixed: dict[str, Any] = Field(default_factory=dict)
    source: str = Field(default="<memory>", exclude=True)

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Define-by-run body: suggest every parameter on an Optuna ``trial``; return ``fixed``.

        Conditional parameters whose condition does not hold are not suggested. The return value
        (the fixed values) is what ``OptunaSearch`` expects from a define-by-run function.
        """
        values: dict[str, Any] = {}
        for p in self.params:
            if p.condition is not None and not p.condition.holds(values.get(p.condition.param, _MISSING)):
                continue
            values[p.name] = suggest_one(trial, p)
        return dict(self.fixed)

    def without(self, names: set[str] | frozenset[str]) -> SearchSpace:
        """This space with ``names`` neither searched nor fixed (set elsewhere, e.g. by a sweep preset).

        Parameters conditioned on a removed parameter are removed too.
        """
        kept: list[ParamSpec] = []
        removed = set(names)
        for p in self.params:
            if p.name in removed or (p.condition is not None and p.condition.param in removed):
                removed.add(p.name)
                continue
            kept.append(p)
        fixed = {k: v for k, v in self.fixed.items() if k not in removed}
        return self.model_copy(update={"params": tuple(kept), "fixed": fixed})

    def define_by_run(self) -> Callable[[Any], dict[str, Any]]:
        """The function to pass as ``OptunaSearch(space=...)``."""
        return self.suggest


_MISSING = object()


def suggest_one(trial: Any, p: ParamSpec) -> Any:
    """Suggest one parameter on an Optuna trial according to its spec."""
    if p.type == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices or ()))
    assert p.low is not None and p.high is not None
    if p.type == "int":
        step = int(p.step) if p.step is not None else 1
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=step, log=p.log)
    return trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)


def method_param_names(method: str) -> list[str]:
    """Fields of a registered method's ``Params`` (raises listing valid methods when unknown)."""
    from dmlbench.methods import METHODS

    return sorted(METHODS.get(method).Params.model_fields)


def _check_names(space: SearchSpace, where: str) -> None:
    trial_fields = set(TrialConfig.model_fields) - PROTOCOL_FIELDS
    method_fields = set(method_param_names(space.method))
    valid = sorted(trial_fields | method_fields)

    def bad(name: str, entry: str) -> ConfigError:
        hint = close_matches(name, valid)
        did = f" (did you mean {', '.join(hint)}?)" if hint else ""
        return ConfigError(
            f"{where}: {entry} {name!r} is neither a trial setting nor a {space.method} parameter{did}; "
            f"{space.method} parameters: {', '.join(sorted(method_fields)) or 'none'}."
        )

    seen: set[str] = set()
    for i, p in enumerate(space.params):
        if p.name not in trial_fields and p.name not in method_fields:
            raise bad(p.name, f"params[{i}]")
        if p.name in seen:
            raise ConfigError(f"{where}: params[{i}] {p.name!r} is listed twice; keep one entry.")
        if p.name in space.fixed:
            raise ConfigError(f"{where}: {p.name!r} is both searched and fixed; remove it from one of the two.")
        if p.condition is not None:
            ref = next((q for q in space.params[:i] if q.name == p.condition.param), None)
            if ref is None:
                raise ConfigError(
                    f"{where}: params[{i}] {p.name!r} has a condition on {p.condition.param!r}, which is not "
                    "a parameter listed before it; list the parameter it depends on first."
                )
            if ref.type == "categorical":
                outside = [v for v in p.condition.allowed() if v not in (ref.choices or ())]
                if outside:
                    raise ConfigError(
                        f"{where}: params[{i}] {p.name!r} has a condition value {outside[0]!r} that is not "
                        f"among the choices of {ref.name!r} ({', '.join(map(str, ref.choices or ()))})."
                    )
        seen.add(p.name)
    for key in space.fixed:
        if key not in trial_fields and key not in method_fields:
            raise bad(key, "fixed key")


def parse_space(data: Any, source: str = "<memory>", method: str | None = None) -> SearchSpace:
    """Validate a loaded YAML mapping; ``method`` (when given) must match its ``method:`` key."""
    where = f"search space {source}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with keys method, params and optionally fixed.")
    params = data.get("params") or []
    if not isinstance(params, list):
        raise ConfigError(f"{where}: 'params' must be a list of entries like {{name: lr, type: float, ...}}.")
    specs: list[ParamSpec] = []
    for i, entry in enumerate(params):
        label = f"params[{i}]" + (f" ({entry.get('name')})" if isinstance(entry, dict) and "name" in entry else "")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: {label} must be a mapping like {{name: lr, type: float, low: 1e-5, high: 1e-3}}.")
        try:
            specs.append(ParamSpec.model_validate(entry))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, ParamSpec, f"{where} {label}")) from None
    top = {k: v for k, v in data.items() if k != "params"}
    try:
        space = SearchSpace.model_validate({**top, "params": [], "source": source})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, SearchSpace, where)) from None
    space = space.model_copy(update={"params": tuple(specs)})
    if method is not None and space.method != method:
        raise ConfigError(f"{where} is for method {space.method!r}, not {method!r}; pass the file for {method}.")
    _check_names(space, where)
    return space


def load_space_file(path: Path | str, method: str | None = None) -> SearchSpace:
    """Read and validate one search-space YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search-space file {str(p)!r} does not exist; pass an existing YAML file.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        if isinstance(err, yaml.constructor.ConstructorError):
            raise ConfigError(
                f"search space {p} uses a YAML tag that safe loading refuses{at} (e.g. !!python/...); "
                "use plain values only."
            ) from None
        raise ConfigError(f"search space {p} is not valid YAML{at}; fix the syntax.") from None
    return parse_space(data, source=str(p), method=method)


def default_space_path(method: str) -> Path:
    return SPACES_DIR / f"{method}.yaml"


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(method: str, override: Path | str | None = None) -> SearchSpace:
    """The search space of ``method``: ``override`` if given, else ``search_spaces/<method>.yaml``."""
    if override is not None:
        return load_space_file(override, method=method)
    path = default_space_path(method)
    if not path.is_file():
        raise ConfigError(
            f"method {method!r} has no search space (expected {path}); write one or pass --search-space FILE. "
            f"Available: {', '.join(available_spaces()) or 'none'}."
        )
    return load_space_file(path, method=method)


def split_values(method: str, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split sampled/fixed values into ``(trial config fields, method params)``."""
    trial_fields = set(TrialConfig.model_fields)
    method_fields = set(method_param_names(method))
    top: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for k, v in values.items():
        if k in trial_fields:
            top[k] = v
        elif k in method_fields:
            params[k] = v
        else:
            raise ConfigError(
                f"sampled value {k!r} is neither a trial setting nor a {method} parameter; check the search space."
            )
    return top, params


def build_trial_config(base: dict[str, Any], values: dict[str, Any]) -> TrialConfig:
    """``base`` trial settings (must include ``method``) + sampled/fixed ``values`` → TrialConfig."""
    top, params = split_values(str(base["method"]), values)
    from dmlbench.methods import METHODS
    from dmlbench.methods.base import layer_params

    merged_params = layer_params(METHODS.get(str(base["method"])), dict(base.get("params") or {}), params)
    return TrialConfig.from_dict({**base, **top, "params": merged_params})
