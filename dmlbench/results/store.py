"""Per-trial Parquet rows, written atomically, and the leaderboard rebuilt from them.

Layout (DESIGN §8)::

    results/
      leaderboard.parquet            all rows of all sweeps (rebuilt, never appended)
      <sweep>/rows/<row_id>.parquet  one file per trial (search or final phase)

A row file is written to a temporary file in the same folder, fsynced and renamed over its final
name, so readers never see half a file and the same ``row_id`` written twice replaces the first
(no duplicates on resume). Readers skip files that are truncated or not dmlbench rows with a
warning naming the file; the other rows are never lost.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dmlbench.errors import DmlbenchError
from dmlbench.fsutil import atomic_open, file_lock
from dmlbench.results import schema

ROWS_DIR = "rows"
LEADERBOARD = "leaderboard.parquet"
LOCK_NAME = ".leaderboard.lock"
_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def row_filename(row_id: str) -> str:
    """File name of a row: the row id with anything but ``[A-Za-z0-9._=-]`` replaced by ``_``.

    Example:
        >>> row_filename("abc123-ccp/digits/tiny-t0007")
        'abc123-ccp_digits_tiny-t0007.parquet'
    """
    return _SAFE.sub("_", row_id).strip("._") + ".parquet"


def write_table_atomic(table: pa.Table, dest: Path) -> Path:
    """Write ``table`` to ``dest`` atomically (:func:`dmlbench.fsutil.atomic_open`).

    Raises:
        DmlbenchError: the folder cannot be created or written (disk full, permissions, a file in
            the way); nothing is left at ``dest`` and files already written are untouched.
    """
    try:
        with atomic_open(dest) as fh:
            pq.write_table(table, fh)
    except OSError as err:
        raise _write_error(dest, err) from None
    return dest


def _write_error(dest: Path, err: OSError) -> DmlbenchError:
    return DmlbenchError(
        f"cannot write {str(dest)!r} ({err.strerror or type(err).__name__}); free disk space or make "
        f"{str(dest.parent)!r} a writable folder, then rerun the same command (rows already written are kept)."
    )


def write_row(rows_dir: Path, row: dict[str, Any]) -> Path:
    """Validate one row against the schema and write ``<rows_dir>/<row_id>.parquet`` atomically.

    Writing the same ``row_id`` again replaces the file (idempotent: no duplicate rows).

    Raises:
        schema.SchemaError: the row does not match the schema (nothing is written).
    """
    table = schema.to_table([row])
    return write_table_atomic(table, Path(rows_dir) / row_filename(str(row[schema.ROW_ID])))


def row_files(results_dir: Path) -> list[Path]:
    """Every row file under a results folder or a single sweep folder, sorted."""
    root = Path(results_dir)
    if root.name == ROWS_DIR and root.is_dir():
        return sorted(p for p in root.glob("*.parquet") if not p.name.startswith("."))
    return sorted(p for p in root.glob(f"**/{ROWS_DIR}/*.parquet") if not p.name.startswith("."))


def read_parquet(path: Path) -> pa.Table:
    """Read a Parquet file through ONE open handle.

    ``pq.read_table(path)`` may open the path more than once (footer, then pages); if a writer
    atomically replaces the file in between, the reader mixes two files. One handle pins one inode,
    so a concurrent :func:`rebuild_leaderboard` is seen as the old file or the new one.
    """
    with open(path, "rb") as fh:
        return pq.read_table(fh)


def _read_one(path: Path) -> pa.Table:
    return schema.upgrade(read_parquet(path))


def read_rows(results_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """All rows under ``results_dir`` (a results folder or one sweep folder) as a DataFrame.

    Files that cannot be read (truncated, foreign, newer schema) are skipped; each gives one
    warning string naming the file. Duplicate ``row_id`` values (the same trial copied into two
    folders) keep the most recently written file.

    Returns:
        ``(rows, warnings)``; the DataFrame has exactly the schema's columns.

    Raises:
        DmlbenchError: the folder does not exist or holds no row files.
    """
    root = Path(results_dir)
    if not root.exists():
        raise DmlbenchError(
            f"results folder {str(root)!r} does not exist; run a sweep first, e.g. "
            "`dmlbench sweep --methods proxyanchor --datasets embedded --preset smoke`."
        )
    files = row_files(root)
    if not files:
        raise DmlbenchError(
            f"no result rows under {str(root)!r} (expected <sweep>/rows/*.parquet); run a sweep first, e.g. "
            "`dmlbench sweep --methods proxyanchor --datasets embedded --preset smoke`."
        )
    tables: list[tuple[float, pa.Table]] = []
    warnings: list[str] = []
    for path in files:
        try:
            tables.append((path.stat().st_mtime, _read_one(path)))
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            warnings.append(f"skipped {path}: not a readable dmlbench row file ({first})")
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in schema.COLUMNS}), warnings
    tables.sort(key=lambda t: t[0])
    df = pa.concat_tables([t for _, t in tables]).to_pandas()
    df = df.drop_duplicates(subset=[schema.ROW_ID], keep="last").reset_index(drop=True)
    return df, warnings


def rebuild_leaderboard(results_dir: Path) -> Path:
    """Rebuild ``<results_dir>/leaderboard.parquet`` from every row file, atomically.

    Two processes rebuilding at once serialise on a lock file next to it; each replaces the
    leaderboard whole, so a reader sees either the old or the new file, never a mix.

    Returns:
        The leaderboard path.

    Raises:
        DmlbenchError: there are no rows to build from.
    """
    root = Path(results_dir)
    dest = root / LEADERBOARD
    with file_lock(root / LOCK_NAME):
        df, _warnings = read_rows(root)
        table = pa.Table.from_pandas(df, schema=schema.SCHEMA, preserve_index=False)
        write_table_atomic(table, dest)
    return dest
