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
"""

from __future__ import annotations

import json
import math
import shutil
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
TIME_ATTR = "epoch"
#: finite score the searcher gets for diverged/failed trials (metrics live in [0, 1])
PENALTY = -1.0

TrainFn = Callable[..., Any]


def is_oom(err: BaseException) -> bool:
    """CUDA (or CPU allocator) out-of-memory errors."""
    name = type(err).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(err).lower()


def restore_checkpoint(output_dir: Path, subdir: str = "checkpoints") -> bool:
    """Copy the checkpoint Tune hands back (after a worker failure / restore) into
    ``output_dir/subdir`` (a fold-model group's checkpoint is its whole work folder: ``subdir=""``)."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return False
    dest = output_dir / subdir if subdir else output_dir
    dest.mkdir(parents=True, exist_ok=True)
    with ckpt.as_directory() as src:
        shutil.copytree(src, dest, dirs_exist_ok=True)
    return True


def summarise(result: Any) -> dict[str, Any]:
    """The parts of a ``TrainResult`` a row needs (plain JSON values)."""
    fields = ("eval_split", "best_epoch", "epochs_run", "steps", "wall_time_s", "split_hash", "pretrained_id")
    out = {f: getattr(result, f, None) for f in fields}
    out["metrics"] = _finite(dict(getattr(result, "metrics", {}) or {}))
    test = getattr(result, "test_metrics", None)
    out["test_metrics"] = _finite(dict(test)) if test else None
    return out


def run_trial(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    metric: str,
    train_fn: TrainFn | None = None,
    split_hash: str | None = None,
    folds: list[int | None] | None = None,
    stops: list[int] | None = None,
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
    """
    from ray import tune

    from dmlbench.search_spaces.loader import build_trial_config

    trial_dir = Path(tune.get_context().get_trial_dir())
    output_dir = trial_dir / "work"
    output_dir.mkdir(parents=True, exist_ok=True)
    best: dict[str, float] = {}
    t0 = time.time()

    def final(status: str, error: str | None = None, summary: dict[str, Any] | None = None) -> None:
        score = PENALTY if status != "complete" else float((summary or {}).get("metrics", {}).get(metric, PENALTY))
        tune.report(
            {
                metric: score,
                STATUS_KEY: status,
                ERROR_KEY: error or "",
                BEST_KEY: json.dumps(best),
                SUMMARY_KEY: json.dumps(summary or {"wall_time_s": time.time() - t0}),
                SPLIT_HASH_KEY: split_hash or "",
            }
        )

    try:
        cfg = build_trial_config({**base, "output_dir": str(output_dir)}, dict(config))
    except Exception as err:
        final("failed", f"{type(err).__name__}: {err}")
        return

    if train_fn is None:
        from dmlbench.engine import train as engine_train

        train_fn = engine_train
    run: TrainFn = train_fn

    group = folds is not None and len(folds) > 1
    restore_checkpoint(output_dir, "" if group else "checkpoints")

    def report(epoch: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        clean = _finite(metrics)
        if metric in clean and (not best or clean[metric] > best.get(metric, -math.inf)):
            best.clear()
            best.update(clean)
            best["epoch"] = float(epoch)
        payload: dict[str, Any] = {**clean, EPOCH_KEY: epoch, BEST_KEY: json.dumps(best), STATUS_KEY: "running",
                                   SPLIT_HASH_KEY: split_hash or ""}
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
        # its checkpoint folder before the first save, e.g. at the epoch-0 evaluation)
        ckpt = Path(checkpoint_dir) if checkpoint_dir else None
        if ckpt is not None and ((ckpt / "last.pt").is_file() or any(ckpt.glob("fold*/checkpoints/last.pt"))):
            tune.report(payload, checkpoint=tune.Checkpoint.from_directory(str(ckpt)))
        else:
            tune.report(payload)

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
