"""Fault 3 of issue 10: a node of a two-node local Ray cluster is removed mid-sweep; the trial that ran
there is rescheduled on the other node, resumes from its last checkpoint and finishes; no row is lost."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmlbench.methods.base import Method, MethodParams

pytestmark = pytest.mark.slow

EPOCHS = 3


class LossParams(MethodParams):
    quality: float = 0.5


class NodeLossMethod(Method):
    name = "fake_node_loss"
    Params = LossParams


def register() -> None:
    from dmlbench.methods.base import METHODS

    if "fake_node_loss" not in METHODS:
        METHODS.register("fake_node_loss")(NodeLossMethod)


def resuming_train(cfg: Any, report: Any) -> Any:
    """Sleeps per epoch; resumes after the epoch stored in ``last.pt`` (as the engine does); logs
    ``<node> <trial folder> <first epoch>`` when it starts."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    ck = Path(cfg.output_dir) / "checkpoints"
    start = int((ck / "last.pt").read_text().split()[0]) + 1 if (ck / "last.pt").exists() else 1
    with open(os.environ["NODE_LOG"], "a") as fh:
        fh.write(f"{node} {Path(cfg.output_dir).parent.name} {start}\n")
    for epoch in range(start, EPOCHS + 1):
        time.sleep(2.5)
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text(f"{epoch} {node}")
        report(epoch, {"map_at_r": float(cfg.params["quality"])}, str(ck))
    q = float(cfg.params["quality"])
    return SimpleNamespace(metrics={"map_at_r": q}, eval_split="val", best_epoch=EPOCHS, epochs_run=EPOCHS,
                           steps=EPOCHS, wall_time_s=1.0, split_hash="h", pretrained_id="none", test_metrics=None)  # fmt: skip


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Any, Any, Path]]:
    import ray
    import ray.cloudpickle as cp
    from ray.cluster_utils import Cluster

    cp.register_pickle_by_value(sys.modules[__name__])
    register()
    log = tmp_path / "nodes.log"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": register, "env_vars": {"NODE_LOG": str(log)}})  # fmt: skip
    try:
        yield c, worker, log
    finally:
        ray.shutdown()
        c.shutdown()
        from dmlbench.methods.base import METHODS

        METHODS._entries.pop("fake_node_loss", None)


def test_node_removed_mid_sweep_trial_rescheduled_and_resumed(
    cluster: tuple[Any, Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dmlbench.orchestrator import sweep
    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.results import schema, store

    c, worker, log = cluster
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "fake_node_loss.yaml").write_text(
        "method: fake_node_loss\nparams:\n  - {name: quality, type: float, low: 0.1, high: 0.9}\n"
    )
    monkeypatch.setattr("dmlbench.search_spaces.loader.SPACES_DIR", spaces)
    spec = SweepSpec(methods=("fake_node_loss",), datasets=("digits",), backbones=("tiny",), trials=2,
                     epochs=EPOCHS, grace_period=EPOCHS, final_seeds=0, folds=3, search_folds=1, max_failures=2,
                     output=str(tmp_path / "out"), storage=str(tmp_path / "shared"),
                     checkpoint_every_epochs=1)  # fmt: skip
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            sweep.run(spec, train_fn=resuming_train, echo=lambda s: None)
        except BaseException as err:
            errors.append(err)

    driver = threading.Thread(target=drive)
    driver.start()
    worker_id = worker.node_id
    # wait until a trial on the worker node has saved its first checkpoint, then remove the node
    victim: str | None = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        time.sleep(0.5)
        for line in log.read_text().splitlines() if log.exists() else []:
            node, trial_folder, _ = line.split()
            if node == worker_id:
                ckpts = list((tmp_path / "shared").rglob(f"{trial_folder}/checkpoint_*/last.pt"))
                if ckpts:
                    victim = trial_folder
    assert victim is not None, "no trial reached a checkpoint on the worker node"
    c.remove_node(worker)
    driver.join(timeout=240)
    assert not driver.is_alive() and not errors, errors

    starts = [line.split() for line in log.read_text().splitlines()]
    victim_runs = [(node, int(first)) for node, folder, first in starts if folder == victim]
    assert victim_runs[0] == (worker_id, 1)
    # rescheduled on the remaining node, resumed after its last checkpoint (not from epoch 1)
    assert len(victim_runs) >= 2 and victim_runs[-1][0] != worker_id and victim_runs[-1][1] > 1
    df, _ = store.read_rows(tmp_path / "out")
    assert len(df) == 2 and set(df[schema.STATUS]) == {"complete"} and df[schema.ROW_ID].is_unique
