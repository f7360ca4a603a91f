"""``dmlbench reproduce``: the stored TrialConfig is re-run as is (fresh output folder) and compared."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from test_leaderboard_fixtures import fixture_rows, make_row, write_fixture
from typer.testing import CliRunner

from dmlbench import engine
from dmlbench.cli import app
from dmlbench.config import TrialConfig
from dmlbench.errors import ConfigError
from dmlbench.results import leaderboard as lb
from dmlbench.results import schema

runner = CliRunner()


def tiny_cfg(method: str = "ccp", **kw: Any) -> TrialConfig:
    base = {
        "method": method,
        "dataset": "digits",
        "backbone": "tiny",
        "pretrained": False,
        "epochs": 1,
        "image_size": 32,
    }
    base.update(phase="final", fold=None, num_folds=3, output_dir="/somewhere/original", **kw)
    return TrialConfig.from_dict(base)


def repro_rows(cfg: TrialConfig) -> list[dict[str, Any]]:
    row = make_row(
        "sw1-ccp-digits-final-s0",
        dataset="digits",
        backbone="tiny",
        config_json=cfg.to_json(),
        map_at_r=0.40,
        recall_at_1=0.80,
        precision_at_1=0.80,
        epochs=1,
        best_epoch=1,
        steps=12,
        split_hash="abc",
    )
    return [*fixture_rows(), row]


def test_reproduce_reruns_the_stored_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg()
    write_fixture(tmp_path / "res", repro_rows(cfg))
    seen: list[TrialConfig] = []

    def fake_train(run_cfg: TrialConfig, report: Any = None) -> SimpleNamespace:
        seen.append(run_cfg)
        return SimpleNamespace(
            metrics={"map_at_r": 0.43, "recall_at_1": 0.78, "precision_at_1": 0.78, "loss": 1.0},
            eval_split="test",
            best_epoch=1,
            epochs_run=1,
            steps=12,
            split_hash="abc",
        )

    monkeypatch.setattr(engine, "train", fake_train, raising=False)
    out = tmp_path / "rerun"
    res = runner.invoke(
        app,
        ["reproduce", "sw1-ccp-digits-final-s0", str(tmp_path / "res"), "--output-dir", str(out)],
        terminal_width=200,
    )
    assert res.exit_code == 0, res.output
    assert len(seen) == 1
    # identical config except the output folder (no resume from the original run's checkpoints)
    assert seen[0].output_dir == str(out)
    assert seen[0].replace(output_dir=cfg.output_dir) == cfg
    # the config is printed first, then the comparison
    assert res.stdout.index("method: ccp") < res.stdout.index("stored vs re-run")
    line = next(ln for ln in res.stdout.splitlines() if "MAP@R" in ln)
    assert "0.4000" in line and "0.4300" in line and "+0.0300" in line
    line = next(ln for ln in res.stdout.splitlines() if "R@1" in ln)
    assert "-0.0200" in line


def test_reproduce_refuses_a_folder_with_a_checkpoint(tmp_path: Path) -> None:
    write_fixture(tmp_path / "res", repro_rows(tiny_cfg()))
    ck = tmp_path / "old" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "last.pt").write_bytes(b"x")
    res = runner.invoke(
        app,
        [
            "reproduce",
            "sw1-ccp-digits-final-s0",
            str(tmp_path / "res"),
            "--output-dir",
            str(tmp_path / "old"),
        ],
    )
    assert res.exit_code == 2 and "already holds a checkpoint" in res.stderr


def test_reproduce_unknown_id_suggests_close_ones(tmp_path: Path) -> None:
    write_fixture(tmp_path)
    res = runner.invoke(app, ["reproduce", "sw1-ccp-final-s7", str(tmp_path)])
    assert res.exit_code == 2
    assert "no row with id 'sw1-ccp-final-s7'" in res.stderr and "did you mean sw1-ccp-final-s" in res.stderr
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["reproduce", "sw1-ccp-final-s0", str(tmp_path)])  # fixture rows have no config
    assert res.exit_code == 2 and "no config_json" in res.stderr


def test_find_row_and_compare_metrics() -> None:
    rows = pd.DataFrame([schema.validate_row(r) for r in fixture_rows()])
    assert lb.find_row(rows, "sw1-diva-final-s0")[schema.METHOD] == "diva"
    with pytest.raises(ConfigError, match="did you mean"):
        lb.find_row(rows, "sw1-diva-final")
    stored = pd.Series({"map_at_r": 0.25, "recall_at_1": 0.5, "epochs": 4})
    cmp = lb.compare_metrics(stored, {"map_at_r": 0.2, "nmi": 0.7}, {"epochs": 5})
    got = {r.metric: (r.stored, r.new, r.diff) for r in cmp.itertuples(index=False)}
    assert got["map_at_r"][2] == pytest.approx(0.2 - 0.25)
    assert pd.isna(got["recall_at_1"][1]) and pd.isna(got["nmi"][0])
    assert got["epochs"] == (4.0, 5.0, 1.0)


def _engine_ready() -> bool:
    import importlib.util

    return hasattr(engine, "train") and importlib.util.find_spec("dmlbench.evaluation.metrics") is not None


@pytest.mark.skipif(
    not _engine_ready(), reason="dmlbench.engine.train or dmlbench.evaluation has not landed yet"
)
def test_reproduce_end_to_end_with_the_engine(tmp_path: Path) -> None:
    """Train a tiny run, store its row, reproduce it: deterministic CPU training gives the same MAP@R."""
    cfg = tiny_cfg(
        "proxyanchor",
        deterministic=True,
        max_steps=3,
        classes_per_batch=4,
        samples_per_class=2,
        progress=False,
    )
    cfg = cfg.replace(output_dir=str(tmp_path / "orig"))
    result = engine.train(cfg)
    row = make_row(
        "e2e-row",
        dataset="digits",
        backbone="tiny",
        config_json=cfg.to_json(),
        eval_split=result.eval_split,
        split_hash=result.split_hash,
        **{k: float(v) for k, v in result.metrics.items() if k in schema.METRIC_COLUMNS},
    )
    write_fixture(tmp_path / "res", [row])
    res = runner.invoke(app, ["reproduce", "e2e-row", str(tmp_path / "res")], terminal_width=200)
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stdout.splitlines() if "MAP@R" in ln)
    assert "+0.0000" in line or "-0.0000" in line


def test_reproduce_refuses_a_row_of_several_fold_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search row of a fold-model group (fold NULL, its config one fold) or a concatenated row is
    not one run: re-running its config would compare one model with a mean (issue 17)."""
    cfg = tiny_cfg().replace(fold=0)
    row = make_row("sw1-ccp-digits-final-s0-concat", dataset="digits", backbone="tiny", config_json=cfg.to_json(),
                   fold=None, protocol="mlrc-concat3", map_at_r=0.4)  # fmt: skip
    write_fixture(tmp_path / "res", [*fixture_rows(), row])
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("must not train"))
    res = runner.invoke(app, ["reproduce", "sw1-ccp-digits-final-s0-concat", str(tmp_path / "res")])
    assert res.exit_code != 0 and "several fold models" in res.output + (res.stderr or "")
