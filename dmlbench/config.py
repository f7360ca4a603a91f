"""Validated, frozen configuration of one trial (``TrialConfig``).

Everything a trial needs is in its ``TrialConfig``: it is frozen, rejects unknown keys (naming the
key and suggesting close matches), validates the method's own ``params`` with the method's
``Params`` model, and round-trips through JSON/YAML. It is saved in every checkpoint and in every
result row (``config_json``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dmlbench.errors import ConfigError, close_matches

Phase = Literal["search", "final"]


class StrictModel(BaseModel):
    """Frozen pydantic model that forbids unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


def format_validation_error(err: ValidationError, model: type[BaseModel], where: str) -> str:
    """Turn a pydantic error into one readable sentence per problem.

    Unknown keys are named with close matches among the model's fields.
    """
    msgs: list[str] = []
    fields = sorted(model.model_fields)
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError):  # raised by a validator: already one clear sentence
            msgs.append(str(inner).rstrip("."))
        elif e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            hint = close_matches(key, fields)
            did = f" (did you mean {', '.join(hint)}?)" if hint else ""
            msgs.append(f"unknown key {key!r} in {where}{did}; valid keys: {', '.join(fields)}")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            place = f"{where} key {loc!r}" if e["loc"] else where
            msgs.append(f"{place}: {msg.rstrip('.')}{shown}")
    return "; ".join(msgs) + "."


def validate_model(model: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """``model(**data)`` with a :class:`ConfigError` of one clear sentence on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        inner = (errors[0].get("ctx") or {}).get("error") if len(errors) == 1 else None
        if isinstance(inner, ConfigError):  # keep the validator's own error type (e.g. UnknownNameError)
            raise inner from None
        raise ConfigError(format_validation_error(err, model, where)) from None


class TrialConfig(StrictModel):
    """One training run: method × dataset × backbone × hyper-parameters × seed × split."""

    # what
    method: str = Field(description="registered method name, e.g. nivmf, ccp, diva, proxyanchor")
    dataset: str = Field(description="registered dataset name, e.g. digits, synthetic, cub200")
    dataset_kwargs: dict[str, Any] = Field(default_factory=dict, description="dataset options (synthetic sizes)")
    data_root: str | None = Field(default=None, description="root of the benchmark datasets ($DMLBENCH_DATA)")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's hyper-parameters")

    # model
    backbone: str = "resnet50"
    pretrained: bool | str = Field(
        default=True, description="True: timm weights from the local cache; a path: local weights; False: random"
    )
    embedding_dim: int = Field(default=128, gt=0)
    image_size: int = Field(default=224, ge=8)
    crop_scale: tuple[float, float] | None = Field(
        default=None, description="RandomResizedCrop area range of training images; None: (0.08, 1), embedded data (0.6, 1)"
    )
    bn_policy: Literal["train", "frozen_stats", "frozen_all"] = "frozen_stats"

    # optimisation
    epochs: int = Field(default=30, ge=1)
    iters_per_epoch: int | None = Field(default=None, ge=1, description="None: one pass over the training images")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimiser steps")
    classes_per_batch: int = Field(default=16, ge=2)
    samples_per_class: int = Field(default=2, ge=1)
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=4e-4, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    adam_eps: float = Field(default=1e-8, gt=0)
    schedule: Literal["constant", "multistep", "cosine"] = "constant"
    milestones: tuple[int, ...] = Field(default=(), description="epochs at which multistep multiplies lr by gamma")
    gamma: float = Field(default=0.1, gt=0, le=1)
    grad_clip_norm: float | None = Field(default=None, gt=0)
    grad_clip_value: float | None = Field(default=None, gt=0)
    amp: Literal["auto", "off", "bf16"] = Field(
        default="auto", description="auto: bf16 autocast on CUDA, off on CPU; bf16 forces it (CPU too)"
    )

    # protocol
    phase: Phase = "search"
    fold: int | None = Field(default=0, ge=0, description="validation fold; None trains on all training classes")
    num_folds: int = Field(default=4, ge=2)
    split_seed: int = 0
    seed: int = 0
    deterministic: bool = False
    eval_every: int = Field(default=1, ge=1)
    eval_at_start: bool = Field(default=True, description="score the untrained network first (epoch 0)")
    early_stop_metric: str = "map_at_r"
    early_stop_patience: int | None = Field(default=None, ge=1)
    early_stop_min_delta: float = Field(default=0.0, ge=0)
    val_clustering: bool = Field(
        default=True,
        description="compute NMI/F1 (k-means) at every validation; off saves time on SOP-sized folds "
        "(the test split always gets them)",
    )

    # runtime
    device: str = "auto"
    num_workers: int = Field(
        default=0, ge=0, description="data-loader worker processes (0: load in the trial process); "
        "see dmlbench.engine.runtime.loader_settings for the defaults per --cpus-per-trial",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="intra-op CPU threads of the trial process; None: as torch starts (OMP_NUM_THREADS)"
    )
    pin_memory: bool | None = Field(
        default=None, description="page-locked batches for asynchronous host-to-device copies; None: on when training on CUDA"
    )
    channels_last: bool | None = Field(
        default=None, description="NHWC memory format for model and batches; None: on for convolutional backbones on CUDA"
    )
    torch_compile: bool = Field(
        default=False, description="compile the backbone's forward with torch.compile (first steps slower; needs a C compiler)"
    )
    sync_every: int = Field(
        default=50, ge=1, description="training steps between host synchronisations: step logs stay on the device and "
        "the non-finite loss check reads them back every this many steps and at the end of each epoch",
    )
    eval_batch_size: int = Field(default=256, ge=1)
    eval_chunk: int = Field(default=4096, ge=1)
    knn_backend: Literal["auto", "torch", "faiss"] = "auto"
    output_dir: str | None = Field(default=None, description="checkpoints and logs; None: no files written")
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _validate_method_params(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "method" not in data:
            return data
        from dmlbench.methods import METHODS

        method_cls = METHODS.get(str(data["method"]))
        params = data.get("params") or {}
        if isinstance(params, BaseModel):
            params = params.model_dump()
        validated = validate_model(method_cls.Params, dict(params), f"{data['method']} params")
        return {**data, "params": validated.model_dump(mode="json")}

    @model_validator(mode="after")
    def _cross_checks(self) -> TrialConfig:
        if self.fold is not None and self.fold >= self.num_folds:
            raise ValueError(f"fold must be < num_folds={self.num_folds}, got {self.fold}")
        if self.phase == "search" and self.fold is None:
            raise ValueError("the search phase needs a validation fold (the test split is never read in search)")
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones")
        if not self.val_clustering and self.early_stop_metric in ("nmi", "f1"):
            raise ValueError(f"early_stop_metric {self.early_stop_metric!r} needs val_clustering=true")
        from dmlbench.methods import METHODS

        METHODS.get(self.method).check_config(self)
        return self

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialConfig:
        """Build and validate; any problem is a :class:`ConfigError` naming the key."""
        return validate_model(cls, data, "trial config")  # type: ignore[no-any-return]

    @classmethod
    def from_json(cls, text: str) -> TrialConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls, text: str) -> TrialConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"a trial config YAML cannot be read safely ({first}); fix it or remove Python tags.") from None
        if not isinstance(data, dict):
            raise ConfigError("a trial config YAML must be a mapping of keys to values.")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> TrialConfig:
        """A validated copy with some fields changed."""
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def with_overrides(self, assignments: list[str]) -> TrialConfig:
        """Apply ``key=value`` strings (values parsed as YAML scalars).

        ``params.x=1`` sets a method parameter; a bare key that is not a trial field but is a
        parameter of the method is taken as ``params.<key>``.
        """
        data = self.to_dict()
        params = dict(data["params"])
        from dmlbench.methods import METHODS
        from dmlbench.methods.base import layer_params

        method_cls = METHODS.get(self.method)
        method_fields = set(method_cls.Params.model_fields)
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r}.")
            key, raw = item.split("=", 1)
            key = key.strip()
            value = yaml.safe_load(raw) if raw.strip() else None
            if key.startswith("params."):
                params = layer_params(method_cls, params, {key[len("params.") :]: value})
            elif key in TrialConfig.model_fields:
                data[key] = value
            elif key in method_fields:
                params = layer_params(method_cls, params, {key: value})
            else:
                valid = sorted(TrialConfig.model_fields) + sorted(method_fields)
                hint = close_matches(key, valid)
                did = f" (did you mean {', '.join(hint)}?)" if hint else ""
                raise ConfigError(
                    f"unknown key {key!r} in --set{did}; use a trial key ({', '.join(sorted(TrialConfig.model_fields))})"
                    f" or a {self.method} parameter ({', '.join(sorted(method_fields)) or 'none'})."
                )
        data["params"] = params
        return TrialConfig.from_dict(data)

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    def digest(self, length: int = 12) -> str:
        """Stable short hash of the whole config (row and run ids)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:length]

    def method_params(self) -> BaseModel:
        from dmlbench.methods import METHODS

        return METHODS.get(self.method).Params.model_validate(self.params)  # type: ignore[no-any-return]
