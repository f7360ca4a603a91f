"""docs/results.md documents every schema and leaderboard column, and its pandas example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_leaderboard_fixtures import FINAL_VALUES, write_fixture

from dmlbench.results import leaderboard, schema

DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def test_every_schema_column_is_documented() -> None:
    text = DOC.read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, flags=re.MULTILINE))
    assert set(schema.COLUMNS) <= documented, sorted(set(schema.COLUMNS) - documented)


def test_every_leaderboard_column_is_documented(tmp_path: Path) -> None:
    import pandas as pd
    from test_leaderboard_fixtures import fixture_rows

    text = DOC.read_text()
    rows = pd.DataFrame([schema.validate_row(r) for r in fixture_rows()])
    cols = set(leaderboard.final_table(rows, "cub200").columns) | set(
        leaderboard.search_table(rows, "cub200").columns
    )
    for col in cols:
        generic = re.sub(r"^(.*)_(mean|std|ci95)$", r"<metric>_\2", col)
        assert f"`{col}`" in text or f"`{generic}`" in text, col


def test_pandas_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    write_fixture(tmp_path)
    ns: dict[str, object] = {"RESULTS_DIR": str(tmp_path)}
    exec(compile(blocks[0], str(DOC), "exec"), ns)
    out = capsys.readouterr().out
    table = ns["table"]
    ccp = table[table["method"] == "ccp"].iloc[0]  # type: ignore[index]
    assert ccp["n_seeds"] == len(FINAL_VALUES["ccp"]) and ccp["rank"] == 1
    assert "map_at_r_ci95" in out and "proxyanchor" in out
