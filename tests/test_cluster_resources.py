"""Resources per trial against a real local Ray (issue 18): on a cluster with GPUs (here logical
ones, ``num_gpus=2`` on a CPU machine) a trial gets one GPU by default, with the data-loader settings
of a GPU trial; a sweep on a benchmark dataset is refused before it starts on a GPU-less cluster."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmlbench.errors import ConfigError
from dmlbench.orchestrator import cluster, sweep
from dmlbench.orchestrator.spec import SweepSpec

pytestmark = pytest.mark.slow


def probe_train(cfg: Any, report: Any) -> Any:
    """Records what the trial was given (Ray's GPU ids, CUDA_VISIBLE_DEVICES, loader settings)."""
    import ray

    seen = {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "num_workers": cfg.num_workers, "torch_threads": cfg.torch_threads, "pin_memory": cfg.pin_memory}  # fmt: skip
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "probe.json").write_text(json.dumps(seen))
    report(1, {"map_at_r": 0.5}, None)
    return SimpleNamespace(metrics={"map_at_r": 0.5}, eval_split="val", best_epoch=1, epochs_run=1, steps=1,
                           wall_time_s=0.1, split_hash="h", pretrained_id="none", test_metrics=None)  # fmt: skip


@pytest.fixture
def local_ray(request: pytest.FixtureRequest) -> Iterator[None]:
    import ray
    import ray.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    temp = tempfile.mkdtemp(prefix="dmlb-", dir="/tmp")  # short: Ray's socket paths must fit
    ray.init(num_cpus=2, num_gpus=request.param, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("local_ray", [2], indirect=True, ids=["2-logical-gpus"])
def test_trials_get_one_gpu_by_default(local_ray: None, tmp_path: Path) -> None:
    spec = SweepSpec(methods=("proxyanchor",), datasets=("digits",), backbones=("tiny",), trials=2, epochs=1,
                     grace_period=1, final_seeds=0, folds=3, search_folds=1, output=str(tmp_path),
                     name="gpus")  # fmt: skip
    assert spec.gpus_per_trial is None  # nothing asked: the cluster decides
    lines: list[str] = []
    outcomes = sweep.run(spec, train_fn=probe_train, echo=lines.append)
    assert sum(len(o.rows) for o in outcomes) == 2
    assert any(ln.startswith("per trial: 1 CPU(s), 1 GPU(s)") and "cluster: 1 node(s), 2 CPUs, 2 GPUs" in ln
               for ln in lines), lines  # fmt: skip
    probes = [json.loads(p.read_text()) for p in (tmp_path / "gpus" / "tune").rglob("probe.json")]
    assert len(probes) == 2
    for seen in probes:
        assert len(seen["gpu_ids"]) == 1 and seen["cuda_visible"] == seen["gpu_ids"][0]
        # a GPU trial with one CPU: data loads in the trial process, batches go through pinned memory
        assert (seen["num_workers"], seen["torch_threads"], seen["pin_memory"]) == (0, 1, True)


@pytest.mark.parametrize("local_ray", [0], indirect=True, ids=["no-gpu"])
def test_benchmark_sweep_on_a_gpu_less_cluster_is_refused(local_ray: None, tmp_path: Path) -> None:
    from tests.fixtures.standins import build

    build(tmp_path / "data", scale=1.0, names=["cub200"])
    spec = SweepSpec(methods=("proxyanchor",), datasets=("cub200",), backbones=("tiny",), trials=1, epochs=1,
                     grace_period=1, final_seeds=0, output=str(tmp_path / "out"), name="cpu",
                     data_root=str(tmp_path / "data"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"cub200 would train on CPU \(the Ray cluster has no GPU .*--allow-cpu"):
        sweep.run(spec, echo=lambda s: None)
    assert not (tmp_path / "out" / "cpu" / "tune").exists()  # refused before any trial
    nodes = cluster.node_capacity()
    assert cluster.resolve_resources(spec.model_copy(update={"allow_cpu": True}), nodes).gpus_per_trial == 0
