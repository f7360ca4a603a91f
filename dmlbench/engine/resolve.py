"""Layered trial configuration: defaults < dataset preset < method recommendation < file < overrides.

Used by ``dmlbench train`` and the sweep presets so that e.g. ``dmlbench train --method nivmf
--dataset digits`` picks the tiny backbone and small images that make it a one-minute CPU run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dmlbench.config import TrialConfig
from dmlbench.datasets import DATASETS
from dmlbench.errors import ConfigError
from dmlbench.methods import METHODS, Method
from dmlbench.methods.base import layer_params


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(p)!r} is a folder; pass a YAML file of trial keys.") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise ConfigError(f"config file {str(p)!r} cannot be read ({reason}); pass a readable YAML text file.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML ({str(err).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of trial keys to values.")
    return data


def _merge(method: type[Method], base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {**base, **{k: v for k, v in extra.items() if k != "params"}}
    out["params"] = layer_params(method, base.get("params", {}), extra.get("params", {}))
    return out


def layered_config(
    method: str, dataset: str, explicit: dict[str, Any] | None = None, file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> TrialConfig:
    """Resolve a :class:`TrialConfig` from the layers (later wins)."""
    method_cls = METHODS.get(method)
    source_cls = DATASETS.get(dataset)
    data: dict[str, Any] = {"method": method, "dataset": dataset, "params": {}}
    data = _merge(method_cls, data, dict(getattr(source_cls, "preset", {}) or {}))
    data = _merge(method_cls, data, method_cls.recommended(dataset, bool(getattr(source_cls, "embedded", False))))
    if file is not None:
        data = _merge(method_cls, data, read_config_file(file))
    data = _merge(method_cls, data, explicit or {})
    data["method"], data["dataset"] = method, dataset
    cfg = TrialConfig.from_dict(data)
    return cfg.with_overrides(overrides) if overrides else cfg
