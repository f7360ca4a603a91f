"""Issue 17's leaderboard rules: never pool two sweeps or two configs, CI only from 3 seeds, the
significance marker, two sweeps side by side; plus LaTeX, integer CSV columns and 80-column tables."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_leaderboard_fixtures import make_row, write_fixture
from typer.testing import CliRunner

from dmlbench.cli import app, console
from dmlbench.errors import ConfigError
from dmlbench.results import fields, schema
from dmlbench.results import leaderboard as lb

runner = CliRunner()


def final_rows(sweep: str, method: str, values: list[float], **kw: Any) -> list[dict[str, Any]]:
    """One complete final row per value (seed = position), MAP@R = value."""
    return [
        make_row(f"{sweep}-{method}-final-s{i}-{kw.get('fold', '')}", sweep_id=sweep, method=method, seed=i,
                 map_at_r=v, split_hash=kw.get("split_hash", "h1"), **{k: x for k, x in kw.items() if k != "split_hash"})
        for i, v in enumerate(values)
    ]  # fmt: skip


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([schema.validate_row(r) for r in rows])


def test_two_sweeps_are_never_pooled() -> None:
    rows = frame(final_rows("swA", "ccp", [0.20, 0.22, 0.24]) + final_rows("swB", "ccp", [0.40, 0.42]))
    table = lb.final_table(rows, "cub200")
    assert sorted(zip(table[schema.SWEEP_ID], table[lb.N_SEEDS], strict=True)) == [("swA", 3), ("swB", 2)]
    a = table[table[schema.SWEEP_ID] == "swA"].iloc[0]
    assert a["map_at_r_mean"] == pytest.approx(0.22) and a[lb.RANK] == 1
    boards = lb.build(rows)
    assert sorted(k.sweep for k in boards.final) == ["swA", "swB"]
    assert all(len(t) == 1 and t.iloc[0][lb.RANK] == 1 for t in boards.final.values())
    only_b = lb.build(rows, sweeps="swB")
    assert [k.sweep for k in only_b.final] == ["swB"]
    with pytest.raises(ConfigError, match=r"no rows for sweep 'swC'.*sweeps with rows: swA, swB"):
        lb.build(rows, sweeps="swA,swC")


def test_two_configs_of_one_sweep_are_separate_lines_and_old_rows_get_a_digest() -> None:
    cfg_a = json.dumps({"method": "ccp", "lr": 1e-5, "seed": 0})
    cfg_b = json.dumps({"method": "ccp", "lr": 2e-5, "seed": 0})
    rows = final_rows("sw", "ccp", [0.2, 0.3], config_json=cfg_a)  # config_digest NULL: derived
    rows += final_rows("sw", "ccp", [0.5], config_json=cfg_b, config_digest=fields.config_digest(cfg_b))
    rows[-1][schema.ROW_ID] = "sw-ccp-other"
    table = lb.final_table(frame(rows), "cub200")
    assert len(table) == 2
    assert set(table[schema.CONFIG_DIGEST]) == {fields.config_digest(cfg_a), fields.config_digest(cfg_b)}
    assert sorted(table[lb.N_SEEDS]) == [1, 2]


def test_fold_models_of_one_seed_are_averaged_before_the_seed_statistics() -> None:
    rows = []
    for seed, (f0, f1) in enumerate([(0.2, 0.4), (0.3, 0.5), (0.4, 0.6)]):
        for fold, v in ((0, f0), (1, f1)):
            rows.append(make_row(f"sw-ccp-s{seed}-f{fold}", sweep_id="sw", seed=seed, fold=fold, map_at_r=v))
    line = lb.final_table(frame(rows), "cub200").iloc[0]
    assert line[lb.N_SEEDS] == 3 and line["map_at_r_mean"] == pytest.approx(0.4)
    mean, half, n = lb.mean_ci([0.3, 0.4, 0.5])  # the per-seed fold means
    assert n == 3 and line["map_at_r_ci95"] == pytest.approx(half)


def test_ci_only_from_three_seeds_and_every_output_says_which() -> None:
    rows = frame(
        final_rows("sw", "ccp", [0.26, 0.28, 0.27])
        + final_rows("sw", "diva", [0.24, 0.22])
        + final_rows("sw", "margin", [0.25])
    )
    table = lb.final_table(rows, "cub200").set_index(schema.METHOD)
    assert table.loc["ccp", lb.SPREAD] == "ci95" and not math.isnan(table.loc["ccp", "map_at_r_ci95"])
    assert table.loc["diva", lb.SPREAD] == "std" and math.isnan(table.loc["diva", "map_at_r_ci95"])
    assert table.loc["diva", "map_at_r_std"] == pytest.approx(math.sqrt(0.0002))
    assert table.loc["margin", lb.SPREAD] == "none"
    shown = lb.display_final(lb.final_table(rows, "cub200")).set_index("method")["MAP@R ▼"]
    assert shown["ccp"] == "27.00 ± 2.48" and shown["diva"] == "23.00 ± 1.41 sd" and shown["margin"] == "25.00 (n=1)"
    boards = lb.build(rows)
    assert lb.SPREAD_LEGEND in lb.to_markdown(boards) and "95% CI" in lb.SPREAD_LEGEND
    assert "sd" in lb.SPREAD_LEGEND and lb.to_latex(boards).count("95\\% CI") == 1
    assert lb.format_mean_spread([0.24, 0.22]) == "23.00 ± 1.41 (sd, n=2)"


def test_significance_marker_against_the_leader() -> None:
    rows = frame(
        final_rows("sw", "ccp", [0.30, 0.32, 0.31])  # leader, CI 31.0 ± 2.48
        + final_rows("sw", "diva", [0.29, 0.31, 0.30])  # CI overlaps the leader's
        + final_rows("sw", "margin", [0.10, 0.11, 0.12])  # far below
        + final_rows("sw", "triplet", [0.29, 0.30])  # 2 seeds: not tested
    )
    table = lb.final_table(rows, "cub200").set_index(schema.METHOD)
    assert table[lb.VS_LEADER].to_dict() == {
        "ccp": "leader", "diva": "overlaps", "margin": "below", "triplet": "untested",
    }  # fmt: skip
    marks = lb.display_final(lb.final_table(rows, "cub200")).set_index("method")["vs #1"].to_dict()
    assert marks == {"ccp": "", "diva": "≈", "margin": "<", "triplet": "?"}
    # a leader with fewer than 3 seeds cannot be tested against
    two = frame(final_rows("sw", "ccp", [0.5, 0.52]) + final_rows("sw", "diva", [0.30, 0.31, 0.32]))
    assert lb.final_table(two, "cub200").set_index(schema.METHOD)[lb.VS_LEADER]["diva"] == "untested"


def test_protocols_are_ranked_separately() -> None:
    rows = frame(final_rows("sw", "ccp", [0.3]) + final_rows("sw", "diva", [0.2], protocol="holdout"))
    boards = lb.build(rows)
    assert sorted(k.protocol for k in boards.final) == ["cv4-val-select", "holdout"]
    assert all(t.iloc[0][lb.RANK] == 1 for t in boards.final.values())


def test_compare_two_sweeps_side_by_side() -> None:
    rows = frame(
        final_rows("old", "ccp", [0.20, 0.21, 0.22])
        + final_rows("new", "ccp", [0.30, 0.31, 0.32])
        + final_rows("old", "diva", [0.25, 0.26, 0.27])
        + final_rows("new", "diva", [0.25, 0.27, 0.26], split_hash="h2")
        + final_rows("new", "margin", [0.1])
    )
    cmp = lb.compare(rows, "old", "new")
    t = cmp.tables["cub200"].set_index(schema.METHOD)
    assert t.loc["ccp", lb.DELTA] == pytest.approx(0.10) and t.loc["ccp", lb.CIS] == "differ"
    assert t.loc["diva", lb.CIS] == "overlaps" and t.loc["diva", lb.SAME_SPLIT] == "no"
    assert t.loc["ccp", lb.SAME_SPLIT] == "yes"
    assert pd.isna(t.loc["margin", "n_seeds_a"]) and t.loc["margin", "n_seeds_b"] == 1
    assert t.loc["margin", lb.CIS] == "untested"
    with pytest.raises(ConfigError, match="no rows for sweep 'nwe'.*did you mean new"):
        lb.compare(rows, "old", "nwe")
    with pytest.raises(ConfigError, match="two different sweeps"):
        lb.compare(rows, "old", "old")
    csv = pd.read_csv(io.StringIO(lb.compare_frame(cmp).to_csv(index=False)), dtype=str)
    assert set(csv["n_seeds_a"].dropna()) == {"3"} and set(csv["embedding_dim"]) == {"128"}


def test_cli_compare_and_sweep_filter(tmp_path: Path) -> None:
    write_fixture(tmp_path, final_rows("old", "ccp", [0.20, 0.21, 0.22]), sweep="old")
    write_fixture(tmp_path, final_rows("new", "ccp", [0.30, 0.31, 0.32], split_hash="h9"), sweep="new")
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--compare", "old", "new", "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    (line,) = data["tables"]["cub200"]
    assert line["delta"] == pytest.approx(0.10) and line["n_seeds_a"] == 3 and line["same_split"] == "no"
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--compare", "old", "new"])
    assert res.exit_code == 0 and "A = old vs B = new" in res.stdout and "different class splits" in res.stderr
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--sweep", "new", "--format", "json"])
    assert {r["sweep_id"] for r in json.loads(res.stdout)["final"]["cub200"]} == {"new"}
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--sweep", "nope"])
    assert res.exit_code == 2 and "sweeps with rows: new, old" in res.stderr


def test_latex_is_booktabs_with_escaping_and_bold_best(tmp_path: Path) -> None:
    write_fixture(tmp_path)
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--dataset", "cub200", "--format", "latex"])
    assert res.exit_code == 0, res.output
    tex = res.stdout
    assert tex.count(r"\begin{tabular}") == tex.count(r"\bottomrule") == 2  # final + search
    assert r"\toprule" in tex and r"\midrule" in tex and r"\hline" not in tex
    assert r"\textbf{27.00 $\pm$ 2.48}" in tex  # ccp leads MAP@R
    assert "23.00 $\\pm$ 1.41 sd" in tex and "R@1" in tex and "MAP@R $\\downarrow$" in tex
    body = tex.splitlines()[1:]  # after the leading comment line, every % sign is escaped
    assert body and not any(re.search(r"(?<!\\)%", line) for line in body)
    assert lb.latex_escape("a_b & 5%") == r"a\_b \& 5\%"


def test_integer_columns_stay_integers_in_csv_and_json(tmp_path: Path) -> None:
    write_fixture(tmp_path)
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "csv", "--with-paper"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.stdout), dtype=str)
    for col in (lb.RANK, lb.N_SEEDS, lb.N_TRIALS, schema.EMBEDDING_DIM, lb.N_COMPLETE, lb.N_FAILED):
        vals = df[col].dropna()
        assert len(vals) and all(v.isdigit() for v in vals), (col, sorted(set(vals))[:5])
    res = runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "json"])
    line = json.loads(res.stdout)["final"]["cub200"][0]
    assert isinstance(line["n_seeds"], int) and isinstance(line["embedding_dim"], int)


@pytest.mark.parametrize("args", [["--with-paper"], ["--phase", "search"], []])
def test_tables_fit_80_columns_and_wide_shows_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    write_fixture(tmp_path)
    monkeypatch.setattr(console, "width", 80)
    res = runner.invoke(app, ["leaderboard", str(tmp_path), *args])
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.stdout.splitlines()) <= 80
    assert "hidden to fit 80 columns" in res.stdout and "--wide" in res.stdout
    wide = runner.invoke(app, ["leaderboard", str(tmp_path), *args, "--wide"])
    assert wide.exit_code == 0 and "hidden" not in wide.stdout
    assert max(len(line) for line in wide.stdout.splitlines()) > 80 and "cost" in wide.stdout
