"""Schema version 2: the config digest, the per-epoch history, and reading version-1 rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from test_leaderboard_fixtures import make_row

from dmlbench.config import TrialConfig
from dmlbench.results import fields, schema, store


def test_digest_ignores_per_run_keys_only() -> None:
    cfg = TrialConfig(method="proxyanchor", dataset="digits", backbone="tiny", epochs=2)
    base = fields.config_digest(cfg.to_json())
    assert base is not None and len(base) == fields.DIGEST_CHARS
    same = cfg.replace(seed=5, fold=2, output_dir="/elsewhere", device="cpu", phase="final")
    assert fields.config_digest(same.to_json()) == base
    for change in ({"epochs": 3}, {"lr": 2e-5}, {"params": {"alpha": 16.0}}, {"image_size": 64}):
        assert fields.config_digest(cfg.replace(**change).to_json()) != base, change
    assert fields.config_digest(None) is None and fields.config_digest("") is None
    assert fields.config_digest("{not json") is None


def test_every_run_only_key_is_a_trial_config_field() -> None:
    assert fields.RUN_ONLY_KEYS <= set(TrialConfig.model_fields)


def test_history_round_trip_keeps_last_report_per_epoch() -> None:
    reports = [
        {"epoch": 0, "map_at_r": 0.1, "loss": 2.0},
        {"epoch": 1, "loss": 1.5},  # no validation this epoch
        {"epoch": 2, "map_at_r": 0.2, "recall_at_1": float("nan")},
        {"epoch": 2, "map_at_r": 0.25},  # repeated after a restore: the later one wins
    ]
    text = fields.encode_history(reports, schema.METRIC_COLUMNS)
    assert fields.decode_history(text) == [{"epoch": 0, "map_at_r": 0.1}, {"epoch": 2, "map_at_r": 0.25}]
    tune_reports = [{"trial_epoch": e, "map_at_r": 0.1 * e, "time_total_s": 3.0} for e in (1, 2)]
    text = fields.encode_history(tune_reports, schema.METRIC_COLUMNS, epoch_key="trial_epoch")
    assert fields.decode_history(text) == [{"epoch": 1, "map_at_r": 0.1}, {"epoch": 2, "map_at_r": 0.2}]


def test_version_1_rows_are_read_with_null_new_columns(tmp_path: Path) -> None:
    row = schema.validate_row(make_row("old-1", map_at_r=0.3))
    v1_cols = [c for c in schema.COLUMNS if c not in schema.ADDED_IN[2]]
    v1 = pa.Table.from_pylist(
        [{**{c: row[c] for c in v1_cols}, schema.SCHEMA_VERSION_COL: 1}],
        schema=pa.schema([schema.SCHEMA.field(c) for c in v1_cols]),
    )
    rows_dir = tmp_path / "sw-old" / store.ROWS_DIR
    rows_dir.mkdir(parents=True)
    pq.write_table(v1, rows_dir / "old-1.parquet")
    store.write_row(tmp_path / "sw-new" / store.ROWS_DIR, make_row("new-1", history_json=json.dumps([])))
    df, warnings = store.read_rows(tmp_path)
    assert warnings == [] and len(df) == 2
    old = df[df[schema.ROW_ID] == "old-1"].iloc[0]
    assert pd.isna(old[schema.CONFIG_DIGEST]) and pd.isna(old[schema.HISTORY_JSON])
    assert old[schema.MAP_AT_R] == 0.3 and set(df[schema.SCHEMA_VERSION_COL]) == {schema.SCHEMA_VERSION}
