"""End to end: ``dmlbench train --method ccp --dataset digits`` changes stage, learns, and resumes exactly.

Tiny backbone on CPU, 10-step rounds, stage patience 1 so stages end within a few rounds. The
uninterrupted CLI run is the reference for the resume test (the same config stopped after round 3,
then run again: it must resume at round 4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.config import TrialConfig
from dmlbench.engine import train
from tests.fixtures.resume import Interrupt, count_loss_calls, stop_after

SETTINGS = [
    "stage_patience=1",
    "proxies_per_class=2",
    "pool_size=3",
    "iters_per_epoch=10",
    "lam=1e-2",
    "progress=false",
]
EPOCHS = 6


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ccp") / "full"
    args = [
        "train",
        "--method",
        "ccp",
        "--dataset",
        "digits",
        "--epochs",
        str(EPOCHS),
        "--output",
        str(out),
        "--format",
        "json",
    ]
    for s in SETTINGS:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    (out / "stdout.json").write_text(res.stdout.strip().splitlines()[-1])
    return out


def _history(out: Path) -> list[dict[str, float]]:
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    return list(ckpt["trainer"]["history"])


def test_cli_run_changes_stage_and_beats_untrained(cli_run: Path) -> None:
    payload = json.loads((cli_run / "stdout.json").read_text())
    cfg = TrialConfig.from_yaml((cli_run / "config.yaml").read_text())
    assert cfg.backbone == "tiny" and cfg.grad_clip_norm == 10.0 and cfg.grad_clip_value == 10.0
    assert payload["steps"] == EPOCHS * 10
    untrained, trained = payload["untrained"]["map_at_r"], payload["metrics"]["map_at_r"]
    assert trained > untrained + 0.05, (untrained, trained)
    hist = [h for h in _history(cli_run) if h["epoch"] >= 1]
    projections = [h["epoch"] for h in hist if h["ccp/projected"] == 1.0]
    assert projections, [h["map_at_r"] for h in hist]
    first = projections[0]
    # λ = 0 before the first projection, λ0 from it on
    assert all(h["ccp/lambda"] == 0.0 for h in hist if h["epoch"] < first)
    assert all(h["ccp/lambda"] == pytest.approx(1e-2) for h in hist if h["epoch"] >= first)
    assert hist[-1]["ccp/n_projections"] == len(projections)
    # the projection log is consistent with a stage controller replayed on the logged MAP@R
    from dmlbench.methods.ccp.functional import StageController

    sc = StageController(patience=1)
    assert [h["epoch"] for h in hist if sc.step(h["map_at_r"]).project] == projections


def test_checkpoint_resume_reproduces_controller_state(
    cli_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loss_calls = count_loss_calls(monkeypatch, "ccp")
    # the SAME config for both calls: the first is stopped after round 3, the second must resume
    cfg = TrialConfig.from_yaml((cli_run / "config.yaml").read_text()).replace(output_dir=str(tmp_path / "resumed"))
    first: list[int] = []
    with pytest.raises(Interrupt):  # stopped right after round 3's checkpoint
        train(cfg, report=stop_after(3, first))
    assert first == [0, 1, 2, 3] and len(loss_calls) == 3 * 10
    loss_calls.clear()
    again: list[int] = []
    train(cfg, report=lambda e, m, c: again.append(e))
    assert again == [4, 5, 6], "the second call did not resume from round 3's checkpoint"
    assert len(loss_calls) == (EPOCHS - 3) * 10
    full = torch.load(cli_run / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["extra"]["controller"] == full["extra"]["controller"]
    assert resumed["extra"]["lam"] == full["extra"]["lam"]
    keys = ["map_at_r", "ccp/lambda", "ccp/n_projections", "ccp/stage_epoch", "ccp/projected"]
    assert [[h.get(k) for k in keys] for h in resumed["trainer"]["history"]] == [
        [h.get(k) for k in keys] for h in full["trainer"]["history"]
    ]
    assert torch.equal(resumed["model"]["proxies"], full["model"]["proxies"])
    assert len(resumed["extra"].get("anchors", [])) == len(full["extra"].get("anchors", []))
    for a, b in zip(resumed["extra"].get("anchors", []), full["extra"].get("anchors", [])):
        assert torch.equal(a, b)
