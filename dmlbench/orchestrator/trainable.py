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
ASHA stops still has its best epoch on record.
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


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


def restore_checkpoint(output_dir: Path) -> bool:
    """Copy the checkpoint Tune hands back (after a worker failure / restore) into ``output_dir/checkpoints``."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return False
    dest = output_dir / "checkpoints"
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
) -> None:
    """Tune function trainable: one trial of one cell (search or final phase).

    Args:
        config: what Tune/Optuna sampled (+ the space's fixed values; ``seed`` in the final phase).
        base: the cell's TrialConfig defaults (method, dataset, backbone, phase, fold, ...).
        metric: the validation metric the searcher and ASHA read.
        train_fn: ``train(cfg, report)``; default :func:`dmlbench.engine.train`.
        split_hash: the cell's fold-manifest hash, computed once by the driver (every report
            carries it, so pruned trials' rows have it too).
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
        from dmlbench.engine import train as train_fn

    restore_checkpoint(output_dir)

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
        payload.setdefault(metric, PENALTY)
        # only a folder that holds a resumable checkpoint is handed to Tune (the engine may name
        # its checkpoint folder before the first save, e.g. at the epoch-0 evaluation)
        if checkpoint_dir and (Path(checkpoint_dir) / "last.pt").is_file():
            tune.report(payload, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
        else:
            tune.report(payload)

    try:
        result = train_fn(cfg, report)
    except Diverged as err:
        final("diverged", str(err))
        return
    except Exception as err:
        if is_oom(err):
            raise  # FailureConfig retries from the last checkpoint, then the trial errors
        tb = traceback.format_exception_only(type(err), err)[-1].strip()
        final("failed", tb)
        return
    final("complete", summary=summarise(result))
