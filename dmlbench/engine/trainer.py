"""The training loop: one method × dataset × backbone run, Ray-free (DESIGN §2).

``train(cfg, report=fn)`` trains the run described by a :class:`TrialConfig`, evaluates on the
validation fold every ``eval_every`` epochs, keeps ``last`` and ``best`` checkpoints, resumes
exactly from ``last``, stops early on the chosen metric, and in the final phase evaluates the best
checkpoint once on the test split. ``fn(epoch, metrics, checkpoint_dir)`` is called after every
evaluation; the Ray trainable uses it to report to Tune. The loop never knows a method's name.
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dmlbench.config import TrialConfig
from dmlbench.datasets import DatasetSource, SampleTable, trial_source
from dmlbench.datasets.splits import SplitManifest, TrialSplit, make_manifest, trial_split
from dmlbench.datasets.torchdata import ClassBalancedBatchSampler, ImageDataset, make_loader
from dmlbench.datasets.transforms import build_transform
from dmlbench.engine.backbones import build_backbone
from dmlbench.engine.runtime import model_memory_format, pin_memory_for, trial_runtime, use_channels_last
from dmlbench.errors import CheckpointError, ConfigError, DatasetError, Diverged
from dmlbench.fsutil import atomic_open
from dmlbench.methods import METHODS, Batch, LossOutput, Method, TrainContext
from dmlbench.methods.base import StepCheck, check_param_groups

Report = Callable[[int, dict[str, float], "str | None"], None]
CHECKPOINT_VERSION = 1


@dataclass
class TrainResult:
    """What a finished run returns (also what a result row is built from)."""

    cfg: TrialConfig
    metrics: dict[str, float]
    eval_split: str
    best_epoch: int
    epochs_run: int
    steps: int
    wall_time_s: float
    split_hash: str
    pretrained_id: str
    history: list[dict[str, float]] = field(default_factory=list)
    test_metrics: dict[str, float] | None = None
    stopped_early: bool = False
    #: the primary test-split embedding the test metrics were computed on (final phase; rows of the
    #: split's test images in index order), for the concatenation of a seed's fold models
    test_embedding: Tensor | None = None


# ---- small utilities ---------------------------------------------------------------------
def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} was asked for but CUDA is not available; use device=cpu or auto.")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Scoped deterministic algorithms / cuDNN settings; previous values are restored."""
    if not enabled:
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[1], prev[2]


def autocast_for(cfg: TrialConfig, device: torch.device) -> Any:
    """bf16 autocast on CUDA when ``amp`` is auto/bf16; on CPU only when ``amp='bf16'``."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(1)[0])


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_open(path) as f:
        torch.save(obj, f)


def load_checkpoint(path: Path, cfg: TrialConfig | None = None) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``); a corrupt one or one from another run is a
    :class:`CheckpointError` naming the path."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}); delete it to start the run over."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_VERSION or "config" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a dmlbench checkpoint of format {CHECKPOINT_VERSION}.")
    if cfg is not None:
        theirs = ckpt["config"]
        for key in ("method", "dataset", "backbone", "embedding_dim"):
            if theirs.get(key) != getattr(cfg, key):
                raise CheckpointError(
                    f"checkpoint {str(path)!r} belongs to a run with {key}={theirs.get(key)!r}, not "
                    f"{getattr(cfg, key)!r}; use another output folder or delete the checkpoint."
                )
    return ckpt  # type: ignore[no-any-return]


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as err:
        raise ConfigError(f"output folder {str(path)!r} is not writable ({err.strerror}); choose another.") from None


# ---- data --------------------------------------------------------------------------------
@dataclass
class TrialData:
    source: DatasetSource
    table: SampleTable
    manifest: SplitManifest
    split: TrialSplit
    label_map: dict[int, int]


def prepare_data(cfg: TrialConfig) -> TrialData:
    """Load the dataset, make the fold manifest and pick this trial's images; checks that the
    requested batches can be formed."""
    source = trial_source(cfg)
    table = source.table()
    if not source.embedded:
        # decoded once per (dataset, size) into a node-local cache shared by every trial
        from dmlbench.datasets.cache import cached_table

        table = cached_table(table, dataset_id=cfg.dataset, size=cfg.image_size)
    manifest = make_manifest(table, cfg.dataset, cfg.num_folds, cfg.split_seed)
    split = trial_split(table, manifest, cfg.phase, cfg.fold)
    label_map = {c: i for i, c in enumerate(split.train_classes)}
    counts = np.bincount([label_map[int(c)] for c in table.labels[split.train]], minlength=len(label_map))
    if cfg.classes_per_batch > len(label_map):
        raise DatasetError(
            f"classes_per_batch={cfg.classes_per_batch} but this trial trains on {len(label_map)} classes of "
            f"{cfg.dataset}; lower classes_per_batch."
        )
    if int(counts.max()) < cfg.samples_per_class:
        raise DatasetError(
            f"a batch cannot be formed: samples_per_class={cfg.samples_per_class} but the largest training class of "
            f"{cfg.dataset} has {int(counts.max())} images (every class would be repeated); lower samples_per_class."
        )
    small = int((counts < cfg.samples_per_class).sum())
    if small:
        # filled by repeating images under fresh augmentations (ClassBalancedBatchSampler), never an error
        print(f"note: {small} of {len(label_map)} training classes of {cfg.dataset} have fewer than "
              f"samples_per_class={cfg.samples_per_class} images (smallest: {int(counts.min())}); their batches "
              f"repeat images under fresh augmentations.", file=sys.stderr)
    return TrialData(source, table, manifest, split, label_map)


# ---- evaluation ----------------------------------------------------------------------------
@contextmanager
def eval_precision(method: Method, cfg: TrialConfig, device: torch.device) -> Iterator[None]:
    """Forward passes for evaluation embeddings: float32 everywhere but in the trunk.

    The trunk (``method.backbone.trunk``, the costly part) runs under the trial's autocast (bf16
    on CUDA by default) and its pooled features are cast to float32; the embedding head(s) and
    whatever a method does after them (normalisation, DiVA's weighted concatenation, CCP's unit
    ball) run with autocast off, so evaluation embeddings are float32 values, not bf16 ones cast
    up. A backbone without a ``trunk`` runs entirely in float32.
    """
    cast = autocast_for(cfg, device)
    trunk = getattr(method.backbone, "trunk", None)
    if isinstance(cast, nullcontext) or not isinstance(trunk, torch.nn.Module):
        yield
        return
    entered: list[Any] = []

    def before(module: torch.nn.Module, args: Any) -> None:
        ctx = autocast_for(cfg, device)
        ctx.__enter__()
        entered.append(ctx)

    def after(module: torch.nn.Module, args: Any, output: Tensor) -> Tensor:
        entered.pop().__exit__(None, None, None)
        return output.float()

    hooks = [trunk.register_forward_pre_hook(before), trunk.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        while entered:  # the trunk raised: leave its autocast
            entered.pop().__exit__(None, None, None)


@torch.no_grad()
def embed_indices(
    method: Method, table: SampleTable, indices: np.ndarray, cfg: TrialConfig, device: torch.device,
    embedded: bool, memory_format: torch.memory_format | None = None,
) -> dict[str, Tensor]:
    """Float32 evaluation embeddings of the images ``indices`` per ``embed_for_eval`` key, left on
    ``device`` (the k-NN and k-means then run there); see :func:`eval_precision`.

    Batches go to the device in ``memory_format``, the model's own by default
    (:func:`~dmlbench.engine.runtime.model_memory_format`: ``channels_last`` for a convolutional
    model the trainer put in it, as its training batches are; unchanged otherwise)."""
    ds = ImageDataset(table, indices, build_transform(cfg.image_size, train=False, embedded=embedded))
    loader = make_loader(ds, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers)
    fmt = model_memory_format(method) if memory_format is None else memory_format
    was_training = method.training
    method.eval()
    parts: dict[str, list[Tensor]] = {}
    try:
        with eval_precision(method, cfg, device):
            for batch in loader:
                out = method.embed_for_eval(batch.to(device, fmt).images)
                for k, v in out.items():
                    parts.setdefault(k, []).append(v.float())
    finally:
        method.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


def evaluate_indices(
    method: Method, data: TrialData, indices: np.ndarray, cfg: TrialConfig, device: torch.device,
    query_gallery: bool = False, step: int = 0, clustering: bool = True, cluster_keys: set[str] | None = None,
    keep: dict[str, Tensor] | None = None, memory_format: torch.memory_format | None = None,
) -> dict[str, float]:
    """Metrics of ``method`` on the images ``indices`` (self-retrieval, or query/gallery).

    ``clustering=False`` leaves out NMI/F1 (k-means); ``cluster_keys`` limits them to these
    ``embed_for_eval`` keys (``""``: the primary embedding; validation passes the primary key and
    the early-stop metric's, the test split clusters every key). Non-finite embeddings (a model
    that blew up without a non-finite loss) raise :class:`Diverged`. ``memory_format``: that of
    the batches (see :func:`embed_indices`).
    """
    from dmlbench.evaluation import evaluate_embeddings

    embs = embed_indices(method, data.table, indices, cfg, device, data.source.embedded, memory_format)
    if keep is not None:  # the caller keeps the embeddings (the final phase's fold-model concatenation)
        keep.update(embs)
    for key, emb in embs.items():
        if not bool(torch.isfinite(emb).all()):
            raise Diverged(step, float("nan"), {f"non-finite {key or 'primary'} embeddings": float("nan")})
    labels = data.table.labels[indices]
    kwargs: dict[str, Any] = dict(
        recall_ks=data.source.recall_ks, chunk_size=cfg.eval_chunk, backend=cfg.knn_backend, seed=cfg.seed,
    )
    retrieval_only = ("map_at_r", "r_precision", "precision_at_1", "recall")
    if not clustering:
        kwargs["metrics"] = retrieval_only
    if query_gallery and data.table.is_query is not None and data.table.is_gallery is not None:
        kwargs["query_mask"] = data.table.is_query[indices]
        kwargs["gallery_mask"] = data.table.is_gallery[indices]
    metrics: dict[str, float] = {}
    for key, emb in embs.items():
        distance = method.eval_distances.get(key, method.eval_distance)
        extra = {"metrics": retrieval_only} if cluster_keys is not None and key not in cluster_keys else {}
        res = evaluate_embeddings(emb, labels, distance=distance, **{**kwargs, **extra})
        prefix = f"{key}/" if key else ""
        metrics.update({f"{prefix}{k}": float(v) for k, v in res.items()})
    return metrics


# ---- optimisation ------------------------------------------------------------------------
def make_optimizer(cfg: TrialConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items()} for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


def make_scheduler(cfg: TrialConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


# ---- the loop ----------------------------------------------------------------------------
class _Progress:
    """A step progress bar on an interactive terminal (rich), and one line per epoch otherwise."""

    def __init__(self, enabled: bool, total_epochs: int, label: str):
        self.enabled = enabled
        self.total = total_epochs
        self.label = label
        self.bar: Any = None
        self.task: Any = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            )

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task(f"[{self.label}] epoch {epoch}/{self.total}", total=steps)

    def advance(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task)

    def epoch(self, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.remove_task(self.task)
            self.bar.stop()
            self.task = None
        if not self.enabled:
            return
        shown = {k: metrics[k] for k in ("loss", "map_at_r", "precision_at_1", "recall_at_1") if k in metrics}
        text = "  ".join(f"{k}={v:.4f}" for k, v in shown.items())
        print(f"[{self.label}] epoch {epoch}/{self.total} ({seconds:.1f}s)  {text}", file=sys.stderr, flush=True)


def train(cfg: TrialConfig, report: Report | None = None) -> TrainResult:
    """Train one run; see the module docstring. Raises :class:`Diverged` on a non-finite loss."""
    t_start = time.time()
    device = resolve_device(cfg.device)
    with trial_runtime(cfg.torch_threads, device, cfg.deterministic), deterministic_mode(cfg.deterministic):
        return build_trainer(cfg, report, t_start).run()


def build_trainer(cfg: TrialConfig, report: Report | None = None, t_start: float | None = None) -> Trainer:
    """Everything :func:`train` sets up before its first step (data, seeded model on its device in
    its memory format, optimiser, scheduler), as a :class:`Trainer`; ``train`` runs it. Benchmarks
    use it to time :meth:`Trainer.run_steps` on batches of their own."""
    t_start = time.time() if t_start is None else t_start
    device = resolve_device(cfg.device)
    method_cls = METHODS.get(cfg.method)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    if out_dir is not None:
        check_writable(out_dir)
    if cfg.early_stop_metric.split("/")[-1] not in _KNOWN_METRICS and not cfg.early_stop_metric.startswith("recall_at_"):
        raise ConfigError(
            f"unknown early_stop_metric {cfg.early_stop_metric!r}; use one of {', '.join(sorted(_KNOWN_METRICS))} "
            f"or recall_at_K."
        )
    data = prepare_data(cfg)
    seed_everything(cfg.seed)
    backbone = build_backbone(cfg)
    method = method_cls.build(cfg, backbone, num_classes=len(data.label_map)).to(device)
    memory_format = torch.channels_last if use_channels_last(cfg.channels_last, device, backbone) else torch.preserve_format
    if memory_format == torch.channels_last:
        method.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if cfg.torch_compile:
        # in place: the module, its parameters and its state-dict keys stay the same (checkpoints match)
        method.backbone.compile()
    groups = method.param_groups(cfg.lr)
    check_param_groups(method, groups)
    optimizer = make_optimizer(cfg, groups)
    scheduler = method.configure_scheduler(optimizer, cfg.epochs) or make_scheduler(cfg, optimizer)
    return Trainer(cfg, data, method, optimizer, scheduler, device, out_dir, report, t_start, memory_format)


_KNOWN_METRICS = {"map_at_r", "r_precision", "precision_at_1", "nmi", "f1"}


#: key prefix of the divergence checks (``TrainContext.diverged_if``) among a step's log columns
_CHECK = "\0check"


class StepLogs:
    """The step logs of a run of steps, kept where they are made, read back in bulk.

    Tensor terms (and the loss) of each step are stacked into one small device tensor; every
    ``every`` steps and at :meth:`means` they come back to the host in one copy (the only host
    synchronisation of the loop). Plain float terms are summed on the host. A non-finite loss
    found in a read-back raises :class:`Diverged` with the step it happened at and that step's
    terms; so does a divergence flag a hook raised with ``TrainContext.diverged_if`` (read back in
    the same copy, reported with its own values). The steps after it (on a broken model) only cost
    time, and nothing is saved before the check, so no checkpoint holds them.
    """

    def __init__(self, every: int):
        self.every = every
        self.keys: tuple[str, ...] = ()
        self.rows: list[Tensor] = []
        self.row_steps: list[int] = []
        self.row_floats: list[dict[str, float]] = []
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, step: int, out: LossOutput, extra: dict[str, float | Tensor] | None = None,
            checks: list[StepCheck] | None = None) -> None:
        """Record the logs (and divergence ``checks``) of ``step`` (1-based); may read back (and
        raise :class:`Diverged`)."""
        tensors: dict[str, Tensor] = {"loss": out.total}
        floats: dict[str, float] = {}
        for k, v in {**out.terms, **(extra or {})}.items():
            if isinstance(v, Tensor):
                tensors[k] = v
            else:
                floats[k] = float(v)
        for i, (flag, values) in enumerate(checks or ()):
            tensors[f"{_CHECK}{i}"] = flag
            tensors.update({f"{_CHECK}{i}/{k}": v for k, v in values.items()})
        keys = tuple(tensors)
        if keys != self.keys:
            self.flush()
            self.keys = keys
        self.rows.append(torch.stack([v.detach().float().reshape(()) for v in tensors.values()]))
        self.row_steps.append(step)
        self.row_floats.append(floats)
        self.n += 1
        if len(self.rows) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Read the pending rows back (one host sync), check the losses and the divergence flags
        and add the logs to the sums."""
        if not self.rows:
            return
        values = torch.stack(self.rows).cpu().numpy().astype(np.float64)
        steps, floats = self.row_steps, self.row_floats
        self.rows, self.row_steps, self.row_floats = [], [], []
        logged = [j for j, k in enumerate(self.keys) if not k.startswith(_CHECK)]
        flags = [j for j, k in enumerate(self.keys) if k.startswith(_CHECK) and "/" not in k]
        flagged = (values[:, flags] != 0).any(axis=1) if flags else np.zeros(len(values), dtype=bool)
        bad = np.flatnonzero(~np.isfinite(values[:, 0]) | flagged)
        if len(bad):
            i = int(bad[0])
            if flagged[i]:  # a hook's check (it ran after the loss, on the stepped model)
                prefix = self.keys[next(j for j in flags if values[i, j] != 0)] + "/"
                terms = {k[len(prefix):]: float(values[i, j]) for j, k in enumerate(self.keys) if k.startswith(prefix)}
                raise Diverged(steps[i], float("nan"), terms)
            terms = {**{self.keys[j]: float(values[i, j]) for j in logged[1:]}, **floats[i]}
            raise Diverged(steps[i], float(values[i, 0]), terms)
        totals = values.sum(axis=0).tolist()
        for j in logged:
            self.sums[self.keys[j]] = self.sums.get(self.keys[j], 0.0) + totals[j]
        for row in floats:
            for k, f in row.items():
                self.sums[k] = self.sums.get(k, 0.0) + f

    def means(self) -> dict[str, float]:
        """Each log's sum over the steps divided by the number of steps (after a final read-back)."""
        self.flush()
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}


class Trainer:
    """One run's loop: epochs of steps, validation, checkpoints, early stopping (built by
    :func:`build_trainer`, run by :func:`train`)."""

    def __init__(
        self, cfg: TrialConfig, data: TrialData, method: Method, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, out_dir: Path | None,
        report: Report | None, t_start: float, memory_format: torch.memory_format = torch.preserve_format,
    ):
        self.cfg, self.data, self.method = cfg, data, method
        self.optimizer, self.scheduler, self.device = optimizer, scheduler, device
        self.out_dir, self.report, self.t_start = out_dir, report, t_start
        self.memory_format = memory_format
        self.pin_memory = pin_memory_for(cfg.pin_memory, device)
        self.ckpt_dir = out_dir / "checkpoints" if out_dir else None
        embedded = data.source.embedded
        self.train_ds = ImageDataset(
            data.table, data.split.train,
            build_transform(cfg.image_size, train=True, embedded=embedded, crop_scale=cfg.crop_scale),
            data.label_map, n_views=method.n_views,
        )
        batch_size = cfg.classes_per_batch * cfg.samples_per_class
        self.iters = method.iters_per_epoch() or cfg.iters_per_epoch or max(1, len(self.train_ds) // batch_size)
        self.sampler = ClassBalancedBatchSampler(
            self.train_ds.labels, cfg.classes_per_batch, cfg.samples_per_class, self.iters, cfg.seed
        )
        self.loader = make_loader(self.train_ds, sampler=self.sampler, num_workers=cfg.num_workers,
                                  pin_memory=self.pin_memory, persistent_workers=True)
        self.clip_params = [p for g in optimizer.param_groups for p in g["params"]]
        self.epoch = 0
        self.step = 0
        self.best_value = -math.inf
        self.best_epoch = 0
        self.wait = 0
        self.history: list[dict[str, float]] = []
        self.best_metrics: dict[str, float] = {}
        self.stopped_early = False
        self.ctx = TrainContext(
            cfg=cfg, device=device, optimizer=optimizer, train_loader=self._batches(),
            embed_train_pool=self.embed_train_pool, embed_train_set=self.embed_train_set,
            train_class_counts=np.bincount(self.train_ds.labels, minlength=len(data.label_map)).tolist(),
        )
        self.progress = _Progress(cfg.progress, cfg.epochs, f"{cfg.method}/{cfg.dataset}")

    # -- hooks' data access ------------------------------------------------------------------
    def _batches(self) -> Iterator[Batch]:
        """Endless training batches on the device (for hooks such as DiVA's queue fill), from a
        loader of their own so the training loader's persistent workers are never shared."""
        sampler = ClassBalancedBatchSampler(
            self.train_ds.labels, self.cfg.classes_per_batch, self.cfg.samples_per_class, self.iters, self.cfg.seed
        )
        loader = make_loader(self.train_ds, sampler=sampler, num_workers=self.cfg.num_workers, pin_memory=self.pin_memory)
        e = 10_000
        while True:
            sampler.set_epoch(e)
            for batch in loader:
                yield batch.to(self.device, self.memory_format)
            e += 1

    @torch.no_grad()
    def embed_train_pool(self, draws: int) -> Tensor:
        """``draws`` × one training image per class (train transform), raw ``pool_embed`` [T, C, D]."""
        rng = np.random.default_rng(epoch_seed(self.cfg.seed, self.epoch, 1000 + self.step))
        labels = self.train_ds.labels
        C = len(self.data.label_map)
        order = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(C)}
        picks = np.empty((draws, C), np.int64)
        for c in range(C):
            q: list[int] = []
            for t in range(draws):
                if not q:
                    q = list(order[c]) if t == 0 else list(rng.permutation(np.flatnonzero(labels == c)))
                picks[t, c] = q.pop(0)
        flat = picks.reshape(-1)
        ds = ImageDataset(self.data.table, self.train_ds.indices[flat], self.train_ds.transform)
        loader = make_loader(ds, batch_size=128, num_workers=self.cfg.num_workers)
        return self._pool_embed(loader).reshape(draws, C, -1)

    @torch.no_grad()
    def embed_train_set(self) -> tuple[Tensor, Tensor]:
        ds = ImageDataset(
            self.data.table, self.data.split.train,
            build_transform(self.cfg.image_size, train=False, embedded=self.data.source.embedded),
            self.data.label_map,
        )
        loader = make_loader(ds, batch_size=self.cfg.eval_batch_size, num_workers=self.cfg.num_workers)
        return self._pool_embed(loader), torch.from_numpy(ds.labels)

    def _pool_embed(self, loader: Any) -> Tensor:
        was = self.method.training
        self.method.eval()
        try:
            out = []
            with eval_precision(self.method, self.cfg, self.device):
                for batch in loader:
                    out.append(self.method.pool_embed(batch.to(self.device, self.memory_format).images).float())
            return torch.cat(out)
        finally:
            self.method.train(was)

    # -- checkpoints -----------------------------------------------------------------------
    def _state(self, resumable: bool = True) -> dict[str, Any]:
        if not resumable:  # best.pt: the weights the final evaluation loads, no optimiser state
            return {"format": CHECKPOINT_VERSION, "config": self.cfg.to_dict(), "model": self.method.state_dict(),
                    "extra": self.method.extra_state(), "trainer": {"epoch": self.epoch}}  # fmt: skip
        return {
            "format": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "extra": self.method.extra_state(),
            "trainer": {
                "epoch": self.epoch, "step": self.step, "best_value": self.best_value,
                "best_epoch": self.best_epoch, "wait": self.wait, "history": self.history,
                "best_metrics": self.best_metrics, "stopped_early": self.stopped_early,
            },
            "rng": {"torch": torch.get_rng_state()},
        }

    def _save(self, name: str) -> None:
        """``last``: everything a resume needs; ``best``: the weights only (a third of last.pt with Adam)."""
        if self.ckpt_dir is not None:
            atomic_torch_save(self._state(resumable=name == "last"), self.ckpt_dir / f"{name}.pt")

    def save_checkpoint(self, name: str = "last") -> Path | None:
        """Write ``checkpoints/<name>.pt`` now (what :meth:`run` writes after every epoch); returns
        its path, or None when the run has no output folder."""
        self._save(name)
        return self.ckpt_dir / f"{name}.pt" if self.ckpt_dir is not None else None

    def start(self) -> bool:
        """What :meth:`run` does before its first epoch: resume from ``checkpoints/last.pt`` when it
        exists (True), else call the method's ``on_train_start`` (DiVA fills its queue; False)."""
        if self._resume():
            return True
        with torch.no_grad():
            self.method.on_train_start(self.ctx)
        return False

    def _resume(self) -> bool:
        if self.ckpt_dir is None or not (self.ckpt_dir / "last.pt").exists():
            return False
        path = self.ckpt_dir / "last.pt"
        ckpt = load_checkpoint(path, self.cfg)
        try:
            self.method.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.method.load_extra_state(ckpt["extra"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match this run's model ({type(err).__name__}: {str(err)[:200]}); "
                f"delete it to start over."
            ) from None
        t = ckpt["trainer"]
        self.epoch, self.step = int(t["epoch"]), int(t["step"])
        self.best_value, self.best_epoch, self.wait = float(t["best_value"]), int(t["best_epoch"]), int(t["wait"])
        self.history, self.best_metrics = list(t["history"]), dict(t["best_metrics"])
        self.stopped_early = bool(t["stopped_early"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        return True

    # -- main --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        has_val = self.data.split.val is not None
        if not self.start():
            if cfg.eval_at_start and has_val:
                metrics = self._validate()
                self.history.append({"epoch": 0, **metrics})
                self._save("last")
                self._emit(0, metrics)
        self.method.train()
        while self.epoch < cfg.epochs and not self.stopped_early and not self._budget_done():
            self.epoch += 1
            t0 = time.time()
            losses = self._train_epoch()
            self.scheduler.step()
            metrics = {"loss": losses.pop("loss", float("nan")), **losses, "lr": self.optimizer.param_groups[0]["lr"]}
            evaluated = has_val and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs or self._budget_done())
            if evaluated:
                metrics.update(self._validate())
            self.ctx.epoch, self.ctx.step = self.epoch, self.step
            self.ctx.val_metrics = {k: v for k, v in metrics.items()} if evaluated else {}
            self.ctx.log = {}
            if evaluated or not has_val:
                with torch.no_grad():
                    metrics.update(self.method.on_epoch_end(self.ctx))
            metrics.update(self.ctx.log)
            self.history.append({"epoch": self.epoch, **metrics})
            if evaluated:
                self._track_best(metrics)
            self._save("last")
            self.progress.epoch(self.epoch, metrics, time.time() - t0)
            if evaluated or not has_val:
                self._emit(self.epoch, metrics)
        return self._finish()

    def _budget_done(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.sampler.set_epoch(self.epoch)
        torch.manual_seed(epoch_seed(cfg.seed, self.epoch))
        self.progress.start_epoch(self.epoch, len(self.sampler))
        return self.run_steps(self.loader)

    def run_steps(self, batches: Iterable[Batch]) -> dict[str, float]:
        """One training step per batch of ``batches`` (host batches, as a loader yields them) until
        they end or ``max_steps`` is reached; returns each step log's mean.

        Nothing here waits for the device: copies are asynchronous (pinned memory), the logs stay
        on the device and are read back every ``cfg.sync_every`` steps and at the end
        (:class:`StepLogs`), where a non-finite loss raises :class:`Diverged` naming its step. An
        error raised by a later step on the broken model is reported as that divergence.
        """
        logs = StepLogs(self.cfg.sync_every)
        try:
            for batch in batches:
                out, stats, checks = self._step(batch)
                logs.add(self.step, out, stats, checks)
                self.progress.advance()
                if self._budget_done():
                    break
            return logs.means()
        except Diverged:
            raise
        except Exception:
            logs.flush()  # a non-finite loss before the error is its cause
            raise

    def _step(self, batch: Batch) -> tuple[LossOutput, dict[str, float | Tensor], list[StepCheck]]:
        cfg = self.cfg
        batch = batch.to(self.device, self.memory_format)
        with autocast_for(cfg, self.device):
            out = self.method.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.total.float().backward()
        checks: list[StepCheck] = []
        self.ctx.deferred_checks = checks  # the hooks' diverged_if flags, read back with the step logs
        try:
            self.ctx.step = self.step
            self.method.on_after_backward(self.ctx)
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.clip_params, cfg.grad_clip_norm)
            if cfg.grad_clip_value is not None:
                torch.nn.utils.clip_grad_value_(self.clip_params, cfg.grad_clip_value)
            self.optimizer.step()
            self.step += 1
            self.ctx.step = self.step
            with torch.no_grad():
                self.method.on_step_end(self.ctx)
        finally:
            self.ctx.deferred_checks = None
        return out, self.method.log_stats(batch), checks

    def _validate(self) -> dict[str, float]:
        assert self.data.split.val is not None
        # k-means for the primary embedding only (and the early-stop metric's key), not for every extra one
        key, _, metric = self.cfg.early_stop_metric.rpartition("/")
        keys = {"", key} if metric in ("nmi", "f1") else {""}
        return evaluate_indices(self.method, self.data, self.data.split.val, self.cfg, self.device, step=self.step,
                                clustering=self.cfg.val_clustering, cluster_keys=keys,
                                memory_format=self.memory_format)  # fmt: skip

    def _track_best(self, metrics: dict[str, float]) -> None:
        key = self.cfg.early_stop_metric
        if key not in metrics:
            raise ConfigError(f"early_stop_metric {key!r} is not among the evaluated metrics ({', '.join(sorted(metrics))}).")
        value = metrics[key]
        if value > self.best_value + self.cfg.early_stop_min_delta:
            self.best_value, self.best_epoch, self.wait = value, self.epoch, 0
            self.best_metrics = {k: v for k, v in metrics.items()}
            self._save("best")
        else:
            self.wait += 1
            if self.cfg.early_stop_patience is not None and self.wait >= self.cfg.early_stop_patience:
                self.stopped_early = True

    def _emit(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.report is not None:
            self.report(epoch, metrics, str(self.ckpt_dir) if self.ckpt_dir else None)

    def _finish(self) -> TrainResult:
        cfg, data = self.cfg, self.data
        has_val = data.split.val is not None
        test_metrics = None
        test_embedding: Tensor | None = None
        if cfg.phase == "final" and data.split.test is not None:
            if has_val and self.ckpt_dir is not None and (self.ckpt_dir / "best.pt").exists():
                best = load_checkpoint(self.ckpt_dir / "best.pt", cfg)
                self.method.load_state_dict(best["model"])
                self.method.load_extra_state(best["extra"])
            elif has_val and self.best_epoch != self.epoch:
                print("note: no checkpoint folder, so the test split is scored at the last epoch, not the best.",
                      file=sys.stderr)
            kept: dict[str, Tensor] = {}
            test_metrics = evaluate_indices(
                self.method, data, data.split.test, cfg, self.device, query_gallery=data.source.query_gallery,
                keep=kept, memory_format=self.memory_format,
            )
            test_embedding = kept.get("")
        if cfg.phase == "final" and test_metrics is not None:
            metrics, split, best_epoch = test_metrics, "test", (self.best_epoch if has_val else self.epoch)
        else:
            metrics, split, best_epoch = (self.best_metrics or (self.history[-1] if self.history else {})), "val", self.best_epoch
        return TrainResult(
            cfg=cfg, metrics=dict(metrics), eval_split=split, best_epoch=best_epoch, epochs_run=self.epoch,
            steps=self.step, wall_time_s=time.time() - self.t_start, split_hash=data.manifest.hash,
            pretrained_id=getattr(self.method.backbone, "pretrained_id", "none"), history=self.history,
            test_metrics=test_metrics, stopped_early=self.stopped_early, test_embedding=test_embedding,
        )
