"""Turn a finished Tune trial into a schema row (pure: no Ray imports).

Machine facts (GPU, package versions, git sha + dirty flag) and the resolved ``embedding_dim``,
``image_size`` and ``bn_policy`` come from the trial's own reports (read on its worker, see
:mod:`.trainable`); only a trial that never reported (e.g. its config failed to build before the
first report could carry them) falls back to the cell's defaults, and its machine columns stay NULL.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from dmlbench.orchestrator.planning import cell_settings, protocol_label
from dmlbench.orchestrator.spec import Cell, SweepSpec
from dmlbench.orchestrator.trainable import (
    BEST_KEY,
    CKPT_BYTES_KEY,
    EPOCH_KEY,
    ERROR_KEY,
    HISTORY_KEY,
    PROVENANCE_KEY,
    ROUTE_KEYS,
    SPLIT_HASH_KEY,
    STARTED_KEY,
    STATUS_KEY,
    SUMMARY_KEY,
)
from dmlbench.results import fields, schema

_SPLIT_COLUMNS = {
    schema.MAP_AT_R,
    schema.R_PRECISION,
    schema.PRECISION_AT_1,
    schema.NMI,
    schema.F1,
    *schema.RECALL,
}
#: Tune's own bookkeeping keys (not metrics)
_TUNE_KEYS = {
    "time_this_iter_s", "time_total_s", "timestamp", "training_iteration", "done", "pid", "hostname",
    "node_ip", "time_since_restore", "iterations_since_restore", "checkpoint_dir_name", "date",
    "trial_id", "experiment_tag", "config", "should_checkpoint",
}  # fmt: skip


def row_id(spec: SweepSpec, cell: Cell, phase: str, trial_id: str) -> str:
    """``<sweep>-<cell slug>-<phase>-<trial id>``; the same trial always gets the same id."""
    return f"{spec.sweep_id}-{cell.slug}-{phase}-{trial_id}"


def classify(last: dict[str, Any], errored: bool) -> str:
    """Row status of a terminal trial from its last report.

    ``complete``/``diverged``/``failed`` come from the trainable's final report; a trial Tune
    marked as errored (OOM after its retry, a dead worker past ``max_failures``) is ``failed``;
    a trial that stopped without a final report was stopped by ASHA: ``pruned``.
    """
    status = str(last.get(STATUS_KEY, ""))
    if status in ("complete", "diverged", "failed"):
        return status
    return "failed" if errored else "pruned"


def build_row(
    spec: SweepSpec,
    cell: Cell,
    phase: str,
    trial_id: str,
    config_json: str | None,
    params: dict[str, Any],
    last: dict[str, Any],
    error: str | None,
    seed: int,
    fold: int | None,
    base: dict[str, Any],
    concatenated: bool = False,
    row_suffix: str = "",
) -> dict[str, Any]:
    """One schema row for a terminal trial (``concatenated``: the row of a final seed's
    concatenated fold-model embedding; ``row_suffix`` tells apart the rows of one trial: ``-f<i>``
    per fold model, ``-concat``; the ``trial_id`` column stays the trial's)."""
    status = classify(last, errored=error is not None)
    summary: dict[str, Any] = json.loads(last.get(SUMMARY_KEY) or "{}")
    best: dict[str, float] = json.loads(last.get(BEST_KEY) or "{}")
    if status == "complete":
        metrics = dict(summary.get("metrics") or {})
        if phase == "final" and summary.get("test_metrics"):
            metrics = dict(summary["test_metrics"])
        best_epoch = summary.get("best_epoch")
        eval_split = summary.get("eval_split") or ("test" if phase == "final" else "val")
    else:
        metrics = {k: v for k, v in best.items() if k != "epoch"}
        best_epoch = int(best["epoch"]) if "epoch" in best else None
        eval_split = "test" if phase == "final" else "val"
    epochs = summary.get("epochs_run")
    if epochs is None:
        ep = last.get(EPOCH_KEY)
        epochs = int(ep) if isinstance(ep, (int, float)) else None
    wall = summary.get("wall_time_s")
    if wall is None:
        wall = last.get("time_total_s")
    facts: dict[str, Any] = json.loads(last.get(PROVENANCE_KEY) or "{}")
    gpus = spec.gpus_per_trial or 0.0  # resolved by the sweep; None (not yet resolved) counts as 0
    gpu_hours = None
    if wall is not None:
        gpu_hours = float(wall) / 3600.0 * gpus
    versions = facts.get("package_versions")
    ckpt_bytes = last.get(CKPT_BYTES_KEY)
    err = error or (str(last.get(ERROR_KEY)) if last.get(ERROR_KEY) else None)
    settings = cell_settings(spec, cell)
    row: dict[str, Any] = {
        schema.ROW_ID: row_id(spec, cell, phase, trial_id + row_suffix),
        schema.SWEEP_ID: spec.sweep_id,
        schema.CELL: cell.key,
        schema.TRIAL_ID: trial_id,
        schema.SOURCE: "dmlbench",
        schema.CREATED_AT: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        schema.STARTED_AT: last.get(STARTED_KEY) or None,
        schema.METHOD: cell.method,
        schema.DATASET: cell.dataset,
        schema.BACKBONE: cell.backbone,
        schema.PRETRAINED: summary.get("pretrained_id") or _pretrained_label(base),
        # a concatenated row's dimension is its fold models' together (the sink sets it in ``base``)
        schema.EMBEDDING_DIM: base.get("embedding_dim") if concatenated else facts.get("embedding_dim", base.get("embedding_dim")),
        schema.IMAGE_SIZE: facts.get("image_size", base.get("image_size")),
        schema.BN_POLICY: facts.get("bn_policy", base.get("bn_policy")),
        schema.PROTOCOL: protocol_label(spec, concatenated),
        schema.SPLIT_HASH: summary.get("split_hash") or last.get(SPLIT_HASH_KEY) or None,
        schema.FOLD: fold,
        schema.SEED: seed,
        schema.PHASE: phase,
        schema.EVAL_SPLIT: eval_split,
        schema.STATUS: status,
        schema.ERROR: err,
        schema.PARAMS_JSON: json.dumps(params, sort_keys=True),
        schema.CONFIG_JSON: config_json,
        schema.CONFIG_DIGEST: fields.config_digest(config_json),
        schema.BUDGET_CAPPED: settings.budget_capped,
        schema.RECIPE_SOURCE: settings.recipe_source,
        schema.PAPER_SELECTION: settings.paper_selection,
        schema.EXTRAPOLATED: settings.extrapolated,
        schema.METRICS_JSON: json.dumps(metrics, sort_keys=True),
        schema.HISTORY_JSON: last.get(HISTORY_KEY) or None,
        schema.EPOCHS: epochs,
        schema.BEST_EPOCH: int(best_epoch) if best_epoch is not None else None,
        schema.STEPS: summary.get("steps"),
        schema.WALL_TIME_S: float(wall) if wall is not None else None,
        schema.GPU_HOURS: gpu_hours,
        schema.CHECKPOINT_BYTES: int(ckpt_bytes) if isinstance(ckpt_bytes, (int, float)) else None,
        schema.GPU_TYPE: facts.get("gpu_type"),
        schema.GPU_COUNT: facts.get("gpu_count"),
        schema.PACKAGE_VERSIONS_JSON: json.dumps(versions, sort_keys=True) if versions else None,
        schema.GIT_SHA: facts.get("git_sha"),
        schema.GIT_DIRTY: facts.get("git_dirty"),
        schema.SCHEMA_VERSION_COL: schema.SCHEMA_VERSION,
    }
    for col in _SPLIT_COLUMNS:
        if col in metrics:
            row[col] = float(metrics[col])
    if not row[schema.EMBEDDING_DIM]:
        row[schema.EMBEDDING_DIM] = None
    return row


def _pretrained_label(base: dict[str, Any]) -> str:
    pre = base.get("pretrained", True)
    if pre is False:
        return "none"
    if pre is True:
        return f"timm:{base.get('backbone', '?')}"
    return str(pre)


def sampled_params(config: dict[str, Any]) -> dict[str, Any]:
    """The searched/fixed values of a Tune config (without Tune's own keys and the trial's cell and
    phase tags)."""
    return {k: v for k, v in config.items() if k not in _TUNE_KEYS and k not in ROUTE_KEYS}


def search_score(last: dict[str, Any], metric: str) -> float | None:
    """The validation score a complete search trial's row carries (its summary's ``metric``), from
    the trial's last report; None for any other trial. The best search trial of a cell is the one
    with the best score (:func:`dmlbench.orchestrator.experiment.pick_best` reads the same from rows)."""
    if classify(last, errored=False) != "complete":
        return None
    value = (json.loads(last.get(SUMMARY_KEY) or "{}").get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
