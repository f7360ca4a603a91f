"""The result-row schema: the only place a column name is spelled out (STYLE rule 14).

One row = one trial (search or final phase) or one published number (``source=paper``).
``SCHEMA_VERSION`` increases whenever a column is added, removed or changes meaning; readers
upgrade older rows with :func:`upgrade` or say which version they need.

Versions: 1 the first; 2 added ``config_digest`` and ``history_json`` (NULL in upgraded v1 rows;
readers derive the digest from ``config_json`` with :func:`dmlbench.results.fields.config_digest`);
3 added ``budget_capped``, ``recipe_source``, ``paper_selection`` and ``extrapolated`` (issue 17:
protocols and recipes; NULL in upgraded rows);
4 added ``started_at``, ``checkpoint_bytes`` and ``git_dirty`` (issue 16; NULL in upgraded rows).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 4

# ---- identity ----------------------------------------------------------------------------
ROW_ID = "row_id"  # unique: <sweep_id>-<cell>-<trial key>
SWEEP_ID = "sweep_id"
CELL = "cell"  # "<method>/<dataset>/<backbone>"
TRIAL_ID = "trial_id"
SOURCE = "source"  # "dmlbench" | "paper"
CREATED_AT = "created_at"  # UTC ISO-8601: when the row was written
STARTED_AT = "started_at"  # UTC ISO-8601 (ms): when the trial's last attempt started, on its worker's clock
# ---- what ran ----------------------------------------------------------------------------
METHOD = "method"
DATASET = "dataset"
BACKBONE = "backbone"
PRETRAINED = "pretrained"  # weights id ("timm:resnet50.a1_in1k", a file sha, "none")
EMBEDDING_DIM = "embedding_dim"
IMAGE_SIZE = "image_size"
BN_POLICY = "bn_policy"
PROTOCOL = "protocol"  # ours: "mlrc", "holdout", "paper", "<...>-concat<k>"; paper rows e.g. "test-select"
SPLIT_HASH = "split_hash"
FOLD = "fold"
SEED = "seed"
PHASE = "phase"  # "search" | "final" | "paper"
EVAL_SPLIT = "eval_split"  # "val" | "test": which classes the metrics were computed on
STATUS = "status"  # see STATUSES
ERROR = "error"
PARAMS_JSON = "params_json"
CONFIG_JSON = "config_json"
CONFIG_DIGEST = "config_digest"  # digest of config_json without per-run keys (seed, fold, paths)
BUDGET_CAPPED = "budget_capped"  # the sweep's --epochs cut the recipe's own epochs
RECIPE_SOURCE = "recipe_source"  # where the trial's settings come from (paper table, script, protocol)
PAPER_SELECTION = "paper_selection"  # paper protocol: how the paper itself selected what it reported
EXTRAPOLATED = "extrapolated"  # why the recipe is not the paper's own setting (NULL: it is)
# ---- outcome -----------------------------------------------------------------------------
MAP_AT_R = "map_at_r"
R_PRECISION = "r_precision"
PRECISION_AT_1 = "precision_at_1"
NMI = "nmi"
F1 = "f1"
RECALL_KS = (1, 2, 4, 8, 10, 20, 30, 40, 50, 100, 1000)
RECALL = tuple(f"recall_at_{k}" for k in RECALL_KS)
METRICS_JSON = "metrics_json"  # every metric the trial logged at its selected epoch
HISTORY_JSON = "history_json"  # [{"epoch": 0, "map_at_r": ..., ...}, ...]: every validation of the run
EPOCHS = "epochs"  # epochs trained
BEST_EPOCH = "best_epoch"
STEPS = "steps"
WALL_TIME_S = "wall_time_s"
GPU_HOURS = "gpu_hours"
CHECKPOINT_BYTES = "checkpoint_bytes"  # bytes of checkpoints the trial handed to Tune's storage
# ---- provenance --------------------------------------------------------------------------
GPU_TYPE = "gpu_type"  # e.g. "NVIDIA H200" or "cpu"
GPU_COUNT = "gpu_count"
PACKAGE_VERSIONS_JSON = "package_versions_json"
GIT_SHA = "git_sha"
GIT_DIRTY = "git_dirty"  # the checkout had uncommitted changes
SCHEMA_VERSION_COL = "schema_version"
CITATION = "citation"  # paper rows

STATUSES = ("complete", "pruned", "diverged", "failed")
SOURCES = ("dmlbench", "paper")
PHASES = ("search", "final", "paper")
METRIC_COLUMNS = (MAP_AT_R, R_PRECISION, PRECISION_AT_1, NMI, F1, *RECALL)

SCHEMA = pa.schema(
    [
        pa.field(ROW_ID, pa.string(), nullable=False),
        pa.field(SWEEP_ID, pa.string()),
        pa.field(CELL, pa.string()),
        pa.field(TRIAL_ID, pa.string()),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(CREATED_AT, pa.string()),
        pa.field(STARTED_AT, pa.string()),
        pa.field(METHOD, pa.string(), nullable=False),
        pa.field(DATASET, pa.string(), nullable=False),
        pa.field(BACKBONE, pa.string()),
        pa.field(PRETRAINED, pa.string()),
        pa.field(EMBEDDING_DIM, pa.int64()),
        pa.field(IMAGE_SIZE, pa.int64()),
        pa.field(BN_POLICY, pa.string()),
        pa.field(PROTOCOL, pa.string()),
        pa.field(SPLIT_HASH, pa.string()),
        pa.field(FOLD, pa.int64()),
        pa.field(SEED, pa.int64()),
        pa.field(PHASE, pa.string(), nullable=False),
        pa.field(EVAL_SPLIT, pa.string()),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR, pa.string()),
        pa.field(PARAMS_JSON, pa.string()),
        pa.field(CONFIG_JSON, pa.string()),
        pa.field(CONFIG_DIGEST, pa.string()),
        pa.field(BUDGET_CAPPED, pa.bool_()),
        pa.field(RECIPE_SOURCE, pa.string()),
        pa.field(PAPER_SELECTION, pa.string()),
        pa.field(EXTRAPOLATED, pa.string()),
        *[pa.field(m, pa.float64()) for m in METRIC_COLUMNS],
        pa.field(METRICS_JSON, pa.string()),
        pa.field(HISTORY_JSON, pa.string()),
        pa.field(EPOCHS, pa.int64()),
        pa.field(BEST_EPOCH, pa.int64()),
        pa.field(STEPS, pa.int64()),
        pa.field(WALL_TIME_S, pa.float64()),
        pa.field(GPU_HOURS, pa.float64()),
        pa.field(CHECKPOINT_BYTES, pa.int64()),
        pa.field(GPU_TYPE, pa.string()),
        pa.field(GPU_COUNT, pa.int64()),
        pa.field(PACKAGE_VERSIONS_JSON, pa.string()),
        pa.field(GIT_SHA, pa.string()),
        pa.field(GIT_DIRTY, pa.bool_()),
        pa.field(SCHEMA_VERSION_COL, pa.int64(), nullable=False),
        pa.field(CITATION, pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
#: columns added per version: an older row gets them as NULL when read (:func:`upgrade`)
ADDED_IN: dict[int, tuple[str, ...]] = {
    2: (CONFIG_DIGEST, HISTORY_JSON),
    3: (BUDGET_CAPPED, RECIPE_SOURCE, PAPER_SELECTION, EXTRAPOLATED),
    4: (STARTED_AT, CHECKPOINT_BYTES, GIT_DIRTY),
}


class SchemaError(ValueError):
    """A row or table does not match the schema."""


def validate_row(row: dict[str, Any]) -> dict[str, Any]:
    """Check one row dict against the schema; returns it with every column present (None filled)."""
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise SchemaError(f"unknown result columns: {', '.join(unknown)}")
    full = {c: row.get(c) for c in COLUMNS}
    for f in SCHEMA:
        if not f.nullable and full[f.name] is None:
            raise SchemaError(f"result column {f.name!r} must be set")
    if full[STATUS] not in STATUSES:
        raise SchemaError(f"status must be one of {', '.join(STATUSES)}, got {full[STATUS]!r}")
    if full[SOURCE] not in SOURCES:
        raise SchemaError(f"source must be one of {', '.join(SOURCES)}, got {full[SOURCE]!r}")
    if full[PHASE] not in PHASES:
        raise SchemaError(f"phase must be one of {', '.join(PHASES)}, got {full[PHASE]!r}")
    if full[SCHEMA_VERSION_COL] != SCHEMA_VERSION:
        raise SchemaError(f"row has schema_version {full[SCHEMA_VERSION_COL]}, expected {SCHEMA_VERSION}")
    return full


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Validated rows → a pyarrow table with exactly :data:`SCHEMA`."""
    full = [validate_row(r) for r in rows]
    return pa.Table.from_pylist(full, schema=SCHEMA)


def upgrade(table: pa.Table) -> pa.Table:
    """Bring a table of an older schema version to :data:`SCHEMA_VERSION`.

    Columns added since a row's version (:data:`ADDED_IN`) are filled with NULL and the rows are
    relabelled with the current version; nothing else changes. A newer version than this package
    knows raises :class:`SchemaError` naming the version needed.
    """
    if SCHEMA_VERSION_COL not in table.column_names:
        raise SchemaError("not a dmlbench result table (no schema_version column)")
    versions = set(table.column(SCHEMA_VERSION_COL).to_pylist())
    newer = sorted(v for v in versions if v is not None and v > SCHEMA_VERSION)
    if newer:
        raise SchemaError(
            f"rows have schema_version {newer[-1]} but this dmlbench reads up to {SCHEMA_VERSION}; upgrade dmlbench."
        )
    oldest = min((v for v in versions if v is not None), default=SCHEMA_VERSION)
    addable = {c for v, cols in ADDED_IN.items() if v > oldest for c in cols}
    for name in COLUMNS:
        if name not in table.column_names:
            if name not in addable:
                raise SchemaError(
                    f"rows of schema_version {oldest} lack the column {name!r}; the file is damaged."
                )
            table = table.append_column(
                pa.field(name, SCHEMA.field(name).type), pa.nulls(len(table), SCHEMA.field(name).type)
            )
    if oldest < SCHEMA_VERSION:
        idx = table.column_names.index(SCHEMA_VERSION_COL)
        table = table.set_column(
            idx, SCHEMA.field(SCHEMA_VERSION_COL), pa.array([SCHEMA_VERSION] * len(table), pa.int64())
        )
    return table.select(list(COLUMNS)).cast(SCHEMA)
