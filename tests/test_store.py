"""Atomic per-trial row files, tolerant reading, leaderboard rebuild under concurrency."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from dmlbench.errors import DmlbenchError
from dmlbench.results import schema, store


def make_row(row_id: str, map_at_r: float = 0.5, status: str = "complete") -> dict[str, Any]:
    return {
        schema.ROW_ID: row_id,
        schema.SWEEP_ID: "sw1",
        schema.CELL: "ccp/digits/tiny",
        schema.SOURCE: "dmlbench",
        schema.METHOD: "ccp",
        schema.DATASET: "digits",
        schema.PHASE: "search",
        schema.STATUS: status,
        schema.MAP_AT_R: map_at_r,
        schema.SCHEMA_VERSION_COL: schema.SCHEMA_VERSION,
    }


def test_write_row_is_idempotent_and_leaves_no_temp_files(tmp_path: Path) -> None:
    rows = tmp_path / "sw1" / "rows"
    p1 = store.write_row(rows, make_row("sw1-a", 0.1))
    p2 = store.write_row(rows, make_row("sw1-a", 0.7))
    assert p1 == p2
    assert sorted(x.name for x in rows.iterdir()) == [p1.name]
    df, warnings = store.read_rows(tmp_path)
    assert warnings == []
    assert list(df[schema.ROW_ID]) == ["sw1-a"]
    assert df[schema.MAP_AT_R].tolist() == [0.7]
    assert list(df.columns) == list(schema.COLUMNS)


def test_write_row_rejects_invalid_row_without_writing(tmp_path: Path) -> None:
    rows = tmp_path / "rows"
    bad = make_row("x", status="finished")
    with pytest.raises(schema.SchemaError, match="status must be one of"):
        store.write_row(rows, bad)
    assert not rows.exists() or list(rows.iterdir()) == []


def test_row_filename_is_safe() -> None:
    assert store.row_filename("a/b c-d") == "a_b_c-d.parquet"


def test_read_rows_skips_truncated_and_foreign_files(tmp_path: Path) -> None:
    rows = tmp_path / "sw1" / "rows"
    good = store.write_row(rows, make_row("sw1-a"))
    store.write_row(tmp_path / "sw2" / "rows", make_row("sw2-b"))
    (rows / "truncated.parquet").write_bytes(good.read_bytes()[:40])
    import pyarrow as pa

    pq.write_table(pa.table({"x": [1, 2]}), rows / "foreign.parquet")
    df, warnings = store.read_rows(tmp_path)
    assert sorted(df[schema.ROW_ID]) == ["sw1-a", "sw2-b"]
    assert len(warnings) == 2
    assert any("truncated.parquet" in w for w in warnings)
    assert any("foreign.parquet" in w for w in warnings)
    # a single sweep folder reads only its own rows
    df1, _ = store.read_rows(tmp_path / "sw1")
    assert list(df1[schema.ROW_ID]) == ["sw1-a"]


def test_read_rows_empty_or_missing_folder_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(DmlbenchError, match="does not exist.*dmlbench sweep"):
        store.read_rows(tmp_path / "nope")
    with pytest.raises(DmlbenchError, match="no result rows.*dmlbench sweep"):
        store.read_rows(tmp_path)


def _rebuild(args: tuple[str, int]) -> int:
    root, i = args
    store.write_row(Path(root) / f"sw{i}" / "rows", make_row(f"sw{i}-r", float(i)))
    store.rebuild_leaderboard(Path(root))
    return i


def test_rebuild_leaderboard_concurrent(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        done = pool.map(_rebuild, [(str(tmp_path), i) for i in range(4)])
    assert done == [0, 1, 2, 3]
    store.rebuild_leaderboard(tmp_path)
    table = pq.read_table(tmp_path / store.LEADERBOARD)
    assert table.schema.equals(schema.SCHEMA)
    assert sorted(table.column(schema.ROW_ID).to_pylist()) == [f"sw{i}-r" for i in range(4)]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
