"""``--reproducible`` (issue 17): the same sweep command and seed give the same rows (parameters,
statuses, metrics) on the same hardware: one search trial at a time per cell, so ASHA decides in
trial order and TPE sees every earlier trial. Runs the sweep twice through Ray Tune with the real
engine on digits (tiny backbone, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmlbench.orchestrator import planning
from dmlbench.orchestrator.spec import SweepSpec
from dmlbench.results import schema, store
from tests.test_folds import run_on_local_ray

pytestmark = pytest.mark.slow

BASE = {"image_size": 16, "embedding_dim": 16, "iters_per_epoch": 2, "classes_per_batch": 3,
        "samples_per_class": 4, "device": "cpu", "progress": False, "val_clustering": False,
        "eval_batch_size": 256}  # fmt: skip


def run_once(out: Path) -> list[tuple[str, str, str, float | None]]:
    spec = SweepSpec(methods=("proxyanchor",), datasets=("digits",), trials=4, epochs=3, grace_period=1,
                     final_seeds=1, folds=3, search_folds=1, reproducible=True, seed=5, output=str(out),
                     trial_base=BASE)  # fmt: skip
    assert planning.search_concurrency(spec) == 1
    run_on_local_ray(spec)
    df, _ = store.read_rows(out)
    df = df.sort_values(schema.CREATED_AT, kind="stable")
    out_rows = []
    for _, r in df.iterrows():
        cfg = json.loads(r[schema.CONFIG_JSON])
        assert cfg["deterministic"] is True
        value = None if r[schema.MAP_AT_R] != r[schema.MAP_AT_R] else round(float(r[schema.MAP_AT_R]), 6)
        out_rows.append((r[schema.PHASE], r[schema.PARAMS_JSON], r[schema.STATUS], value))
    return sorted(out_rows, key=lambda t: (t[0], t[1], t[2]))


def test_reproducible_sweep_gives_the_same_rows(tmp_path: Path) -> None:
    first = run_once(tmp_path / "a")
    second = run_once(tmp_path / "b")
    assert len(first) == 4 + 3 + 1  # 4 search trials, 3 fold models + their concatenation
    assert first == second
