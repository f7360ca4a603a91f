"""The thin Ray Tune adapter around ``dmlbench.engine.train`` (STYLE rule 9).

It only converts (Tune config → :class:`TrialConfig` via the search-space loader), restores the
checkpoint Tune hands back, reports each evaluation with its checkpoint, and turns the outcome into
a final report the driver makes a row of:

* success → ``dmlbench_status="complete"`` and the selected-epoch metrics;
* :class:`~dmlbench.errors.Diverged` → ``"diverged"`` with a finite penalty for the searcher;
* CUDA out-of-memory → re-raised, so ``FailureConfig`` retries the trial (once by default) from
  its last checkpoint, after which Tune records it as errored (row ``status=failed``);
* any other exception → ``"failed"`` with the error text and the penalty (no retry: a bug or a bad
  sampled combination would fail again).

Every report also carries ``dmlbench_best`` (JSON of the best metrics so far), so a trial that
ASHA stops still has its best epoch on record, and the metric the searcher and ASHA read is the
best validation value so far (the epoch's own value is ``current/<metric>``): a pruned trial hands
TPE its best-so-far score. A trial of several fold models reports their fold mean
(:mod:`dmlbench.orchestrator.folds`).

Every report also carries ``dmlbench_history`` (the validation metrics of every evaluated epoch,
the row's learning curve) and ``dmlbench_provenance``: the GPU model, package versions, git sha +
dirty flag of the worker that runs the trial and the trial's resolved ``embedding_dim`` /
``image_size`` / ``bn_policy`` (read here, on the worker, not by the driver).

Checkpoints: the engine keeps ``last.pt`` (resumable, rewritten every epoch) and ``best.pt`` (best
validation weights) in the trial's working folder on the worker (one per fold model of a group). A
copy goes to Tune's storage only on a period (``SweepSpec.checkpoint_period_s``, default 10
minutes, and/or every ``checkpoint_every_epochs``): the ``last.pt`` files plus a small
``trial_state.json`` (best-so-far and history, so a restored trial keeps them). ``best.pt`` stays on
the worker, except in the final phase, whose test evaluation needs the best-validation weights even
after a lost worker. Tune keeps one checkpoint per trial (``CheckpointConfig(num_to_keep=1)``); the
bytes handed over are reported as ``dmlbench_checkpoint_bytes``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmlbench.errors import Diverged
from dmlbench.orchestrator.folds import finite_metrics as _finite

STATUS_KEY = "dmlbench_status"
BEST_KEY = "dmlbench_best"
SUMMARY_KEY = "dmlbench_summary"
ERROR_KEY = "dmlbench_error"
SEED_KEY = "seed"
EPOCH_KEY = "trial_epoch"
SPLIT_HASH_KEY = "dmlbench_split_hash"
HISTORY_KEY = "dmlbench_history"
PROVENANCE_KEY = "dmlbench_provenance"
STARTED_KEY = "dmlbench_started"
CKPT_BYTES_KEY = "dmlbench_checkpoint_bytes"
#: config keys naming a trial's cell (its slug) and phase: a sweep is one Tune experiment, and its
#: searcher (:mod:`dmlbench.orchestrator.multiplex`) tags every trial it suggests with them
CELL_KEY = "dmlbench_cell"
PHASE_KEY = "dmlbench_phase"
ROUTE_KEYS = (CELL_KEY, PHASE_KEY)
#: file of a Tune checkpoint holding the trainable's own state (best so far, history)
STATE_FILE = "trial_state.json"
TIME_ATTR = "epoch"
#: finite score the searcher gets for diverged/failed trials (metrics live in [0, 1])
PENALTY = -1.0

TrainFn = Callable[..., Any]


def is_oom(err: BaseException) -> bool:
    """CUDA (or CPU allocator) out-of-memory errors."""
    name = type(err).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(err).lower()


def restore_checkpoint(output_dir: Path, subdir: str = "checkpoints") -> dict[str, Any]:
    """Copy the checkpoint Tune hands back (after a worker failure / restore) into
    ``output_dir/subdir`` (a fold-model group's checkpoint is its whole work folder: ``subdir=""``);
    returns the trainable state saved with it (``{}`` when none)."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return {}
    dest = output_dir / subdir if subdir else output_dir
    dest.mkdir(parents=True, exist_ok=True)
    with ckpt.as_directory() as src:
        shutil.copytree(src, dest, dirs_exist_ok=True)
    state = dest / STATE_FILE
    return dict(json.loads(state.read_text())) if state.is_file() else {}


def stage_checkpoint(ckpt_dir: Path, files: list[str], state: dict[str, Any],
                     bytes_before: int) -> tuple[Path, int]:  # fmt: skip
    """A folder holding ``files`` (paths relative to ``ckpt_dir``; hard links, no copy) and
    ``state`` as :data:`STATE_FILE`: what Tune uploads. Returns it and the bytes handed to Tune so
    far (``bytes_before`` + this folder, which the state file records too); the caller removes it."""
    stage = Path(tempfile.mkdtemp(prefix=".tune-checkpoint-", dir=ckpt_dir.parent))
    size = 0
    for rel in files:
        src, dst = ckpt_dir / rel, stage / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            size += dst.stat().st_size
    total, text = bytes_before + size, ""
    for _ in range(3):  # the state file counts itself
        text = json.dumps({**state, "checkpoint_bytes": total})
        total = bytes_before + size + len(text.encode())
    (stage / STATE_FILE).write_text(text)
    return stage, total


def _handed_files(ckpt: Path, final_phase: bool) -> list[str]:
    """The engine files a checkpoint hands Tune: ``last.pt`` of the model (or of every fold model of
    a group), and ``best.pt`` too in the final phase; empty when no resumable checkpoint is there."""
    names = ("last.pt", "best.pt") if final_phase else ("last.pt",)
    if (ckpt / "last.pt").is_file():
        return list(names)
    folds = sorted(p.parent.relative_to(ckpt) for p in ckpt.glob("fold*/checkpoints/last.pt"))
    return [str(d / n) for d in folds for n in names]


def _device_kind(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def summarise(result: Any) -> dict[str, Any]:
    """The parts of a ``TrainResult`` a row needs (plain JSON values)."""
    fields = ("eval_split", "best_epoch", "epochs_run", "steps", "wall_time_s", "split_hash", "pretrained_id")
    out = {f: getattr(result, f, None) for f in fields}
    out["metrics"] = _finite(dict(getattr(result, "metrics", {}) or {}))
    test = getattr(result, "test_metrics", None)
    out["test_metrics"] = _finite(dict(test)) if test else None
    return out


def part_key(cell_slug: str, phase: str) -> str:
    """The key of a cell's phase in :func:`run_routed_trial`'s ``parts``."""
    return f"{cell_slug}/{phase}"


def route_of(config: dict[str, Any]) -> str | None:
    """The part key a trial's config is tagged with (None: not tagged)."""
    if CELL_KEY not in config or PHASE_KEY not in config:
        return None
    return part_key(str(config[CELL_KEY]), str(config[PHASE_KEY]))


def run_routed_trial(config: dict[str, Any], *, parts: dict[str, dict[str, Any]], **kwargs: Any) -> None:
    """Tune function trainable of a whole sweep: the trial's cell and phase (:data:`ROUTE_KEYS` in
    its config) pick its ``base``, ``split_hash``, ``folds`` and ``stops`` from ``parts``; the rest
    of the config is what :func:`run_trial` gets. A process Tune reuses may run trials of any cell."""
    key = route_of(config)
    if key not in parts:
        raise KeyError(f"trial config tagged {key!r}, which is none of this sweep's cell phases: {sorted(parts)}")
    run_trial({k: v for k, v in config.items() if k not in ROUTE_KEYS}, **parts[key], **kwargs)


def run_trial(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    metric: str,
    train_fn: TrainFn | None = None,
    split_hash: str | None = None,
    folds: list[int | None] | None = None,
    stops: list[int] | None = None,
    checkpoint_every: tuple[float, int | None] = (600.0, None),
) -> None:
    """Tune function trainable: one trial of one cell (search or final phase).

    A trial trains one model per entry of ``folds`` (:mod:`dmlbench.orchestrator.folds`): search
    trials report the fold mean of the models' best validation metrics so far (chunks ending at
    ASHA's rungs ``stops``); a final trial trains every fold model, scores each once on test, and
    its summary holds each model's summary and the metrics of their concatenated embedding.

    Args:
        config: what Tune/Optuna sampled (+ the space's fixed values; ``seed`` in the final phase).
        base: the cell's TrialConfig defaults (method, dataset, backbone, phase, fold, ...).
        metric: the validation metric the searcher and ASHA read.
        train_fn: ``train(cfg, report)``; default :func:`dmlbench.engine.train`.
        split_hash: the cell's fold-manifest hash, computed once by the driver (every report
            carries it, so pruned trials' rows have it too).
        folds: the validation folds of the trial's models (None: the base config's one fold).
        stops: epochs where a group's chunks end (ASHA's rungs in the search, and periodic
            checkpoints): after each chunk the trial reports with a checkpoint of all its models.
        checkpoint_every: ``(seconds, epochs)``: a new engine checkpoint is handed to Tune when
            ``seconds`` passed since the last one handed over (or since the trial started), or
            ``epochs`` epochs (None: by time only).
    """
    from ray import tune

    from dmlbench.results import fields, provenance, schema
    from dmlbench.search_spaces.loader import build_trial_config

    trial_dir = Path(tune.get_context().get_trial_dir())
    output_dir = trial_dir / "work"
    output_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
    group = folds is not None and len(folds) > 1
    restored = restore_checkpoint(output_dir, "" if group else "checkpoints")
    best: dict[str, float] = dict(restored.get("best") or {})
    history: list[dict[str, Any]] = list(restored.get("history") or [])
    ckpt_bytes = int(restored.get("checkpoint_bytes") or 0)
    history_metrics = tuple(dict.fromkeys((*schema.METRIC_COLUMNS, metric)))
    facts: dict[str, Any] = provenance.machine_facts("cpu")

    def common() -> dict[str, Any]:
        return {
            BEST_KEY: json.dumps(best),
            HISTORY_KEY: fields.encode_history(history, history_metrics),
            PROVENANCE_KEY: json.dumps(facts, sort_keys=True),
            STARTED_KEY: started,
            CKPT_BYTES_KEY: ckpt_bytes,
            SPLIT_HASH_KEY: split_hash or "",
        }

    def final(status: str, error: str | None = None, summary: dict[str, Any] | None = None) -> None:
        score = PENALTY if status != "complete" else float((summary or {}).get("metrics", {}).get(metric, PENALTY))
        tune.report(
            {
                **common(),
                metric: score,
                STATUS_KEY: status,
                ERROR_KEY: error or "",
                SUMMARY_KEY: json.dumps(summary or {"wall_time_s": time.time() - t0}),
            }
        )

    try:
        cfg = build_trial_config({**base, "output_dir": str(output_dir)}, dict(config))
    except Exception as err:
        final("failed", f"{type(err).__name__}: {err}")
        return
    facts = {**provenance.machine_facts(_device_kind(cfg.device)), "embedding_dim": cfg.embedding_dim,
             "image_size": cfg.image_size, "bn_policy": cfg.bn_policy}  # fmt: skip

    if train_fn is None:
        from dmlbench.engine import train as engine_train

        train_fn = engine_train
    run: TrainFn = train_fn

    period_s, every_epochs = checkpoint_every
    # time of the last hand-over, and epochs reported since (a fold-model group's models each count
    # their own epochs from 1, so epoch numbers alone cannot say how many passed)
    handed_at, since = [time.time()], [0]

    def due(epoch: int) -> bool:
        since[0] += epoch > 0
        return (every_epochs is not None and since[0] >= every_epochs) or time.time() - handed_at[0] >= period_s

    def report(epoch: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        nonlocal ckpt_bytes
        clean = _finite(metrics)
        if metric in clean and (not best or clean[metric] > best.get(metric, -math.inf)):
            best.clear()
            best.update(clean)
            best["epoch"] = float(epoch)
        if any(k in clean for k in history_metrics):
            history.append({"epoch": epoch, **clean})
        payload: dict[str, Any] = {**clean, EPOCH_KEY: epoch, STATUS_KEY: "running"}
        if epoch < cfg.epochs:
            # ASHA's time attribute; left out of the last epoch's report so the scheduler never stops
            # a trial that already trained fully (it then sends its final report and is "complete")
            payload[TIME_ATTR] = epoch
        # the searcher and ASHA read the best validation value so far (a trial ASHA stops hands
        # TPE its best, not its last epoch); the epoch's own value stays under current/<metric>
        if metric in clean:
            payload[f"current/{metric}"] = clean[metric]
            payload[metric] = best[metric]
        payload.setdefault(metric, PENALTY)
        # only a folder that holds a resumable checkpoint is handed to Tune (the engine may name
        # its checkpoint folder before the first save, e.g. at the epoch-0 evaluation), and only
        # when the checkpoint period says so
        files = _handed_files(Path(checkpoint_dir), cfg.phase == "final") if checkpoint_dir else []
        if due(epoch) and files:
            handed_at[0], since[0] = time.time(), 0
            state = {"best": best, "history": history, "epoch": epoch}
            stage, ckpt_bytes = stage_checkpoint(Path(checkpoint_dir or "."), files, state, ckpt_bytes)
            try:
                tune.report({**payload, **common()}, checkpoint=tune.Checkpoint.from_directory(str(stage)))
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        else:
            tune.report({**payload, **common()})

    try:
        if group:
            assert folds is not None
            summary = _train_group(cfg, folds, run, metric, report, stops or [], output_dir)
        else:
            cfg = cfg.replace(fold=folds[0]) if folds is not None and folds[0] != cfg.fold else cfg
            summary = summarise(run(cfg, report))
    except Diverged as err:
        final("diverged", str(err))
        return
    except Exception as err:
        if is_oom(err):
            raise  # FailureConfig retries from the last checkpoint, then the trial errors
        tb = traceback.format_exception_only(type(err), err)[-1].strip()
        final("failed", tb)
        return
    final("complete", summary=summary)


def _train_group(cfg: Any, folds: list[int | None], train_fn: TrainFn, metric: str, report: Any,
                 stops: list[int], output_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Train a fold-model group; its summary (search: fold-mean metrics; final: per-fold summaries
    under ``folds`` and the concatenated embedding's metrics under ``concatenated``)."""
    from dmlbench.orchestrator.folds import concatenated_metrics, fold_configs, fold_mean, train_folds

    final_phase = cfg.phase == "final"
    models = train_folds(fold_configs(cfg, folds), train_fn, metric, report=report,
                         stops=stops, checkpoint_dir=str(output_dir))  # fmt: skip
    parts = [summarise(m.result) for m in models]
    for part, m in zip(parts, models, strict=True):
        part["fold"] = m.cfg.fold
    summary: dict[str, Any] = {
        "eval_split": "test" if final_phase else "val",
        "best_epoch": None,
        "epochs_run": max(int(p.get("epochs_run") or 0) for p in parts),
        "steps": sum(int(p.get("steps") or 0) for p in parts),
        "wall_time_s": sum(float(p.get("wall_time_s") or 0.0) for p in parts),
        "split_hash": parts[0].get("split_hash"),
        "pretrained_id": parts[0].get("pretrained_id"),
        "metrics": fold_mean([p["metrics"] for p in parts]),
        "test_metrics": None,
    }
    for part in parts:  # each model's selected validation score next to their mean
        if metric in part["metrics"]:
            summary["metrics"][f"fold{part['fold']}/{metric}"] = part["metrics"][metric]
    if final_phase:
        summary["folds"] = parts
        embs = [getattr(m.result, "test_embedding", None) for m in models]
        if any(e is None for e in embs):
            summary["concatenated_error"] = "the fold models' results carry no test embeddings to concatenate"
        else:
            summary["concatenated"] = _finite(concatenated_metrics(cfg, embs))
    return summary
