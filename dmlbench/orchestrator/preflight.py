"""Preflight: every cell of a sweep proves, on the real data and backbone, that it can run, and what
it will cost, before the sweep spends GPU-hours (DESIGN §5; ``dmlbench preflight`` and
``dmlbench sweep ... --preflight``).

Per dataset (once per image size), with the data root the sweep will use:

* the images: when no valid decoded-image cache exists yet, every image is decoded
  (:func:`~dmlbench.datasets.checks.image_problems`; a missing or truncated file is reported by
  name); a valid cache proves every image decoded when it was built;
* the cache: its size estimated from the image headers and compared with the free disk under the
  cache folder, then built where the trials will look for it (``$DMLBENCH_CACHE``, the same
  dataset id, size and source key as :func:`dmlbench.engine.trainer.prepare_data`), so the sweep
  reuses it.

Per cell, in this process (no Ray), with the cell's real trial configs (the first point the cell's
seeded sampler draws from its search space):

* a search trial (``mlrc``): built with :func:`~dmlbench.engine.trainer.build_trainer`, the method's
  ``on_train_start`` (DiVA fills its queue), a few timed steps (:meth:`Trainer.run_steps`), a
  checkpoint saved and resumed into a fresh trainer, which then takes one more step;
* a final-phase trial (a fold model under ``mlrc``; the recipe on all training classes under
  ``paper``): a few steps, then one full evaluation with every metric of the largest validation
  fold (when the protocol validates) and of the test split (query/gallery for In-Shop), each after
  its memory need was estimated (:func:`eval_memory_bytes`) and compared with the free host (CPU)
  or device (CUDA) memory.

Nothing is written under the sweep's output: checkpoints go to a temporary folder that is removed.
The cost of a cell is the measured step time × the steps its plan trains at most (every model all
its epochs) plus the measured evaluation times × its evaluations, in GPU-hours on CUDA (× GPUs per
trial) or CPU-hours on CPU (× CPUs per trial).
"""

from __future__ import annotations

import itertools
import math
import os
import resource
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmlbench.errors import DmlbenchError
from dmlbench.orchestrator.planning import (
    cell_base,
    cell_settings,
    check_space,
    final_seeds,
    space_draws,
)
from dmlbench.orchestrator.spec import Cell, SweepSpec

if TYPE_CHECKING:
    import torch

    from dmlbench.config import TrialConfig
    from dmlbench.engine.trainer import Trainer

__all__ = [
    "CellReport", "DataReport", "Limits", "PreflightFailed", "PreflightResult", "eval_memory_bytes", "failures", "run",
    "run_checked", "table_caption", "table_rows",
]  # fmt: skip

Printer = Callable[[str], None]


class PreflightFailed(DmlbenchError):
    """Some cell of the sweep cannot run (the preflight table says why)."""

    exit_code = 1


# ---- what the checks compare against ------------------------------------------------------------
def host_available_bytes() -> int | None:
    """Memory the host can still give (``MemAvailable`` of ``/proc/meminfo``, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (``torch.cuda.mem_get_info``); None for the CPU."""
    if device.type != "cuda":
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def disk_free_bytes(path: Path) -> int:
    """Free bytes of the file system holding ``path`` (its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


@dataclass
class Limits:
    """Where the memory and disk checks read what is available (tests inject small values).

    ``share``: the part of the available memory or disk a check lets one cell plan to use.
    """

    host_available: Callable[[], int | None] = host_available_bytes
    device_free: Callable[[Any], int | None] = device_free_bytes
    disk_free: Callable[[Path], int] = disk_free_bytes
    share: float = 0.9


# ---- reports --------------------------------------------------------------------------------------
@dataclass
class DataReport:
    """One dataset at one image size: its decoded-image cache, or why it cannot be used."""

    dataset: str
    image_size: int
    problem: str | None = None
    cache_dir: Path | None = None
    cache_bytes: int | None = None
    cache_seconds: float | None = None
    cache_built: bool = False
    images_checked: int = 0


@dataclass
class CellReport:
    """One cell's preflight: ``problem`` is None when it can run, else one sentence."""

    cell: Cell
    problem: str | None = None
    step_s: float | None = None
    eval_s: float | None = None
    eval_detail: dict[str, float] = field(default_factory=dict)
    host_peak: int | None = None
    device_peak: int | None = None
    checkpoint_bytes: int | None = None
    cache_bytes: int | None = None
    cost_hours: float | None = None
    cost_unit: str = "CPU-h"
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def failures(reports: list[CellReport]) -> list[CellReport]:
    return [r for r in reports if not r.ok]


# ---- estimates --------------------------------------------------------------------------------------
#: the symmetric CPU k-NN's tiles and sample (dmlbench.evaluation.knn)
_KNN_TILE = 1024
#: k-means: the torch assignment block holds at most this many scores (metrics._nearest_torch)
_KMEANS_BLOCK = 1 << 25
_KMEANS_SEED_BATCH = 256


def eval_memory_bytes(
    n_query: int, n_gallery: int, dims: list[int], k: int, chunk: int, n_clusters: int, clustered_dims: list[int],
) -> int:
    """Upper bound of the memory one evaluation allocates (bytes), before it runs.

    Counts the float32 embeddings of every ``embed_for_eval`` key (``dims``) and their normalised
    copy; the k-NN's larger path: the ``[chunk, gallery]`` similarity block with its top-``k``
    values, indices and hit flags, or the symmetric CPU path's reservoirs (``n × (1.5 k + 16)``
    values and ids); and for each clustered key (``clustered_dims``) the k-means copies of the
    queries, its assignment block (at most 2²⁵ scores), its k-means++ round block and the
    float64 centroid sums. Model weights and the data loader are not counted.

    Example:
        SOP's test split (60,502 images, R@1000 so k = 1000), one 128-d embedding, chunks of 4096,
        11,316 clusters:

        >>> round(eval_memory_bytes(60502, 60502, [128], 1000, 4096, 11316, [128]) / 2**30, 2)
        1.34
    """
    rows = min(chunk, n_query)
    emb = sum(dims) * (n_query + (n_gallery if n_gallery != n_query else 0)) * 4 * 2
    block = rows * n_gallery * 4
    top = rows * (k + 1) * (4 + 8) * 2 + rows * k
    symmetric = n_query * (k + k // 2 + 16) * 8 + _KNN_TILE * _KNN_TILE * 4
    knn = max(block + top, symmetric)
    kmeans = 0
    for d in clustered_dims:
        assign_rows = max(1, min(n_query, _KMEANS_BLOCK // max(1, n_clusters)))
        kmeans = max(kmeans, n_query * d * 4 * 2 + assign_rows * n_clusters * 4
                     + n_query * _KMEANS_SEED_BATCH * 4 + n_clusters * d * (8 + 4))  # fmt: skip
    return int(emb + max(knn, kmeans) + n_query * 64)


def _gib(n: int | float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


# ---- peak memory ------------------------------------------------------------------------------------
class HostPeak:
    """Peak resident memory of this process over a stretch of work.

    On Linux the kernel's high-water mark (``VmHWM``) is reset by writing ``5`` to
    ``/proc/self/clear_refs``, so each cell gets its own peak; elsewhere the process's lifetime
    peak (``getrusage``) is the best available (marked ``lifetime``). Data-loader worker processes
    are not counted.
    """

    def __init__(self) -> None:
        self.per_cell = False

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.per_cell = True
        except OSError:
            self.per_cell = False

    def read(self) -> int:
        if self.per_cell:
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) * 1024
            except (OSError, ValueError, IndexError):
                pass
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---- the run ------------------------------------------------------------------------------------------
@dataclass
class PreflightResult:
    """What :func:`run_checked` returns: the resolved spec, a report per cell and per dataset."""

    spec: SweepSpec
    reports: list[CellReport]
    data: dict[tuple[str, int], DataReport]
    where: str

    @property
    def sweep_id(self) -> str:
        return self.spec.sweep_id


def run_checked(spec: SweepSpec, *, steps: int = 3, echo: Printer = print, limits: Limits | None = None) -> PreflightResult:
    """The sweep's own checks first (names, search spaces, recipes, output folder; ``ConfigError`` as
    the sweep would raise them), the resources resolved as a local sweep would resolve them (a
    benchmark on CPU needs ``--allow-cpu``), then :func:`run`. Datasets that cannot be used fail
    their cells instead of the whole preflight."""
    import torch

    from dmlbench.orchestrator import cluster
    from dmlbench.orchestrator.planning import validate

    cluster.join_address(spec)
    missing = validate(spec, need_data=False)
    if spec.address is None and not os.environ.get("RAY_ADDRESS"):
        nodes = [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
        spec = cluster.resolve_resources(spec, nodes)
        where = f"this machine ({cluster.cluster_summary(nodes)}), as the local sweep will run"
    else:
        where = "this machine, in process: the cluster's workers may differ (its GPUs, memory and disks)"
    reports, data = run(spec, steps=steps, echo=echo, limits=limits, missing=missing)
    return PreflightResult(spec, reports, data, where)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def table_rows(reports: list[CellReport]) -> list[list[str]]:
    """The preflight table's rows (cell, status, step s, eval s, host peak, device peak,
    checkpoint, cache, estimated cost) and a last row with the totals."""
    rows = []
    for r in reports:
        status = "OK" if r.ok else str(r.problem)
        if r.ok and r.notes:
            status += " (" + "; ".join(r.notes) + ")"
        evals = " + ".join(f"{v:.1f}" for v in r.eval_detail.values()) if r.eval_detail else "-"
        rows.append([
            r.cell.key, status, f"{r.step_s:.3f}" if r.step_s is not None else "-", evals, _size(r.host_peak),
            _size(r.device_peak) if r.device.startswith("cuda") else "-", _size(r.checkpoint_bytes),
            _size(r.cache_bytes), f"{r.cost_hours:,.2f} {r.cost_unit}" if r.cost_hours is not None else "-",
        ])  # fmt: skip
    ok = [r for r in reports if r.ok]
    units = sorted({r.cost_unit for r in ok if r.cost_hours is not None})
    total = " + ".join(f"{sum(r.cost_hours or 0.0 for r in ok if r.cost_unit == u):,.2f} {u}" for u in units) or "-"
    rows.append([f"total ({len(reports)} cells)", f"{len(ok)} OK, {len(reports) - len(ok)} failed", "", "", "", "",
                 "", "", total])  # fmt: skip
    return rows


def table_caption(result: PreflightResult, seconds: float) -> str:
    """What the numbers mean, under the table."""
    caches = sum(d.cache_bytes or 0 for d in result.data.values())
    return (
        f"ran on {result.where}, in {seconds:.0f} s; eval s: largest validation fold + test split, every metric; "
        f"est. cost: measured step time x planned steps + measured evaluations x planned ones (every model all its "
        f"epochs: an upper bound); decoded-image caches: {_size(caches) if caches else 'none'} on disk, reused by the sweep; no rows written."
    )


def run(
    spec: SweepSpec,
    *,
    steps: int = 3,
    echo: Printer = print,
    limits: Limits | None = None,
    missing: list[str] | None = None,
) -> tuple[list[CellReport], dict[tuple[str, int], DataReport]]:
    """Preflight every cell of ``spec`` (see the module docstring); never raises for a cell's
    problem: each :class:`CellReport` carries its sentence.

    ``missing``: the sweep's unusable datasets (``planning.validate``), whose cells fail with that
    sentence without running.
    """
    limits = limits or Limits()
    data: dict[tuple[str, int], DataReport] = {}
    reports: list[CellReport] = []
    unusable = {m.split(" is ", 1)[0]: m for m in (missing or [])}
    with tempfile.TemporaryDirectory(prefix="dmlbench-preflight-") as tmp:
        for i, cell in enumerate(spec.cells()):
            echo(f"preflight {i + 1}/{len(spec.cells())}: {cell.key}")
            rep = CellReport(cell)
            if cell.dataset in unusable:
                rep.problem = unusable[cell.dataset]
            else:
                _run_cell(spec, cell, rep, data, limits, steps, Path(tmp) / cell.slug)
            echo(f"  {_progress_line(rep)}")
            reports.append(rep)
    return reports, data


def _progress_line(rep: CellReport) -> str:
    """The cell's outcome as it finishes (a long preflight shows its figures before the table)."""
    if not rep.ok:
        return f"FAILED: {rep.problem}"
    evals = ", ".join(f"{k} {v:.1f} s" for k, v in rep.eval_detail.items())
    cost = f"{rep.cost_hours:,.2f} {rep.cost_unit}" if rep.cost_hours is not None else "-"
    return (f"OK: step {rep.step_s or 0:.3f} s, eval {evals or '-'}, host peak {_size(rep.host_peak)}, "
            f"checkpoint {_size(rep.checkpoint_bytes)}, cache {_size(rep.cache_bytes)}, est. {cost}")


def _run_cell(spec: SweepSpec, cell: Cell, rep: CellReport, data: dict[tuple[str, int], DataReport],
              limits: Limits, steps: int, work: Path) -> None:  # fmt: skip
    import torch

    peak = HostPeak()
    peak.reset()
    stage = "building its trial configs"
    try:
        search_cfg, final_cfg = trial_configs(spec, cell, work)
        cfg0 = search_cfg or final_cfg
        from dmlbench.engine.trainer import resolve_device

        device = resolve_device(cfg0.device)
        rep.device = str(device)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        stage = "preparing its data"
        dr = prepare_dataset(cfg0, data, limits)
        rep.cache_bytes = dr.cache_bytes
        if dr.problem is not None:
            rep.problem = dr.problem
            return
        rep.notes.extend(_class_notes(cfg0))
        step_times: list[float] = []
        ckpt_bytes = None
        trainer = None
        if search_cfg is not None:
            stage = "training a search trial"
            trainer = _built(search_cfg)
            step_times.append(_timed_steps(trainer, steps))
            stage = "saving and resuming a checkpoint"
            ckpt_bytes = _save_and_resume(trainer, search_cfg)
            del trainer
        stage = "training a final-phase trial"
        trainer = _built(final_cfg)
        step_times.append(_timed_steps(trainer, steps))
        if ckpt_bytes is None:  # no search phase: the final trial's checkpoint
            stage = "saving and resuming a checkpoint"
            ckpt_bytes = _save_and_resume(trainer, final_cfg)
        rep.step_s = max(step_times)
        rep.checkpoint_bytes = ckpt_bytes
        stage = "evaluating"
        rep.eval_detail = _evaluate(trainer, final_cfg, limits)
        rep.eval_s = sum(rep.eval_detail.values())
        rep.cost_hours, rep.cost_unit = cell_cost(spec, cell, trainer, rep)
    except DmlbenchError as err:
        rep.problem = str(err)
    except Exception as err:  # every other failure becomes the cell's one sentence too
        rep.problem = _sentence(err, stage, cell)
    finally:
        rep.host_peak = peak.read()
        if torch.cuda.is_available() and rep.device.startswith("cuda"):
            rep.device_peak = int(torch.cuda.max_memory_allocated(torch.device(rep.device)))
        shutil.rmtree(work, ignore_errors=True)


def _sentence(err: BaseException, stage: str, cell: Cell) -> str:
    from dmlbench.orchestrator.trainable import is_oom

    if is_oom(err):
        where = "device" if type(err).__name__ == "OutOfMemoryError" else "host"
        return (f"{cell.key} ran out of {where} memory while {stage}; lower classes_per_batch, samples_per_class "
                f"or image_size, or give each trial more memory (a whole GPU: --gpus-per-trial 1).")
    last = traceback.format_exception_only(type(err), err)[-1].strip().splitlines()[0]
    return f"{cell.key} failed while {stage}: {last}"


# ---- trial configs ---------------------------------------------------------------------------------
def space_override(spec: SweepSpec, cell: Cell) -> str | None:
    """``--search-space`` when it is the space of the cell's method, else None."""
    from dmlbench.search_spaces.loader import load_space_file

    if spec.search_space and load_space_file(spec.search_space).method == cell.method:
        return spec.search_space
    return None


def first_point(spec: SweepSpec, cell: Cell) -> dict[str, Any]:
    """The first point the cell's seeded sampler draws from its search space (sampled + fixed
    values), or ``{}`` for a cell without a search (``paper``)."""
    if not cell_settings(spec, cell).searched:
        return {}
    params, fixed = next(iter(space_draws(spec, cell, space_override(spec, cell), 1)))
    return {**params, **fixed}


def trial_configs(spec: SweepSpec, cell: Cell, work: Path) -> tuple[TrialConfig | None, TrialConfig]:
    """(search trial or None without a search, final-phase trial) of the cell, writing under ``work``.

    The search trial is fold 0's model; the final trial is the first final seed's model (fold 0 for
    fold models, all training classes for a ``paper`` recipe), both with :func:`first_point`'s
    values. The cell's space is checked first (:func:`planning.check_space`), as the sweep does.
    """
    from dmlbench.search_spaces.loader import build_trial_config

    st = cell_settings(spec, cell)
    if st.searched:
        check_space(spec, cell, space_override(spec, cell))
    point = first_point(spec, cell)
    quiet = {"progress": False}
    search = None
    if st.searched:
        search = build_trial_config({**cell_base(spec, cell, "search"), **quiet, "output_dir": str(work / "search")},
                                    point)  # fmt: skip
    base = cell_base(spec, cell, "final")
    final = build_trial_config({**base, **quiet, "seed": final_seeds(spec)[0] if spec.final_seeds else base["seed"],
                                "output_dir": str(work / "final")}, point)  # fmt: skip
    return search, final


# ---- data -------------------------------------------------------------------------------------------
def source_table(cfg: TrialConfig) -> tuple[Any, Any]:
    """(source, table) of the trial's dataset, read as :func:`engine.trainer.prepare_data` reads it."""
    from dmlbench.datasets import trial_source

    source = trial_source(cfg)
    return source, source.table()


def prepare_dataset(cfg: TrialConfig, done: dict[tuple[str, int], DataReport], limits: Limits) -> DataReport:
    """Check the images of the trial's dataset and build its decoded-image cache where the trials
    will read it (once per dataset and image size); the report says why it cannot be used."""
    key = (cfg.dataset, cfg.image_size)
    if key in done:
        return done[key]
    rep = DataReport(cfg.dataset, cfg.image_size)
    done[key] = rep
    source, table = source_table(cfg)
    if source.embedded:
        return rep  # in memory: no files, no cache (prepare_data does not cache them)
    from dmlbench.datasets import data_root
    from dmlbench.datasets.cache import cache_location, ensure_cache, estimate_cache_bytes, is_valid_cache
    from dmlbench.datasets.checks import image_problems

    try:
        folder, expected = cache_location(table, cfg.dataset, cfg.image_size)
        valid = is_valid_cache(folder, expected)
    except DmlbenchError:  # an image file is missing: the image check below names every one
        folder, valid = None, False
    if not valid:
        problems = image_problems(cfg.dataset, data_root(cfg))
        rep.images_checked = len(table)
        if problems:
            more = f" (and {len(problems) - 1} more unusable image(s))" if len(problems) > 1 else ""
            rep.problem = problems[0].message.rstrip(".") + more + "."
            return rep
        if folder is None:
            folder, expected = cache_location(table, cfg.dataset, cfg.image_size)
        need = estimate_cache_bytes(table, cfg.image_size)
        free = limits.disk_free(folder.parent)
        if need > free * limits.share:
            rep.problem = (
                f"the decoded-image cache of {cfg.dataset} at {cfg.image_size} px needs about {_gib(need)} but only "
                f"{_gib(free)} is free under {folder.parent}; free disk space or set $DMLBENCH_CACHE to a larger disk."
            )
            return rep
    t0 = time.perf_counter()
    built_folder, built = ensure_cache(table, cfg.dataset, cfg.image_size)
    rep.cache_seconds = time.perf_counter() - t0
    rep.cache_built = built
    rep.cache_dir = built_folder
    rep.cache_bytes = sum(p.stat().st_size for p in built_folder.iterdir() if p.is_file())
    return rep


def _class_notes(cfg: TrialConfig) -> list[str]:
    """How many training classes of the fold have fewer images than ``samples_per_class``."""
    import numpy as np

    from dmlbench.datasets.splits import make_manifest, trial_split

    _, table = source_table(cfg)
    manifest = make_manifest(table, cfg.dataset, cfg.num_folds, cfg.split_seed)
    split = trial_split(table, manifest, cfg.phase, cfg.fold)
    _, counts = np.unique(table.labels[split.train], return_counts=True)
    small = int((counts < cfg.samples_per_class).sum())
    if not small:
        return []
    return [f"{small} of {len(counts)} training classes have fewer than samples_per_class={cfg.samples_per_class} "
            f"images (smallest {int(counts.min())}): the sampler fills them"]  # fmt: skip


# ---- training, checkpoints ---------------------------------------------------------------------------
def _built(cfg: TrialConfig) -> Trainer:
    from dmlbench.engine.trainer import build_trainer

    return build_trainer(cfg)


@contextmanager
def _runtime(cfg: TrialConfig) -> Iterator[None]:
    from dmlbench.engine.runtime import trial_runtime
    from dmlbench.engine.trainer import deterministic_mode, resolve_device

    with trial_runtime(cfg.torch_threads, resolve_device(cfg.device), cfg.deterministic), \
            deterministic_mode(cfg.deterministic):  # fmt: skip
        yield


def _batches(trainer: Trainer, n: int, epoch: int = 1) -> Iterator[Any]:
    trainer.sampler.set_epoch(epoch)
    return itertools.islice(iter(trainer.loader), n)


def _timed_steps(trainer: Trainer, steps: int) -> float:
    """Seconds per training step: the method's ``on_train_start``, one warm-up step, then ``steps``
    timed steps (``run_steps`` reads the step logs back at its end, so device work is included)."""
    with _runtime(trainer.cfg):
        trainer.start()
        trainer.method.train()
        trainer.run_steps(_batches(trainer, 1))
        t0 = time.perf_counter()
        trainer.run_steps(_batches(trainer, steps, epoch=2))
        return (time.perf_counter() - t0) / max(1, steps)


def _save_and_resume(trainer: Trainer, cfg: TrialConfig) -> int:
    """Save a checkpoint, resume it into a fresh trainer (same step, same weights), take one step
    there; returns the checkpoint's size in bytes."""
    import torch

    from dmlbench.errors import CheckpointError

    path = trainer.save_checkpoint("last")
    if path is None or not path.is_file():
        raise CheckpointError(f"the checkpoint of {cfg.method}/{cfg.dataset} was not written; check the output folder.")
    size = path.stat().st_size
    again = _built(cfg)
    with _runtime(cfg):
        if not again.start():
            raise CheckpointError(f"the checkpoint {path} was written but not resumed; check the output folder.")
        if again.step != trainer.step:
            raise CheckpointError(f"the checkpoint {path} resumed at step {again.step}, not {trainer.step}.")
        theirs = again.method.state_dict()
        for name, value in trainer.method.state_dict().items():
            if isinstance(value, torch.Tensor) and not torch.equal(value.cpu(), theirs[name].cpu()):
                raise CheckpointError(f"the checkpoint {path} resumed with different weights ({name}).")
        again.method.train()
        again.run_steps(_batches(again, 1, epoch=3))
    return size


# ---- evaluation ---------------------------------------------------------------------------------------
def _eval_sets(trainer: Trainer, cfg: TrialConfig) -> list[tuple[str, Any, bool]]:
    """(name, indices, query/gallery) of the largest validation fold the cell evaluates (when its
    trials validate) and of the test split."""
    from dmlbench.datasets.splits import trial_split

    data = trainer.data
    out: list[tuple[str, Any, bool]] = []
    if data.split.val is not None:
        folds = [trial_split(data.table, data.manifest, "search", f).val for f in range(cfg.num_folds)]
        largest = max((v for v in folds if v is not None), key=len)
        out.append(("val", largest, False))
    if data.split.test is not None:
        out.append(("test", data.split.test, bool(data.source.query_gallery)))
    return out


def _eval_need(trainer: Trainer, cfg: TrialConfig, indices: Any, query_gallery: bool, cluster_all: bool) -> int:
    """:func:`eval_memory_bytes` of one split: the embedding sizes come from two embedded images,
    the neighbour count ``k`` and the clusters from the split's labels, as the evaluation sets them."""
    import numpy as np

    from dmlbench.engine.trainer import embed_indices

    data = trainer.data
    with _runtime(cfg):
        probe = embed_indices(trainer.method, data.table, indices[:2], cfg, trainer.device, data.source.embedded,
                              trainer.memory_format)
    dims = {k: int(v.shape[1]) for k, v in probe.items()}
    labels = data.table.labels[indices]
    if query_gallery and data.table.is_query is not None and data.table.is_gallery is not None:
        q, g = data.table.is_query[indices], data.table.is_gallery[indices]
    else:
        q = g = np.ones(len(indices), dtype=bool)
    nq, ng = int(q.sum()), int(g.sum())
    _, gcounts = np.unique(labels[g], return_counts=True)
    k = min(max(int(gcounts.max()) - 1, max(data.source.recall_ks)), max(0, ng - 1))
    n_clusters = len(np.unique(labels[q]))
    clustered = list(dims.values()) if cluster_all else [dims.get("", next(iter(dims.values())))]
    return eval_memory_bytes(nq, ng, list(dims.values()), k, cfg.eval_chunk, n_clusters, clustered)


def _evaluate(trainer: Trainer, cfg: TrialConfig, limits: Limits) -> dict[str, float]:
    """One full evaluation (every metric, every key clustered) of each evaluated split, after its
    memory check; seconds per split."""
    from dmlbench.engine.trainer import evaluate_indices
    from dmlbench.errors import ConfigError

    device = trainer.device
    out: dict[str, float] = {}
    for name, indices, qg in _eval_sets(trainer, cfg):
        need = _eval_need(trainer, cfg, indices, qg, cluster_all=True)
        free = limits.device_free(device) if device.type == "cuda" else limits.host_available()
        where = f"free on {device}" if device.type == "cuda" else "available on the host"
        if free is not None and need > free * limits.share:
            raise ConfigError(
                f"evaluating the {len(indices):,} {name} images of {cfg.dataset} needs about {_gib(need)} but only "
                f"{_gib(free)} is {where}; lower eval_chunk (now {cfg.eval_chunk}) or run it where more memory is free."
            )
        t0 = time.perf_counter()
        with _runtime(cfg):
            metrics = evaluate_indices(trainer.method, trainer.data, indices, cfg, device, query_gallery=qg,
                                       clustering=True, memory_format=trainer.memory_format)  # fmt: skip
        out[name] = time.perf_counter() - t0
        if not metrics:
            raise ConfigError(f"the {name} evaluation of {cfg.dataset} returned no metric.")
    return out


# ---- cost -----------------------------------------------------------------------------------------------
def cell_cost(spec: SweepSpec, cell: Cell, trainer: Trainer, rep: CellReport) -> tuple[float, str]:
    """(hours, unit) of the whole cell at most: every model of its plan trains all its epochs of
    ``trainer.iters`` steps at the measured step time, validates every ``eval_every`` epochs (and
    at the start) at the measured validation time, and each final model scores the test split once.
    GPU-hours on CUDA (× GPUs per trial), else CPU-hours (× CPUs per trial)."""
    st = cell_settings(spec, cell)
    cfg = trainer.cfg
    search_models = spec.trials * spec.n_search_folds if st.searched else 0
    final_models = spec.final_seeds * (spec.folds if st.fold_models else 1)
    models = search_models + final_models
    steps = models * st.epochs * trainer.iters
    val = rep.eval_detail.get("val", 0.0)
    evals = math.ceil(st.epochs / cfg.eval_every) + (1 if cfg.eval_at_start else 0)
    seconds = steps * (rep.step_s or 0.0) + models * evals * val + final_models * rep.eval_detail.get("test", 0.0)
    if trainer.device.type == "cuda":
        return seconds / 3600 * (spec.gpus_per_trial or 1.0), "GPU-h"
    return seconds / 3600 * spec.cpus_per_trial, "CPU-h"
