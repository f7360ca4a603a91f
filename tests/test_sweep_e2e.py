"""End-to-end sweep through Ray Tune + Optuna with a fast fake train function (no engine needed).

The fake ``train`` reports a validation metric that is a known function of the sampled parameter.
In the search of cell ``fake_e2e`` it plants one outcome per trial, by the order the trials start
(whatever the sampler proposes): the 1st diverges (NaN), the 2nd raises, the 3rd ("leader") trains
normally and the 4th ("laggard") reports a worse epoch-1 score only after ASHA has recorded the
leader's, so ASHA prunes it. Every start is logged, so a rerun that starts a trial again is seen.
Ray runs locally with 2 CPUs.
"""

from __future__ import annotations

import json
import os
import sys
import time
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


#: what the n-th trial to start in the search of cell fake_e2e does
PLANTED = ("nan", "boom", "leader", "laggard")


def _claim(folder: Path, trial_id: str) -> int:
    """The start order of this trial in ``folder`` (0, 1, ...), claimed atomically across workers."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        try:
            fd = os.open(folder / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, trial_id.encode())
        os.close(fd)
        return i
    raise RuntimeError("more than 1000 trials")


def _wait_for(path: Path, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def _test_embedding(cfg: TrialConfig) -> Any:
    """A fold model's test embedding: the digits test images' labels one-hot plus seeded noise."""
    import torch

    from dmlbench.datasets import DATASETS

    table = DATASETS.get(cfg.dataset)().table()
    labels = torch.as_tensor(table.labels[table.split == "test"])
    g = torch.Generator().manual_seed(cfg.seed * 10 + (cfg.fold or 0))
    emb = torch.nn.functional.one_hot(labels, 10).float() + 0.5 * torch.randn(len(labels), 10, generator=g)
    return torch.nn.functional.normalize(emb, dim=1)


def fake_train(cfg: TrialConfig, report: Any) -> Any:
    """val map_at_r = quality * epoch / epochs; in fake_e2e's search the outcome is PLANTED."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    log = Path(os.environ["E2E_LOG"])
    with (log / "starts.log").open("a") as fh:
        fh.write(f"{trial_id} {cfg.method} {cfg.phase} fold{cfg.fold}\n")
    plan = "ok"
    if cfg.method == "fake_e2e" and cfg.phase == "search":
        plan = PLANTED[_claim(log / "plan", trial_id)]
    q = float(cfg.params["quality"])
    hist = []
    for epoch in range(1, cfg.epochs + 1):
        if plan == "nan":
            raise Diverged(step=epoch, value=float("nan"))
        if plan == "boom":
            raise RuntimeError("boom: synthetic failure")
        m = {"map_at_r": q * epoch / cfg.epochs, "loss": 1.0 - q}
        if plan == "laggard" and epoch == 1:
            # report below the leader only once ASHA holds the leader's epoch-1 score (a report
            # returns after the driver has processed it), so the rung's cutoff prunes this trial
            _wait_for(log / "leader-epoch-1")
            m["map_at_r"] = 0.0
        ck = Path(cfg.output_dir or ".") / "checkpoints"
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text(str(epoch))
        hist.append(m)
        report(epoch, m, str(ck))
        if plan == "leader" and epoch == 1:
            (log / "leader-epoch-1").touch()
    return SimpleNamespace(
        metrics={**hist[-1], "precision_at_1": q},
        test_metrics={"map_at_r": q / 2} if cfg.phase == "final" else None,
        test_embedding=_test_embedding(cfg) if cfg.phase == "final" else None,
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
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import ray.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    register_fake()
    log = tmp_path_factory.mktemp("e2e_log")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")),
             runtime_env={"worker_process_setup_hook": register_fake, "env_vars": {"E2E_LOG": str(log)}})  # fmt: skip
    yield log
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
    write_space(d, "fake_e2e", ["ok"])
    write_space(d, "fake_e2e_b", ["ok"])
    monkeypatch.setattr("dmlbench.search_spaces.loader.SPACES_DIR", d)
    return d


def make_spec(out: Path, **kw: Any) -> SweepSpec:
    base: dict[str, Any] = {
        "methods": ("fake_e2e", "fake_e2e_b"), "datasets": ("digits",), "backbones": ("tiny",), "trials": 4,
        "epochs": 2, "grace_period": 1, "final_seeds": 2, "folds": 3, "output": str(out),
        # one model per search trial (a hold-out): the planted outcomes are per train call
        "search_folds": 1,
        "trial_base": {"pretrained": False},
    }  # fmt: skip
    base.update(kw)
    return SweepSpec(**base)


def test_end_to_end_rows_statuses_final_and_resume(ray_local: Path, spaces: Path, tmp_path: Path) -> None:
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
    # each planted trial of fake_e2e ends with its exact status; fake_e2e_b's trials all train
    planted = {(ray_local / "plan" / str(i)).read_text(): PLANTED[i] for i in range(len(PLANTED))}
    expected = {"nan": "diverged", "boom": "failed", "leader": "complete", "laggard": "pruned"}
    cell_a = search[search[schema.METHOD] == "fake_e2e"]
    assert {r[schema.TRIAL_ID]: r[schema.STATUS] for _, r in cell_a.iterrows()} == {
        t: expected[p] for t, p in planted.items()
    }
    assert set(search[search[schema.METHOD] == "fake_e2e_b"][schema.STATUS]) <= {"complete", "pruned"}
    # final: per cell 2 seeds x (3 fold models + their concatenation); fold rows have test
    # metrics = quality / 2 of the best search trial, the search rows are labelled holdout
    assert set(search[schema.PROTOCOL]) == {"holdout"}
    folds_rows = final[final[schema.PROTOCOL] == "holdout"]
    concat = final[final[schema.PROTOCOL] == "holdout-concat3"]
    assert len(final) == 16 and len(folds_rows) == 12 and len(concat) == 4
    assert set(final[schema.EVAL_SPLIT]) == {"test"} and set(final[schema.STATUS]) == {"complete"}
    assert sorted(final[schema.SEED].unique().tolist()) == [1000, 1001]
    # every seed trains all 3 fold models, each selected on its own held-out fold (never on test)
    for m in ("fake_e2e", "fake_e2e_b"):
        mine = folds_rows[folds_rows[schema.METHOD] == m]
        assert {(int(r[schema.SEED]), int(r[schema.FOLD])) for _, r in mine.iterrows()} == {
            (s, f) for s in (1000, 1001) for f in range(3)
        }
    for _, r in folds_rows.iterrows():
        assert json.loads(r[schema.CONFIG_JSON])["fold"] == r[schema.FOLD]
    assert concat[schema.FOLD].isna().all() and set(concat[schema.EMBEDDING_DIM]) == {3 * 64}
    # the concatenated one-hot-like embeddings retrieve well (scored by the real evaluation)
    assert (concat[schema.PRECISION_AT_1] > 0.9).all()
    for o in outcomes:
        rows = [r for r in o.rows.values() if r[schema.PHASE] == "final" and r[schema.PROTOCOL] == "holdout"]
        assert all(r[schema.MAP_AT_R] == pytest.approx(o.best_params["quality"] / 2) for r in rows)
    # diverged / failed rows carry their reason; a pruned row stopped before the last epoch
    by_plan = {p: cell_a[cell_a[schema.TRIAL_ID] == t].iloc[0] for t, p in planted.items()}
    assert "diverged" in by_plan["nan"][schema.ERROR] and "boom: synthetic failure" in by_plan["boom"][schema.ERROR]
    assert by_plan["laggard"][schema.EPOCHS] == 1 and by_plan["leader"][schema.EPOCHS] == 2
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
    before = {p.name for p in (out / spec.sweep_id / "rows").iterdir()}
    starts = (ray_local / "starts.log").read_text().splitlines()
    # 8 search trials of one model each, 4 final trials of 3 fold models each
    assert len(starts) == 8 + 12 and len(set(starts)) == 20, "a model started twice in the first run"
    sweep.run(spec, train_fn=fake_train, echo=lines.append)
    assert (ray_local / "starts.log").read_text().splitlines() == starts, "the rerun started a trial again"
    df2, _ = store.read_rows(out)
    assert sorted(df2[schema.ROW_ID]) == sorted(df[schema.ROW_ID])
    assert {p.name for p in (out / spec.sweep_id / "rows").iterdir()} == before
    # trial ids identical: the restored experiments did not start new trials
    assert sorted(df2[schema.TRIAL_ID]) == sorted(df[schema.TRIAL_ID])
    assert df2.set_index(schema.ROW_ID)[schema.STATUS].to_dict() == df.set_index(schema.ROW_ID)[schema.STATUS].to_dict()
