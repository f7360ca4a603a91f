"""``dmlbench report``: every section renders with the plots it should have (and only those), axes
that make sense, tables that wrap, and every image loads in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_leaderboard_fixtures import SEARCH_TRIALS, fixture_rows, make_row, write_fixture
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.results import report, schema

runner = CliRunner()


def sections_of(page: str) -> dict[str, str]:
    return dict(re.findall(r"<section id='([^']+)'>(.*?)</section>", page, flags=re.DOTALL))


def images(body: str) -> int:
    return len(re.findall(r"<img [^>]*src='data:image/png;base64,[A-Za-z0-9+/=]{100,}'", body))


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([schema.validate_row(r) for r in rows])


@pytest.fixture()
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every matplotlib figure the report renders, with its axes' ticks and limits read before closing."""
    seen: list[dict[str, Any]] = []
    original = report._png

    def spy(fig: Any) -> bytes:
        ax = fig.axes[0]
        fig.canvas.draw()
        seen.append(
            {
                "title": ax.get_title(),
                "xlabel": ax.get_xlabel(),
                "xticks": [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]],
                "xlim": ax.get_xlim(),
                "ylim": ax.get_ylim(),
            }
        )
        return original(fig)

    monkeypatch.setattr(report, "_png", spy)
    return seen


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
    imgs = {k: images(v) for k, v in secs.items()}
    # search rows: cub200 (3 cells, sw1); final tables: cub200 and sop (sw1); no cell has 10 trials
    assert imgs == {
        "leaderboards": 0,
        "search-progress": 1,
        "learning-curves": len(SEARCH_TRIALS),
        "importance": 0,
        "seed-spread": 2,
        "cost": 2,
    }
    assert secs["leaderboards"].count("<table>") == 3
    # our single-model lines get the papers' fold-mean lines beside them, never their concatenations
    assert "C2-CCP-L [paper; mlrc-cv4-val-select-foldmean]" in secs["leaderboards"]
    assert "mlrc-cv4-val-select-concat4" not in secs["leaderboards"]
    assert "95% CI over seeds" in secs["leaderboards"]  # the legend says what ± means
    n_ccp = sum(1 for t in SEARCH_TRIALS["ccp"] if t[0] == "complete")
    assert f"{n_ccp} complete trials; parameter importance needs at least 10" in secs["importance"]
    assert "http" not in page.replace("http://www.w3.org", "")  # self-contained: nothing fetched
    pngs = sorted(p.name for p in png.glob("*.png"))
    assert len(pngs) == sum(imgs.values()) and all((png / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)


def test_axes_integer_trials_and_epochs_sane_cost(figures: list[dict[str, Any]]) -> None:
    report.build_sections(frame(fixture_rows()))
    by_kind = {"trial": [], "epoch": [], "cost": []}
    for f in figures:
        for kind in by_kind:
            if f["xlabel"].startswith(kind) or (kind == "cost" and "hours" in f["xlabel"]):
                by_kind[kind].append(f)
    assert by_kind["trial"] and by_kind["epoch"] and by_kind["cost"]
    for f in by_kind["trial"] + by_kind["epoch"]:
        assert f["xticks"] and all(float(t).is_integer() for t in f["xticks"]), f
    for f in by_kind["cost"]:
        assert f["xlabel"].startswith("GPU-hours") and f["xlim"][0] == 0.0
        assert 0.0 <= f["ylim"][0] < f["ylim"][1] <= 100.0


def test_cpu_sweeps_plot_cpu_hours_and_unmeasured_cost_is_not_plotted(figures: list[dict[str, Any]]) -> None:
    cpu = [
        make_row(f"cpu-{m}-s{s}", sweep_id="cpu", method=m, seed=s, map_at_r=v, gpu_hours=0.0,
                 wall_time_s=120.0, gpu_type="cpu", gpu_count=0)
        for m, vals in (("ccp", (0.2, 0.3, 0.25)), ("diva", (0.1, 0.12))) for s, v in enumerate(vals)
    ]  # fmt: skip
    plots, notes = report.cost_plots(frame(cpu), schema.MAP_AT_R)
    assert len(plots) == 1 and not notes
    assert figures[-1]["xlabel"].startswith("CPU hours") and figures[-1]["xlim"][0] == 0.0
    assert 0.0 <= figures[-1]["ylim"][0] and figures[-1]["ylim"][1] <= 100.0
    unmeasured = [{**r, schema.WALL_TIME_S: None} for r in cpu]
    plots, notes = report.cost_plots(frame(unmeasured), schema.MAP_AT_R)
    assert plots == [] and len(notes) == 1 and "not measured" in notes[0]


def test_importance_needs_ten_complete_trials() -> None:
    rows = [
        make_row(f"sw-t{i}", phase="search", status="complete", trial_id=f"t{i}",
                 params_json=json.dumps({"a": i, "b": float(i % 3)}), map_at_r=i / 20)
        for i in range(report.MIN_TRIALS_FOR_IMPORTANCE)
    ]  # fmt: skip
    plots, notes = report.importance_plots(frame(rows), schema.MAP_AT_R)
    assert len(plots) == 1 and notes == []
    plots, notes = report.importance_plots(frame(rows[:-1]), schema.MAP_AT_R)
    assert plots == [] and "9 complete trials" in notes[0]


def test_learning_curves_need_history_and_say_so() -> None:
    rows = [{**r, schema.HISTORY_JSON: None} for r in fixture_rows()]
    plots, notes = report.learning_curve_plots(frame(rows), schema.MAP_AT_R)
    assert plots == [] and len(notes) == len(SEARCH_TRIALS) and "history_json" in notes[0]


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
    # metric depends on 'a' only; 'b' is noise-free irrelevant
    rows = [
        {schema.STATUS: "complete", schema.PARAMS_JSON: json.dumps({"a": a, "b": b}), schema.MAP_AT_R: a / 10}
        for a, b in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 2.0), (5, 3.0), (6, 5.5), (7, 0.5), (8, 2.5)]
    ]
    imp = report.param_importances(pd.DataFrame(rows), schema.MAP_AT_R)
    assert set(imp) == {"a", "b"} and imp["a"] > 0.9 and abs(sum(imp.values()) - 1.0) < 1e-9
    assert report.param_importances(pd.DataFrame(rows[:2]), schema.MAP_AT_R) == {}


# ---- in a real browser ------------------------------------------------------------------------
#: appended to the page for the check: results go into the DOM, which --dump-dom prints
_CHECK_JS = """
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth,
                                             alt: i.alt}));
  const tables = [...document.querySelectorAll('table')].map(t => ({scroll: t.scrollWidth,
      box: t.parentElement.clientWidth, page: document.documentElement.clientWidth}));
  const pre = document.createElement('pre'); pre.id = 'dmlbench-check';
  pre.textContent = JSON.stringify({imgs, tables, docScroll: document.documentElement.scrollWidth,
                                    docWidth: document.documentElement.clientWidth});
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(
    chromium() is None,
    reason="needs headless Chromium (Debian/Ubuntu: apt-get install chromium); .ci/run installs it",
)
def test_every_image_loads_and_tables_fit_1400px_in_chromium(tmp_path: Path) -> None:
    write_fixture(tmp_path / "res")
    out = tmp_path / "report.html"
    res = runner.invoke(app, ["report", str(tmp_path / "res"), "--out", str(out), "--with-paper"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    expected = images(page)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _CHECK_JS + "</body>"))
    cmd = [
        str(chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--hide-scrollbars", "--window-size=1400,900", "--virtual-time-budget=10000",
        f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r"<pre id=\"dmlbench-check\">(.*?)</pre>", proc.stdout, flags=re.DOTALL)
    assert found, f"the check script did not run: rc={proc.returncode} {proc.stderr[-2000:]}"
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(check["imgs"]) == expected > 0
    assert all(i["ok"] and i["w"] > 100 for i in check["imgs"]), [i for i in check["imgs"] if not i["ok"]]
    assert check["tables"] and all(t["scroll"] <= t["box"] for t in check["tables"]), check["tables"]
    assert check["docScroll"] <= check["docWidth"]  # nothing scrolls sideways at 1400 px
