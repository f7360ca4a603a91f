"""``dmlbench report``: every section renders, with a plot per dataset/method, embedded and as PNG."""

from __future__ import annotations

import re
from pathlib import Path

from test_leaderboard_fixtures import SEARCH_TRIALS, fixture_rows, write_fixture
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.results import report, schema

runner = CliRunner()


def sections_of(page: str) -> dict[str, str]:
    return dict(re.findall(r"<section id='([^']+)'>(.*?)</section>", page, flags=re.DOTALL))


def test_report_renders_every_section_with_its_plots(tmp_path: Path) -> None:
    write_fixture(tmp_path / "res")
    out, png = tmp_path / "r" / "report.html", tmp_path / "png"
    res = runner.invoke(
        app, ["report", str(tmp_path / "res"), "--out", str(out), "--png", str(png), "--with-paper"]
    )
    assert res.exit_code == 0, res.output
    page = out.read_text()
    secs = sections_of(page)
    assert list(secs) == list(report.SECTION_IDS)
    imgs = {
        k: len(re.findall(r"<img [^>]*src='data:image/png;base64,[A-Za-z0-9+/=]{100,}'", v))
        for k, v in secs.items()
    }
    # datasets with search rows: cub200; with final rows: cub200, sop; methods searched: 3
    assert imgs == {
        "leaderboards": 0,
        "search-progress": 1,
        "importance": len(SEARCH_TRIALS),
        "seed-spread": 2,
        "cost": 2,
    }
    assert secs["leaderboards"].count("<table>") == 3 and "C2-CCP-L [paper; mlrc-cv4-val-select-concat4]" in secs["leaderboards"]
    assert "http" not in page.replace("http://www.w3.org", "")  # self-contained: nothing fetched
    pngs = sorted(p.name for p in png.glob("*.png"))
    assert len(pngs) == sum(imgs.values()) and all((png / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)


def test_sections_never_empty_without_final_rows(tmp_path: Path) -> None:
    write_fixture(tmp_path / "res", [r for r in fixture_rows() if r[schema.PHASE] == "search"])
    out = tmp_path / "report.html"
    res = runner.invoke(app, ["report", str(tmp_path / "res"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    secs = sections_of(out.read_text())
    assert "No final-phase rows yet" in secs["seed-spread"] and "No final-phase rows yet" in secs["cost"]
    assert all(re.search(r"<img |<table>|class='note'", body) for body in secs.values())


def test_report_bad_input(tmp_path: Path) -> None:
    res = runner.invoke(app, ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    write_fixture(tmp_path / "res")
    res = runner.invoke(app, ["report", str(tmp_path / "res"), "--sort", "recal_at_1"])
    assert res.exit_code == 2 and "did you mean recall_at_1" in res.stderr


def test_param_importance_recovers_the_parameter_that_matters() -> None:
    import json

    import pandas as pd

    # metric depends on 'a' only; 'b' is noise-free irrelevant
    rows = [
        {schema.STATUS: "complete", schema.PARAMS_JSON: json.dumps({"a": a, "b": b}), schema.MAP_AT_R: a / 10}
        for a, b in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 2.0), (5, 3.0), (6, 5.5), (7, 0.5), (8, 2.5)]
    ]
    imp = report.param_importances(pd.DataFrame(rows), schema.MAP_AT_R)
    assert set(imp) == {"a", "b"} and imp["a"] > 0.9 and abs(sum(imp.values()) - 1.0) < 1e-9
    assert report.param_importances(pd.DataFrame(rows[:2]), schema.MAP_AT_R) == {}
