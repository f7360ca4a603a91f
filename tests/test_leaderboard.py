"""Leaderboard numbers recomputed by hand from the fixture rows, paper rows, and every output format."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats
from test_leaderboard_fixtures import (
    FINAL_METRICS,
    FINAL_VALUES,
    SEARCH_TRIALS,
    fixture_rows,
    make_row,
    write_fixture,
)
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.errors import ConfigError
from dmlbench.results import leaderboard as lb
from dmlbench.results import schema, store
from dmlbench.results.paper import paper_rows, read_paper_csv

runner = CliRunner()


def hand_mean_half(values: list[float]) -> tuple[float, float | None]:
    """Mean and 95 % t half-width by explicit loops (float64 Python floats)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    lo, hi = stats.t.interval(0.95, n - 1, loc=mean, scale=math.sqrt(var) / math.sqrt(n))
    return mean, (hi - lo) / 2.0


def hand_std(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@pytest.fixture()
def rows() -> pd.DataFrame:
    return pd.DataFrame([schema.validate_row(r) for r in fixture_rows()])


def test_mean_ci_matches_t_interval() -> None:
    vals = [0.31, 0.35, 0.29, 0.4]
    mean, half, n = lb.mean_ci(vals)
    exp_mean, exp_half = hand_mean_half(vals)
    assert (
        n == 4 and mean == pytest.approx(exp_mean, abs=1e-12) and half == pytest.approx(exp_half, abs=1e-12)
    )
    assert lb.mean_ci([0.5]) == (0.5, None, 1)
    m, h, n0 = lb.mean_ci([])
    assert math.isnan(m) and h is None and n0 == 0


def test_final_table_recomputed_by_hand(rows: pd.DataFrame) -> None:
    table = lb.final_table(rows, "cub200")
    assert list(table[schema.METHOD]) == ["ccp", "diva", "proxyanchor"]  # by mean MAP@R
    assert list(table[lb.RANK]) == [1, 2, 3]
    for method, seeds in FINAL_VALUES.items():
        got = table[table[schema.METHOD] == method].iloc[0]
        assert got[lb.N_SEEDS] == len(seeds)  # the failed ccp final row is excluded
        assert got[lb.N_TRIALS] == len(SEARCH_TRIALS[method])
        hours = sum(s[-1] for s in seeds) + sum(t[-1] for t in SEARCH_TRIALS[method])
        assert got[schema.GPU_HOURS] == pytest.approx(hours)
        assert got[lb.SPREAD] == {1: "none", 2: "std", 3: "ci95"}[len(seeds)]
        for i, metric in enumerate(FINAL_METRICS):
            values = [s[i] for s in seeds]
            mean, half = hand_mean_half(values)
            assert got[metric + lb.MEAN_SUFFIX] == pytest.approx(mean, abs=1e-12), (method, metric)
            if len(seeds) < lb.MIN_SEEDS_FOR_CI:  # a CI needs >= 3 seeds
                assert math.isnan(got[metric + lb.CI_SUFFIX])
            else:
                assert got[metric + lb.CI_SUFFIX] == pytest.approx(half, abs=1e-12), (method, metric)
            std = hand_std(values)
            if std is None:
                assert math.isnan(got[metric + lb.STD_SUFFIX])
            else:
                assert got[metric + lb.STD_SUFFIX] == pytest.approx(std, abs=1e-12), (method, metric)


def test_recall_list_follows_the_dataset(rows: pd.DataFrame) -> None:
    cub = lb.final_table(rows, "cub200")
    sop = lb.final_table(rows, "sop")
    assert [c for c in cub.columns if c.startswith("recall_at_") and c.endswith("_mean")] == [
        f"recall_at_{k}_mean" for k in (1, 2, 4, 8)
    ]
    assert [c for c in sop.columns if c.startswith("recall_at_") and c.endswith("_mean")] == [
        f"recall_at_{k}_mean" for k in (1, 10, 100, 1000)
    ]
    assert sop.iloc[0]["recall_at_1000_mean"] == pytest.approx(0.99)
    assert lb.recall_ks_for("inshop") == (1, 10, 20, 30, 40, 50)
    assert lb.recall_ks_for("not-a-dataset") == lb.DEFAULT_RECALL_KS


def test_sort_by_other_metric_and_ties(rows: pd.DataFrame) -> None:
    table = lb.final_table(rows, "cub200", sort="recall_at_1")
    # R@1 means: ccp 0.69, diva 0.66, proxyanchor 0.66 → tie shares rank 2
    assert list(table[schema.METHOD]) == ["ccp", "diva", "proxyanchor"]
    assert list(table[lb.RANK]) == [1, 2, 2]
    with pytest.raises(ConfigError, match="valid sort metrics"):
        lb.final_table(rows, "cub200", sort="mapr")


def test_search_table_best_trial_and_counts(rows: pd.DataFrame) -> None:
    table = lb.search_table(rows, "cub200")
    for method, trials in SEARCH_TRIALS.items():
        got = table[table[schema.METHOD] == method].iloc[0]
        complete = [(i, t) for i, t in enumerate(trials) if t[0] == "complete"]
        best_i, best = max(complete, key=lambda it: it[1][2])
        assert got[lb.BEST_ROW_ID] == f"sw1-{method}-search-t{best_i:03d}"
        assert got["val_map_at_r"] == pytest.approx(best[2])
        assert got["val_recall_at_1"] == pytest.approx(best[3])
        for status, col in [
            ("complete", lb.N_COMPLETE),
            ("pruned", lb.N_PRUNED),
            ("diverged", lb.N_DIVERGED),
        ]:
            assert got[col] == sum(1 for t in trials if t[0] == status)
        assert got[schema.GPU_HOURS] == pytest.approx(sum(t[-1] for t in trials))
    # validation scores never appear in the final (test) table's columns and vice versa
    assert not any(c.startswith(lb.VAL_PREFIX) for c in lb.final_table(rows, "cub200").columns)
    assert not any(c.endswith(lb.MEAN_SUFFIX) for c in table.columns)


def test_paper_rows_unranked_and_visible(rows: pd.DataFrame) -> None:
    paper = paper_rows()
    assert set(paper[schema.SOURCE]) == {"paper"} and set(paper[schema.PHASE]) == {"paper"}
    boards = lb.build(rows, datasets="cub200", methods="ccp", paper=paper)
    (final,) = boards.final.values()
    ours, theirs = final[final[schema.SOURCE] == "dmlbench"], final[final[schema.SOURCE] == "paper"]
    assert len(ours) == 1 and ours.iloc[0][lb.RANK] == 1
    assert len(theirs) > 0 and theirs[lb.RANK].isna().all()
    # our single-model lines: published single-model / fold-mean lines beside them, never concatenations
    assert set(theirs[schema.PROTOCOL]) == {"mlrc-cv4-val-select-foldmean"}
    c2 = theirs[(theirs[lb.LABEL] == "C2-CCP-L") & (theirs[schema.EMBEDDING_DIM] == 128)].iloc[0]
    assert c2["map_at_r_mean"] == pytest.approx(0.2267)  # CCP supp. Table 2, CUB 128 (fold mean), MAP@R 22.67 %


def test_paper_concatenations_beside_our_concatenations_of_as_many_models(rows: pd.DataFrame) -> None:
    concat = rows[(rows[schema.METHOD] == "ccp") & (rows[schema.PHASE] == "final")].copy()
    for k, dim in ((4, 512), (3, 384)):
        concat[schema.PROTOCOL] = f"mlrc-concat{k}"
        concat[schema.EMBEDDING_DIM] = dim
        boards = lb.build(concat, datasets="cub200", methods="ccp", paper=paper_rows())
        (final,) = boards.final.values()
        theirs = final[final[schema.SOURCE] == "paper"]
        if k == 4:  # the CCP paper's 4 fold models x 128-d concatenated
            assert set(theirs[schema.PROTOCOL]) == {"mlrc-cv4-val-select-concat4"}
            c2 = theirs[theirs[lb.LABEL] == "C2-CCP-L"].iloc[0]
            assert c2["map_at_r_mean"] == pytest.approx(0.2802)  # CCP supp. Table 2, CUB 512, MAP@R 28.02 %
        else:  # nothing published concatenates 3 models
            assert theirs.empty


def test_paper_csv_is_well_formed() -> None:
    lines = read_paper_csv()
    assert {ln["verified"] for ln in lines if ln["method"] == "nivmf"} == {"unverified"}
    assert {ln["verified"] for ln in lines if ln["key"] == "gurbuz2024ccp"} == {"yes"}
    diva = [
        ln
        for ln in lines
        if ln["label"] == "DiVA" and ln["dataset"] == "sop" and ln["metric"] == "recall_at_10"
    ]
    assert len(diva) == 1 and float(diva[0]["value_pct"]) == 91.2
    df = paper_rows()
    assert df[schema.ROW_ID].is_unique
    vals = df[list(schema.METRIC_COLUMNS)].to_numpy(dtype=float)
    finite = vals[~pd.isna(vals)]
    assert ((finite > 0) & (finite < 1)).all()  # fractions, not percent


def test_bad_filters_are_one_sentence(rows: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match=r"no rows for dataset 'cub'.*did you mean cub200"):
        lb.build(rows, datasets="cub")
    with pytest.raises(ConfigError, match="valid phases"):
        lb.build(rows, phase="test")


def test_phase_filter(rows: pd.DataFrame) -> None:
    assert not lb.build(rows, phase="final").search and lb.build(rows, phase="final").final
    assert not lb.build(rows, phase="search").final and lb.build(rows, phase="search").search


# ---- CLI: every format parses ----------------------------------------------------------------
def test_cli_json_csv_markdown_table(tmp_path: Path) -> None:
    write_fixture(tmp_path)
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    ccp = next(r for r in data["final"]["cub200"] if r["method"] == "ccp")
    assert ccp["map_at_r_mean"] == pytest.approx(0.27) and ccp["rank"] == 1
    assert data["search"]["cub200"][0]["best_row_id"] == "sw1-ccp-search-t001"

    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "csv", "--with-paper"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.stdout))
    assert set(df[lb.TABLE]) == {"final", "search"}
    assert (df[(df[lb.TABLE] == "final") & (df[schema.SOURCE] == "paper")][lb.RANK].isna()).all()
    pa_ = df[
        (df[lb.TABLE] == "final") & (df[schema.METHOD] == "proxyanchor") & (df[schema.SOURCE] == "dmlbench")
    ]
    assert math.isnan(pa_.iloc[0]["map_at_r_ci95"])  # two seeds: no CI, the std instead
    assert pa_.iloc[0]["map_at_r_std"] == pytest.approx(hand_std([0.24, 0.22]))
    assert pa_.iloc[0][lb.SPREAD] == "std"

    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "markdown", "--dataset", "cub200"])
    assert res.exit_code == 0, res.output
    tables = [blk for blk in res.stdout.split("\n\n") if blk.startswith("|")]
    assert len(tables) == 2  # final + search for cub200
    for blk in tables:
        lines = blk.strip().splitlines()
        widths = {ln.count(" | ") for ln in lines if not ln.startswith("|---")}
        assert len(widths) == 1 and lines[1].startswith("|---")
    assert "27.00 ± 2.48 |" in res.stdout and "23.00 ± 1.41 sd |" in res.stdout and "25.00 (n=1)" in res.stdout
    assert lb.SPREAD_LEGEND in res.stdout

    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--sort", "nmi"])
    assert res.exit_code == 0, res.output
    assert "NMI ▼" in res.stdout and "search phase" in res.stdout


def test_cli_bad_input(tmp_path: Path) -> None:
    res = runner.invoke(app, ["leaderboard", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.stderr and "dmlbench sweep" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["leaderboard", str(empty)])
    assert res.exit_code == 2 and "no result rows" in res.stderr
    write_fixture(tmp_path / "r")
    res = runner.invoke(app, ["leaderboard", str(tmp_path / "r"), "--format", "xml"])
    assert res.exit_code == 2 and "valid formats" in res.stderr
    res = runner.invoke(app, ["leaderboard", str(tmp_path / "r"), "--method", "cpp"])
    assert res.exit_code == 2 and "did you mean ccp" in res.stderr
    assert "Traceback" not in res.output


def test_cli_truncated_and_foreign_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    write_fixture(tmp_path)
    rows_dir = tmp_path / "sw1" / store.ROWS_DIR
    good = min(rows_dir.glob("*.parquet"))
    (rows_dir / "zz-truncated.parquet").write_bytes(good.read_bytes()[:40])
    pd.DataFrame({"x": [1]}).to_parquet(rows_dir / "zz-foreign.parquet")
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert "zz-truncated.parquet" in res.stderr and "zz-foreign.parquet" in res.stderr
    data = json.loads(res.stdout)
    assert len(data["warnings"]) == 2 and len(data["final"]["cub200"]) == 3


def test_cli_only_unreadable_files_exit_2(tmp_path: Path) -> None:
    rows_dir = tmp_path / "sw" / store.ROWS_DIR
    rows_dir.mkdir(parents=True)
    (rows_dir / "bad.parquet").write_bytes(b"PAR1 not really")
    res = runner.invoke(app, ["leaderboard", str(tmp_path)])
    assert res.exit_code == 2 and "bad.parquet" in res.stderr and "could be read" in res.stderr


def test_cli_newer_schema_version_is_named(tmp_path: Path) -> None:
    write_fixture(tmp_path)
    newer = schema.to_table([make_row("future-row")]).to_pandas()
    newer[schema.SCHEMA_VERSION_COL] = schema.SCHEMA_VERSION + 1
    newer.to_parquet(tmp_path / "sw1" / store.ROWS_DIR / "future-row.parquet")
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--phase", "final"])
    assert res.exit_code == 0, res.output
    assert f"schema_version {schema.SCHEMA_VERSION + 1}" in res.stderr and "upgrade dmlbench" in res.stderr


def test_cli_no_final_rows_for_phase_final(tmp_path: Path) -> None:
    write_fixture(tmp_path, [r for r in fixture_rows() if r[schema.PHASE] == "search"])
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--phase", "final"])
    assert res.exit_code == 2 and "final-phase rows" in res.stderr
