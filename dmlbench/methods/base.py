"""The Method contract (DESIGN §3).

A method is an ``nn.Module`` registered in :data:`METHODS` with:

* ``Params``: a pydantic model of its hyper-parameters (defaults; unknown keys are errors);
* ``build(cfg, backbone, num_classes)``: the module holding backbone, heads, proxies, queues;
* ``loss(batch) -> LossOutput``: total loss plus named, detached terms for one training step;
* ``param_groups(base_lr)``: every trainable tensor in exactly one group (the method owns its LRs);
* ``embed(images)``: the embedding evaluation uses;
* optional hooks called by the trainer (all under ``torch.no_grad`` except ``on_after_backward``
  which edits ``.grad``): ``on_train_start``, ``on_after_backward``, ``on_step_end``,
  ``on_epoch_end``; ``extra_state``/``load_extra_state`` for state outside modules.

The trainer never knows a method's name, and a method never runs the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from dmlbench.errors import Diverged
from dmlbench.registry import Registry

if TYPE_CHECKING:
    from dmlbench.config import TrialConfig


class MethodParams(BaseModel):
    """Base for every method's ``Params``: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


def _as_float_image(x: Tensor, memory_format: torch.memory_format = torch.preserve_format) -> Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float32, memory_format=memory_format).div_(255.0)
    return x if memory_format == torch.preserve_format else x.contiguous(memory_format=memory_format)


@dataclass
class Batch:
    """One training batch. ``views[0]`` is the main view; methods with ``n_views = 2`` get two.

    ``host_labels``: the labels as they were on the host before :meth:`to` moved them (None
    when unknown); :meth:`labels_on_host` gives them without a device read-back."""

    views: list[Tensor]
    labels: Tensor
    indices: Tensor
    host_labels: Tensor | None = None

    @property
    def images(self) -> Tensor:
        return self.views[0]

    def labels_on_host(self) -> Tensor:
        """The labels on the CPU: the host copy kept by :meth:`to` (no device sync), else ``labels``
        itself when it is on the CPU, else a read-back."""
        if self.host_labels is not None:
            return self.host_labels
        return self.labels if self.labels.device.type == "cpu" else self.labels.cpu()

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory. A ``DataLoader`` with ``pin_memory=True`` pins custom batch
        types only through this method, and only pinned batches copy asynchronously."""
        return Batch([v.pin_memory() for v in self.views], self.labels.pin_memory(), self.indices)

    def to(self, device: torch.device | str, memory_format: torch.memory_format = torch.preserve_format) -> Batch:
        """Move to ``device`` (asynchronously from pinned memory); uint8 images become float in
        [0, 1] there, in ``memory_format`` (e.g. ``torch.channels_last``), in the same pass. The
        host labels are kept as ``host_labels`` (methods that sample on the CPU read them there)."""
        host = self.host_labels if self.host_labels is not None else (
            self.labels if self.labels.device.type == "cpu" else None)
        return Batch(
            [_as_float_image(v.to(device, non_blocking=True), memory_format) for v in self.views],
            self.labels.to(device, non_blocking=True),
            self.indices,
            host,
        )


@dataclass
class LossOutput:
    """Total loss and named terms (floats or 0-d tensors; logged detached).

    Give terms computed on the device as 0-d tensors: the trainer keeps them there and reads
    them back every ``sync_every`` steps; ``float(tensor)`` in ``loss`` would wait for the device
    on every step."""

    total: Tensor
    terms: dict[str, float | Tensor] = field(default_factory=dict)

    def logs(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach())}
        for k, v in self.terms.items():
            out[k] = float(v.detach()) if isinstance(v, Tensor) else float(v)
        return out


#: a divergence check of one step (:meth:`TrainContext.diverged_if`): a 0-d bool flag and the
#: 0-d values to report with it
StepCheck = tuple[Tensor, dict[str, Tensor]]


@dataclass
class TrainContext:
    """What the trainer hands to method hooks.

    Attributes:
        cfg: the trial config.
        device: where the model lives.
        optimizer: the optimiser built from ``param_groups``.
        epoch: current epoch (1-based inside training; 0 before the first epoch).
        step: optimiser steps done so far.
        train_loader: iterable of :class:`Batch` on the training classes (train transform).
        val_metrics: metrics of the latest validation (fresh at ``on_epoch_end``), else {}.
        embed_train_pool: ``draws -> Tensor[T, C, D]``: T draws of one training image per class
            (train transform, model in eval mode, no grad, raw ``pool_embed`` output), for CCP.
        embed_train_set: ``() -> (Tensor[N, D], Tensor[N])``: ``pool_embed`` of every training
            image with the eval transform (model in eval mode, no grad) and its label 0..C-1
            (nivMF warm start from class means).
        train_class_ids: the dataset class ids of the training classes, in the column order of
            ``embed_train_pool`` (class index c ↔ label c of the training batches).
        log: a dict hooks may add scalar logs to (merged into the epoch's metrics).
        train_class_counts: number of training images per class, in label order (0..C-1).
        deferred_checks: where :meth:`diverged_if` puts a step's device-side divergence flags
            (the trainer sets a list and reads them back with the step logs); None: checked now.
    """

    cfg: TrialConfig
    device: torch.device
    optimizer: torch.optim.Optimizer
    train_loader: Iterable[Batch]
    embed_train_pool: Callable[[int], Tensor]
    embed_train_set: Callable[[], tuple[Tensor, Tensor]]
    epoch: int = 0
    step: int = 0
    val_metrics: dict[str, float] = field(default_factory=dict)
    log: dict[str, float] = field(default_factory=dict)
    train_class_counts: list[int] | None = None
    deferred_checks: list[StepCheck] | None = None

    def diverged_if(self, flag: Tensor, values: dict[str, Tensor]) -> None:
        """Training diverged at step ``self.step`` where the 0-d bool ``flag`` is true (e.g. nivMF's
        temperature left T > 0); ``values`` (0-d tensors) go into the report.

        Under the trainer (``deferred_checks`` set) nothing is read back here: the flag and values
        travel with the step logs (copied into the step's row as soon as the step ends, so a value
        that aliases a parameter is taken as it is then) and are read back with them, every
        ``sync_every`` steps and before anything is saved, where a set flag raises
        :class:`~dmlbench.errors.Diverged` naming this step. Call it on every step (a run of steps
        whose checks change is read back at each change). Without ``deferred_checks`` (a hook
        called directly) the flag is read back and checked now.
        """
        if self.deferred_checks is not None:
            self.deferred_checks.append((flag.detach().reshape(()), {k: v.detach() for k, v in values.items()}))
            return
        if bool(flag):
            raise Diverged(self.step, float("nan"), {k: float(v) for k, v in values.items()})


class Method(nn.Module):
    """Base class of every registered method. Subclasses set ``Params`` and implement ``loss``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: number of augmented views per image in a training batch (DiVA: 2)
    n_views: ClassVar[int] = 1
    #: how evaluation compares embeddings: "cosine" (L2-normalised, inner product) or
    #: "euclidean" (raw L2 distance; CCP's unit-ball embeddings)
    eval_distance: ClassVar[str] = "cosine"
    #: distance of extra ``embed_for_eval`` keys that are not compared by ``eval_distance``
    #: (nivMF: ``{"euclidean_raw": "euclidean"}``)
    eval_distances: ClassVar[dict[str, str]] = {}
    #: groups of alternative parameters (e.g. CCP's pool_size / pool_ratio): when a later
    #: configuration layer sets one of a group, the others set by earlier layers are dropped
    exclusive_params: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __init__(self, cfg: TrialConfig, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.hparams = self.Params.model_validate(cfg.params)
        self.backbone = backbone
        self.num_classes = num_classes

    @classmethod
    def check_config(cls, cfg: TrialConfig) -> None:
        """Cross-field checks between the trial config and this method's params (batch composition,
        dimensions). Called when a :class:`TrialConfig` is built; raise ``ConfigError`` with one
        sentence. Default: nothing to check."""

    @classmethod
    def published_dims(cls, dataset: str) -> tuple[int, ...]:
        """Embedding sizes this method's paper (or reference scripts) published results for on
        ``dataset``; the ``paper`` protocol runs each of them unless ``--embedding-dims`` says
        otherwise. Default: none (the method has no paper recipe in dmlbench)."""
        return ()

    @classmethod
    def recipe(cls, dataset: str, dim: int, embedded: bool) -> Recipe | None:
        """The published training recipe for ``dataset`` at embedding size ``dim`` (the ``paper``
        protocol), or None when this method has none. A recipe for a dataset or size the paper did
        not publish is returned with ``extrapolated`` saying what it was derived from."""
        return None

    @classmethod
    def grace_epochs(cls, cfg: TrialConfig) -> int:
        """Epochs (validation rounds) a trial of ``cfg`` needs before its validation score means
        anything, e.g. its first LR milestone; ASHA never prunes earlier. Default: 1."""
        return 1

    @classmethod
    def space_bounds(cls, base: dict[str, Any], n_train_images: int) -> dict[str, float]:
        """Upper bounds of searched params for a run of ``base`` settings on ``n_train_images``
        training images (DiVA: its queue holds at most the training set); the planner narrows the
        cell's search space with them. Default: none."""
        return {}

    #: method params that switch the method's own LR schedule off (the ``mlrc`` protocol trains
    #: every method with one common constant LR); they are then not searched either
    own_schedule_off: ClassVar[dict[str, Any]] = {}

    @classmethod
    def recommended(cls, dataset: str, embedded: bool) -> dict[str, Any]:
        """Overrides of trial keys (and ``"params"``) this method recommends for a dataset; applied
        by ``dmlbench train``/``sweep`` after the dataset's preset and before the user's values.
        Default: none. E.g. a method whose proxy LR multipliers assume a pretrained ResNet can
        scale them down for the from-scratch ``tiny`` backbone on embedded data."""
        return {}

    @classmethod
    def build(cls, cfg: TrialConfig, backbone: nn.Module, num_classes: int) -> Method:
        """Construct the method around ``backbone`` (which outputs ``cfg.embedding_dim`` features)."""
        return cls(cfg, backbone, num_classes)

    # ---- required -------------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__}.loss is not implemented")

    def embed(self, images: Tensor) -> Tensor:
        """Embedding used for retrieval. Default: L2-normalised backbone output."""
        return nn.functional.normalize(self.backbone(images).float(), dim=-1)

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Default: one group with every trainable parameter at ``base_lr``."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": base_lr, "name": "all"}]

    # ---- optional -------------------------------------------------------------------------
    def embed_for_eval(self, images: Tensor) -> dict[str, Tensor]:
        """Embeddings to evaluate: key ``""`` is the primary one (= ``embed``); other keys are
        extra variants (DiVA single heads, other head weightings) whose metrics are logged as
        ``"<key>/<metric>"``. Default: only the primary."""
        return {"": self.embed(images)}

    def pool_embed(self, images: Tensor) -> Tensor:
        """Raw embedding used to (re-)initialise proxies (CCP k-center, nivMF warm start)."""
        return self.backbone(images).float()

    def configure_scheduler(
        self, optimizer: torch.optim.Optimizer, epochs: int
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        """A per-epoch LR scheduler, or None to use the trial config's ``schedule``."""
        return None

    def iters_per_epoch(self) -> int | None:
        """Method-level override of the steps per epoch (CCP: one validation round), or None."""
        return None

    def on_train_start(self, ctx: TrainContext) -> None:
        """Before the first step (proxy init, queue fill). Runs under ``torch.no_grad``."""

    def on_after_backward(self, ctx: TrainContext) -> None:
        """After ``backward`` and before clipping and ``optimizer.step`` (gradient transforms)."""

    def on_step_end(self, ctx: TrainContext) -> None:
        """After ``optimizer.step`` (EMA, queues). Runs under ``torch.no_grad``."""

    def on_epoch_end(self, ctx: TrainContext) -> dict[str, float]:
        """After the epoch's validation (``ctx.val_metrics`` is fresh). Returns logs."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """State not held in modules/buffers (RNG states, controllers); saved in checkpoints.

        Must contain only tensors, numbers, strings, lists and dicts (``weights_only`` loading).
        """
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state but the checkpoint carries some")

    def log_stats(self, batch: Batch) -> dict[str, float | Tensor]:
        """Extra per-step diagnostics (e.g. embedding norms); cheap, detached. Return 0-d tensors,
        not ``float(tensor)``: the trainer averages them on the device without a host sync."""
        return {}

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)


@dataclass(frozen=True)
class Recipe:
    """A method's published recipe for one dataset and embedding size (the ``paper`` protocol).

    Attributes:
        settings: TrialConfig keys (and ``"params"``, the method's hyper-parameters).
        source: where the values come from (paper table, reference script and line).
        selection: how the paper itself selected the checkpoint it reported (e.g. "best test-set
            R@1 epoch"); rows of the ``paper`` protocol carry it, because ours are scored once at
            the recipe's last epoch.
        extrapolated: None when the paper published this setting; otherwise what it was derived
            from (e.g. "SOP recipe; DiVA has no In-Shop setting").
        fold_models: the paper itself trained class-disjoint fold models selected on their held-out
            fold (the MLRC protocol, e.g. CCP): the ``paper`` protocol then does the same (per seed
            all fold models, "separate" and "concatenated" rows) instead of one full-train run.
    """

    settings: dict[str, Any]
    source: str
    selection: str
    extrapolated: str | None = None
    fold_models: bool = False


def layer_params(method: type[Method], base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``{**base, **extra}`` for method params, honouring ``method.exclusive_params``.

    Example:
        >>> class M(Method):
        ...     exclusive_params = (("pool_size", "pool_ratio"),)
        >>> layer_params(M, {"pool_ratio": 1.5, "lam": 1.0}, {"pool_size": 3})
        {'lam': 1.0, 'pool_size': 3}
    """
    out = dict(base)
    for group in method.exclusive_params:
        if any(k in extra for k in group):
            for k in group:
                if k not in extra:
                    out.pop(k, None)
    out.update(extra)
    return out


def check_param_groups(method: Method, groups: list[dict[str, Any]]) -> None:
    """Every trainable parameter in exactly one group; raises ValueError naming the offenders."""
    seen: dict[int, str] = {}
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"a parameter is in groups {seen[id(p)]!r} and {g.get('name')!r}")
            seen[id(p)] = str(g.get("name"))
    missing = [n for n, p in method.named_trainable() if id(p) not in seen]
    if missing:
        raise ValueError(f"trainable parameters in no group: {', '.join(missing[:5])}")


METHODS: Registry[type[Method]] = Registry("method")
