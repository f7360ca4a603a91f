"""Preflight (issue 19): each test breaks one thing on a small stand-in tree and checks that the
preflight reports it as its cell's one sentence; the OK path checks what it measures and that a
sweep's trial reuses the image cache it built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.datasets import cache as cache_mod
from dmlbench.engine import trainer as trainer_mod
from dmlbench.orchestrator import preflight as pf
from dmlbench.orchestrator.planning import build_spec
from dmlbench.orchestrator.spec import SweepSpec
from tests.fixtures.benchmark_trees import make_cub
from tests.fixtures.standins import build

runner = CliRunner()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own decoded-image cache (and BN-Inception weights folder)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DMLBENCH_CACHE", str(folder))
    monkeypatch.delenv("DMLBENCH_DATA", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return folder


def cub_root(tmp_path: Path, per_class: int = 8) -> Path:
    root = tmp_path / "data"
    make_cub(root, n_classes=16, per_class=per_class)
    return root


def spec_for(root: Path, tmp_path: Path, methods: str = "ccp", datasets: str = "cub200", **extra: object) -> SweepSpec:
    return build_spec(methods=methods, datasets=datasets, preset="smoke", data_root=root, subset=True, allow_cpu=True,
                      output=tmp_path / "results", **extra)  # fmt: skip


def only(spec: SweepSpec, **kw: object) -> pf.CellReport:
    result = pf.run_checked(spec, steps=2, echo=lambda s: None, **kw)  # type: ignore[arg-type]
    assert len(result.reports) == 1
    return result.reports[0]


def test_ok_cell_measures_everything_and_the_trial_reuses_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = cub_root(tmp_path)
    spec = spec_for(root, tmp_path)
    rep = only(spec)
    assert rep.ok, rep.problem
    assert rep.step_s is not None and rep.step_s > 0
    assert set(rep.eval_detail) == {"val", "test"} and all(v > 0 for v in rep.eval_detail.values())
    assert rep.checkpoint_bytes and rep.checkpoint_bytes > 10_000
    assert rep.cache_bytes and rep.cache_bytes > 0
    assert rep.host_peak and rep.host_peak > 0
    assert rep.cost_hours is not None and rep.cost_hours > 0 and rep.cost_unit == "CPU-h"
    # no rows, nothing at all under the sweep's output
    out = tmp_path / "results"
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    # a trial of the sweep finds the cache the preflight built: nothing is decoded again
    built: list[bool] = []
    real = cache_mod.ensure_cache

    def spy(*a: object, **k: object) -> tuple[Path, bool]:
        folder, b = real(*a, **k)  # type: ignore[arg-type]
        built.append(b)
        return folder, b

    monkeypatch.setattr(cache_mod, "ensure_cache", spy)
    cfg, final = pf.trial_configs(spec, spec.cells()[0], tmp_path / "work")
    assert cfg is not None
    trainer_mod.prepare_data(cfg)
    assert built == [False]
    rows = pf.table_rows([rep])
    assert rows[0][1] == "OK" and rows[-1][1] == "1 OK, 0 failed" and rows[-1][-1].endswith("CPU-h")


def test_small_classes_are_filled_and_counted(tmp_path: Path) -> None:
    """SOP-shaped classes of 2-12 images with 4 samples per class: the sampler fills the small
    ones (issue 17) and the preflight says how many."""
    build(tmp_path / "data", scale=0.01, names=["sop"])
    rep = only(spec_for(tmp_path / "data", tmp_path, datasets="sop"))
    assert rep.ok, rep.problem
    assert any("training classes have fewer than samples_per_class=4" in n for n in rep.notes), rep.notes


def test_diva_queue_larger_than_the_training_fold(tmp_path: Path) -> None:
    rep = only(spec_for(cub_root(tmp_path), tmp_path, methods="diva"))
    assert not rep.ok
    assert rep.problem is not None and rep.problem.startswith("diva's queue of 480 keys")
    assert "lower n_key_batches" in rep.problem


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_image(tmp_path: Path, damage: str) -> None:
    root = cub_root(tmp_path)
    img = sorted((root / "CUB_200_2011" / "images").rglob("*.jpg"))[5]
    if damage == "missing":
        img.unlink()
    else:
        img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    rep = only(spec_for(root, tmp_path))
    assert not rep.ok and rep.problem is not None
    assert img.name in rep.problem and damage in rep.problem


def test_evaluation_that_would_not_fit_in_memory(tmp_path: Path) -> None:
    rep = only(spec_for(cub_root(tmp_path), tmp_path), limits=pf.Limits(host_available=lambda: 200_000))
    assert not rep.ok and rep.problem is not None
    assert rep.problem.startswith("evaluating the ") and "is available on the host; lower eval_chunk" in rep.problem
    assert rep.step_s is not None  # the steps ran; the evaluation was refused before it started


def test_eval_memory_estimate_grows_with_the_split_and_the_chunk() -> None:
    small = pf.eval_memory_bytes(1000, 1000, [128], 100, 4096, 100, [128])
    assert pf.eval_memory_bytes(60_000, 60_000, [128], 1000, 4096, 11_000, [128]) > 50 * small
    assert pf.eval_memory_bytes(60_000, 60_000, [128], 10, 8192, 100, []) > pf.eval_memory_bytes(
        60_000, 60_000, [128], 10, 1024, 100, [])
    # the [chunk, gallery] float32 block alone
    assert pf.eval_memory_bytes(60_000, 60_000, [128], 10, 4096, 100, []) >= 4096 * 60_000 * 4


def test_cache_that_would_not_fit_the_disk(tmp_path: Path, _private_cache: Path) -> None:
    rep = only(spec_for(cub_root(tmp_path), tmp_path), limits=pf.Limits(disk_free=lambda p: 1000))
    assert not rep.ok and rep.problem is not None
    assert "decoded-image cache of cub200 at 32 px needs about" in rep.problem and "$DMLBENCH_CACHE" in rep.problem
    assert not list(_private_cache.glob("cub200-*/meta.json"))  # nothing was built


def test_missing_pretrained_weights(tmp_path: Path) -> None:
    spec = spec_for(cub_root(tmp_path), tmp_path, backbones="bninception")
    spec = spec.model_copy(update={"trial_base": {**spec.trial_base, "pretrained": True}})
    rep = only(spec)
    assert not rep.ok and rep.problem is not None
    assert rep.problem.startswith("BN-Inception weights not found at ")
    assert "pretrained=false for random init" in rep.problem


def test_step_out_of_memory_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(self: object, batches: object) -> dict[str, float]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer_mod.Trainer, "run_steps", oom)
    rep = only(spec_for(cub_root(tmp_path), tmp_path))
    assert rep.problem == (
        "ccp/cub200/tiny ran out of device memory while training a search trial; lower classes_per_batch, "
        "samples_per_class or image_size, or give each trial more memory (a whole GPU: --gpus-per-trial 1)."
    )


def test_unusable_dataset_fails_its_cells_only(tmp_path: Path) -> None:
    root = cub_root(tmp_path)
    spec = build_spec(methods="ccp", datasets="cub200,cars196", preset="smoke", data_root=root, subset=True,
                      allow_cpu=True, output=tmp_path / "results")  # fmt: skip
    result = pf.run_checked(spec, steps=1, echo=lambda s: None)
    by = {r.cell.dataset: r for r in result.reports}
    assert by["cub200"].ok, by["cub200"].problem
    assert not by["cars196"].ok and "cars196 is missing" in str(by["cars196"].problem)


def test_cli_preflight_and_sweep_flag(tmp_path: Path) -> None:
    root = cub_root(tmp_path)
    common = ["--methods", "ccp", "--datasets", "cub200", "--preset", "smoke", "--data-root", str(root), "--subset",
              "--allow-cpu", "--output", str(tmp_path / "results"), "--preflight-steps", "1", "--wide"]  # fmt: skip
    res = runner.invoke(app, ["preflight", *common])
    assert res.exit_code == 0, res.output
    assert "ccp/cub200/tiny" in res.output and "1 OK, 0 failed" in res.output and "CPU-h" in res.output
    res = runner.invoke(app, ["sweep", *common, "--preflight", "--methods", "diva"])
    assert res.exit_code == 1, res.output
    assert "diva's queue" in res.output and "cannot run (diva/cub200/tiny)" in res.output
    res = runner.invoke(app, ["preflight", *common, "--dry-run"])
    assert res.exit_code == 2 and "the preflight runs no sweep" in res.output
    # without --allow-cpu the sweep would refuse to train a benchmark on CPU, and so does its preflight
    res = runner.invoke(app, ["preflight", *[a for a in common if a != "--allow-cpu"]])
    assert res.exit_code == 2 and "--allow-cpu" in res.output


def test_cli_help() -> None:
    res = runner.invoke(app, ["preflight", "--help"])
    assert res.exit_code == 0 and "--preflight-steps" in res.output


@pytest.mark.slow
def test_scaled_rehearsal(tmp_path: Path) -> None:
    """bench/rehearsal.py on stand-ins at 3 % (same layouts and class-size distributions): 9 of
    the 12 cells pass; DiVA on CUB200, CARS196 and In-Shop is refused, rightly, because the queue of
    its first sampled point (30 x 16 = 480 keys on CUB/CARS, 70 x 16 on In-Shop; the planner bounds
    n_key_batches by the nominal full-size fold, not by a --subset) is larger than a fold model's
    training images at this scale (about 300, 415 and 530)."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "bench" / "rehearsal.py"), "--standins", str(tmp_path / "standins"), "--scale",
           "0.03", "--workers", "2", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=560,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "COLUMNS": "250"})  # fmt: skip
    out = res.stdout
    assert res.returncode == 1, out[-4000:] + res.stderr[-4000:]
    assert out.count("\n  OK: step ") == 9  # each cell's progress line (the table may wrap its cells)
    assert ("3 of 12 cell(s) cannot run (diva/cub200/tiny, diva/cars196/tiny, diva/inshop/tiny)"
            in res.stdout + res.stderr)
    for method in ("nivmf", "ccp", "diva"):
        for ds in ("cub200", "cars196", "sop", "inshop"):
            assert f"{method}/{ds}/tiny" in out
    assert out.count("\n  FAILED: diva's queue of 480 keys") == 2
