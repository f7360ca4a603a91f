"""Two Ray nodes (``ray.cluster_utils.Cluster``, one CPU each): trials of one sweep run on both
nodes and write checkpoints and experiment state to the shared ``--storage``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmlbench.methods.base import Method, MethodParams

pytestmark = pytest.mark.slow


class NodeParams(MethodParams):
    quality: float = 0.5


class NodeMethod(Method):
    name = "fake_two_node"
    Params = NodeParams


def register() -> None:
    from dmlbench.methods.base import METHODS

    if "fake_two_node" not in METHODS:
        METHODS.register("fake_two_node")(NodeMethod)


def node_train(cfg: Any, report: Any) -> Any:
    import ray

    node = ray.get_runtime_context().get_node_id()
    with open(os.environ["NODE_LOG"], "a") as fh:
        fh.write(node + "\n")
    ck = Path(cfg.output_dir) / "checkpoints"
    for epoch in range(1, cfg.epochs + 1):
        time.sleep(3.0)
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text(f"{epoch} {node}")
        report(epoch, {"map_at_r": float(cfg.params["quality"])}, str(ck))
    q = float(cfg.params["quality"])
    return SimpleNamespace(metrics={"map_at_r": q}, eval_split="val", best_epoch=cfg.epochs, epochs_run=cfg.epochs,
                           steps=cfg.epochs, wall_time_s=1.0, split_hash="h", pretrained_id="none", test_metrics=None)  # fmt: skip


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    import ray
    import ray.cloudpickle as cp
    from ray.cluster_utils import Cluster

    cp.register_pickle_by_value(sys.modules[__name__])
    register()
    log = tmp_path / "nodes.log"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": register, "env_vars": {"NODE_LOG": str(log)}})  # fmt: skip
    try:
        yield cluster, log
    finally:
        ray.shutdown()
        cluster.shutdown()
        from dmlbench.methods.base import METHODS

        METHODS._entries.pop("fake_two_node", None)


def test_trials_run_on_both_nodes_and_write_shared_storage(two_nodes: tuple[Any, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from dmlbench.orchestrator import cluster as cl
    from dmlbench.orchestrator import sweep
    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.results import schema, store

    _, log = two_nodes
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "fake_two_node.yaml").write_text(
        "method: fake_two_node\nparams:\n  - {name: quality, type: float, low: 0.1, high: 0.9}\n"
    )
    monkeypatch.setattr("dmlbench.search_spaces.loader.SPACES_DIR", spaces)
    shared = tmp_path / "shared"
    spec = SweepSpec(methods=("fake_two_node",), datasets=("digits",), backbones=("tiny",), trials=4, epochs=2,
                     grace_period=2, final_seeds=0, folds=3, search_folds=1, output=str(tmp_path / "out"),
                     storage=str(shared), checkpoint_every_epochs=1)  # fmt: skip
    assert len(cl.node_capacity()) == 2
    sweep.run(spec, train_fn=node_train, echo=lambda s: None)
    nodes = set(log.read_text().split())
    assert len(nodes) == 2, f"trials ran on {len(nodes)} node(s)"
    df, _ = store.read_rows(tmp_path / "out")
    assert len(df) == 4 and set(df[schema.STATUS]) == {"complete"}
    tune_dir = Path(cl.storage_root(spec))
    assert tune_dir.is_relative_to(shared)
    ckpts = list(tune_dir.glob("*/*/checkpoint_*/last.pt"))
    assert {p.read_text().split()[1] for p in ckpts} == nodes
