"""End-to-end sweep through Ray Tune + Optuna with a fast fake train function (no engine needed).

The fake ``train`` reports a validation metric that is a known function of the sampled parameter,
so pruning, divergence and failure paths are deterministic. Ray runs locally with 2 CPUs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmlbench.config import TrialConfig
from dmlbench.errors import Diverged
from dmlbench.methods.base import METHODS, Method, MethodParams
from dmlbench.orchestrator import sweep
from dmlbench.orchestrator.spec import SweepSpec
from dmlbench.results import schema, store

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


class FakeParams(MethodParams):
    quality: float = 0.5
    mode: str = "ok"


class FakeMethod(Method):
    name = "fake_e2e"
    Params = FakeParams


def register_fake() -> None:
    from dmlbench.methods.base import METHODS as M

    if "fake_e2e" not in M:
        M.register("fake_e2e")(FakeMethod)
        M.register("fake_e2e_b")(FakeMethod)


def fake_train(cfg: TrialConfig, report: Any) -> Any:
    """val map_at_r = quality * epoch / epochs; mode=nan diverges, mode=boom fails."""
    import os

    q = float(cfg.params["quality"])
    hist = []
    for epoch in range(1, cfg.epochs + 1):
        if cfg.params["mode"] == "nan":
            raise Diverged(step=epoch, value=float("nan"))
        if cfg.params["mode"] == "boom":
            raise RuntimeError("boom: synthetic failure")
        m = {"map_at_r": q * epoch / cfg.epochs, "loss": 1.0 - q}
        ck = Path(cfg.output_dir or ".") / "checkpoints"
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text(str(epoch))
        hist.append(m)
        report(epoch, m, str(ck))
    return SimpleNamespace(
        metrics={**hist[-1], "precision_at_1": q},
        test_metrics={"map_at_r": q / 2} if cfg.phase == "final" else None,
        eval_split="test" if cfg.phase == "final" else "val",
        best_epoch=cfg.epochs,
        epochs_run=cfg.epochs,
        steps=cfg.epochs * 2,
        wall_time_s=0.01,
        history=hist,
        split_hash="abc",
        pretrained_id="none",
        pid=os.getpid(),
    )


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    register_fake()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": register_fake})  # fmt: skip
    yield
    ray.shutdown()
    METHODS._entries.pop("fake_e2e", None)
    METHODS._entries.pop("fake_e2e_b", None)


def write_space(tmp: Path, method: str, modes: list[str]) -> Path:
    p = tmp / f"{method}.yaml"
    p.write_text(
        f"method: {method}\nparams:\n"
        "  - {name: quality, type: float, low: 0.1, high: 0.9}\n"
        f"  - {{name: mode, type: categorical, choices: [{', '.join(modes)}]}}\n"
    )
    return p


@pytest.fixture
def spaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "spaces"
    d.mkdir()
    write_space(d, "fake_e2e", ["ok", "ok", "nan", "boom"])
    write_space(d, "fake_e2e_b", ["ok"])
    monkeypatch.setattr("dmlbench.search_spaces.loader.SPACES_DIR", d)
    return d


def make_spec(out: Path, **kw: Any) -> SweepSpec:
    base: dict[str, Any] = {
        "methods": ("fake_e2e", "fake_e2e_b"), "datasets": ("digits",), "backbones": ("tiny",), "trials": 4,
        "epochs": 2, "grace_period": 1, "final_seeds": 2, "folds": 3, "output": str(out),
        "trial_base": {"pretrained": False},
    }  # fmt: skip
    base.update(kw)
    return SweepSpec(**base)


def test_end_to_end_rows_statuses_final_and_resume(ray_local: None, spaces: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    spec = make_spec(out)
    lines: list[str] = []
    outcomes = sweep.run(spec, train_fn=fake_train, echo=lines.append)
    assert len(outcomes) == 2
    df, warnings = store.read_rows(out)
    assert warnings == []
    # every row validates against the schema
    import pyarrow.parquet as pq

    for f in store.row_files(out):
        t = pq.read_table(f)
        assert t.schema.equals(schema.SCHEMA)
        schema.to_table(t.to_pylist())
    search = df[df[schema.PHASE] == "search"]
    final = df[df[schema.PHASE] == "final"]
    assert len(search) == 8 and search[schema.ROW_ID].is_unique
    assert set(search[schema.STATUS]) <= set(schema.STATUSES)
    assert "complete" in set(search[schema.STATUS])
    # final: 2 seeds per cell with test metrics = quality / 2 of the best search trial
    assert len(final) == 4
    assert set(final[schema.EVAL_SPLIT]) == {"test"}
    assert sorted(final[schema.SEED].unique().tolist()) == [1000, 1001]
    # seed i holds out validation fold i (checkpoint selection never sees the test split)
    assert {(int(r[schema.SEED]), int(r[schema.FOLD])) for _, r in final.iterrows()} == {(1000, 0), (1001, 1)}
    for _, r in final.iterrows():
        assert json.loads(r[schema.CONFIG_JSON])["fold"] == r[schema.FOLD]
    for o in outcomes:
        rows = [r for r in o.rows.values() if r[schema.PHASE] == "final"]
        assert all(r[schema.MAP_AT_R] == pytest.approx(o.best_params["quality"] / 2) for r in rows)
    # diverged / failed rows carry their reason; pruned rows exist only when ASHA stopped one early
    bad = search[search[schema.STATUS].isin(["diverged", "failed"])]
    for _, r in bad.iterrows():
        assert ("diverged" in r[schema.ERROR]) or ("boom" in r[schema.ERROR])
    for _, r in search[search[schema.STATUS] == "pruned"].iterrows():
        assert r[schema.EPOCHS] < 2
    # every row, pruned / failed ones too, names the fold manifest it used
    assert df[schema.SPLIT_HASH].notna().all()
    assert (out / store.LEADERBOARD).exists()
    # dmlbench status: everything done, nothing running or pending, ETA 0
    from dmlbench.orchestrator.status import eta_seconds, format_status, sweep_status

    st = sweep_status(out)
    assert {(c.cell, c.phase): (c.done, c.running, c.pending) for c in st} == {
        (f"{m}/digits/tiny", ph): (n, 0, 0) for m in ("fake_e2e", "fake_e2e_b") for ph, n in (("search", 4), ("final", 2))
    }
    assert eta_seconds(st) == 0.0
    assert "12/12 trials done" in format_status(st)
    assert any("fake_e2e/digits/tiny" in x for x in lines)

    # rerun the same command: nothing reruns, no duplicate rows, same row ids
    before = {p.name: p.stat().st_mtime_ns for p in (out / spec.sweep_id / "rows").iterdir()}
    sweep.run(spec, train_fn=fake_train, echo=lines.append)
    df2, _ = store.read_rows(out)
    assert sorted(df2[schema.ROW_ID]) == sorted(df[schema.ROW_ID])
    after = {p.name for p in (out / spec.sweep_id / "rows").iterdir()}
    assert after == set(before)
    # trial ids identical: the restored experiments did not start new trials
    assert sorted(df2[schema.TRIAL_ID]) == sorted(df[schema.TRIAL_ID])
