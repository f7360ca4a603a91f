"""Rows carry what the trial read on its own worker, not the driver's machine facts.

A two-node ``ray.cluster_utils.Cluster``: the head (where the driver runs) has no CPU for trials,
so every trial runs on the second node, whose processes see ``GIT_DIR`` pointing at a throw-away
repository with a known commit. The rows' ``git_sha`` is that commit (the driver's own checkout
has another), and ``embedding_dim`` / ``image_size`` / ``bn_policy`` are each trial's resolved
values (the search space samples ``embedding_dim``, which the cell's defaults do not know).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmlbench.methods.base import Method, MethodParams

pytestmark = pytest.mark.slow


class ProvParams(MethodParams):
    quality: float = 0.5


class ProvMethod(Method):
    name = "fake_prov"
    Params = ProvParams


def register() -> None:
    from dmlbench.methods.base import METHODS

    if "fake_prov" not in METHODS:
        METHODS.register("fake_prov")(ProvMethod)


def prov_train(cfg: Any, report: Any) -> Any:
    report(1, {"map_at_r": float(cfg.params["quality"])}, None)
    return SimpleNamespace(metrics={"map_at_r": float(cfg.params["quality"])}, test_metrics=None, eval_split="val",
                           best_epoch=1, epochs_run=1, steps=1, wall_time_s=0.1, split_hash="h",
                           pretrained_id="none")  # fmt: skip


def _fake_repo(root: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (root / "f.txt").write_text("worker checkout\n")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "worker")
    return git("rev-parse", "HEAD")


def test_rows_carry_the_workers_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import ray.cloudpickle as cp
    from ray.cluster_utils import Cluster

    from dmlbench.orchestrator import sweep
    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.results import provenance, schema, store

    repo = tmp_path / "repo"
    repo.mkdir()
    worker_sha = _fake_repo(repo)
    assert worker_sha != provenance.git_sha()
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "fake_prov.yaml").write_text(
        "method: fake_prov\nparams:\n  - {name: quality, type: float, low: 0.1, high: 0.9}\n"
        "  - {name: embedding_dim, type: categorical, choices: [24, 40]}\n"
    )
    monkeypatch.setattr("dmlbench.search_spaces.loader.SPACES_DIR", spaces)
    cp.register_pickle_by_value(sys.modules[__name__])
    register()
    temp = tempfile.mkdtemp(prefix="rp", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp,
                                                            "include_dashboard": False})  # fmt: skip
    try:
        cluster.add_node(num_cpus=2, env_vars={"GIT_DIR": str(repo / ".git")})
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"worker_process_setup_hook": register})
        spec = SweepSpec(methods=("fake_prov",), datasets=("digits",), backbones=("tiny",), trials=3, epochs=1,
                         grace_period=1, final_seeds=0, folds=3, search_folds=1, output=str(tmp_path / "out"), name="prov",
                         trial_base={"pretrained": False, "image_size": 20, "bn_policy": "frozen_all"})  # fmt: skip
        sweep.run(spec, train_fn=prov_train, echo=lambda s: None)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    df, warnings = store.read_rows(tmp_path / "out")
    assert warnings == [] and len(df) == 3
    assert set(df[schema.GIT_SHA]) == {worker_sha}, "the rows carry the driver's checkout, not the worker's"
    assert df[schema.PACKAGE_VERSIONS_JSON].map(lambda s: json.loads(s)["ray"]).nunique() == 1
    assert set(df[schema.GPU_TYPE]) == {"cpu"} and set(df[schema.GPU_COUNT]) == {0}
    for _, r in df.iterrows():
        resolved = json.loads(r[schema.CONFIG_JSON])
        assert r[schema.EMBEDDING_DIM] == resolved["embedding_dim"] == json.loads(r[schema.PARAMS_JSON])["embedding_dim"]
        assert r[schema.IMAGE_SIZE] == 20 and r[schema.BN_POLICY] == "frozen_all"
