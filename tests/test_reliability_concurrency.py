"""Two writers on the same ``--output`` at once: no row is corrupted or lost, the leaderboard is the union.

Two processes (as two sweeps would) each write rows into their own sweep folder under one results
folder and rebuild ``leaderboard.parquet`` after every row, while this process keeps reading the
leaderboard. Every read must succeed (the leaderboard is replaced atomically, never seen half
written), and at the end every row file is readable and the leaderboard holds exactly the union.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

from dmlbench.results import schema, store

ROWS_PER_WRITER = 15


def _row(sweep: str, i: int) -> dict[str, Any]:
    return {
        schema.ROW_ID: f"{sweep}-r{i:03d}", schema.SWEEP_ID: sweep, schema.CELL: "triplet/digits/tiny",
        schema.SOURCE: "dmlbench", schema.METHOD: "triplet", schema.DATASET: "digits", schema.PHASE: "search",
        schema.STATUS: "complete", schema.MAP_AT_R: i / 100.0, schema.SCHEMA_VERSION_COL: schema.SCHEMA_VERSION,
    }  # fmt: skip


def _writer(args: tuple[str, str]) -> int:
    root, sweep = args
    for i in range(ROWS_PER_WRITER):
        store.write_row(Path(root) / sweep / store.ROWS_DIR, _row(sweep, i))
        store.rebuild_leaderboard(Path(root))
    return ROWS_PER_WRITER


def test_two_writers_same_output_no_corruption(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    reads = 0
    with ctx.Pool(2) as pool:
        pending = pool.map_async(_writer, [(str(tmp_path), "sweep-a"), (str(tmp_path), "sweep-b")])
        while not pending.ready():
            lb = tmp_path / store.LEADERBOARD
            if lb.exists():
                table = store.read_parquet(lb)  # must never be a half-written file
                assert table.schema.equals(schema.SCHEMA)
                ids = table.column(schema.ROW_ID).to_pylist()
                assert len(ids) == len(set(ids))
                reads += 1
            time.sleep(0.02)
        assert pending.get(timeout=120) == [ROWS_PER_WRITER, ROWS_PER_WRITER]
    assert reads > 0

    expected = {f"{s}-r{i:03d}": i / 100.0 for s in ("sweep-a", "sweep-b") for i in range(ROWS_PER_WRITER)}
    df, warnings = store.read_rows(tmp_path)
    assert warnings == []
    assert dict(zip(df[schema.ROW_ID], df[schema.MAP_AT_R], strict=True)) == expected
    board = store.read_parquet(tmp_path / store.LEADERBOARD).to_pandas()
    assert dict(zip(board[schema.ROW_ID], board[schema.MAP_AT_R], strict=True)) == expected
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
