"""The full-size stand-in generator (tests/fixtures/standins.py): real counts at scale 1, and a
scaled-down set that loads through the real dataset classes and passes ``datasets check``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.datasets import DATASETS
from dmlbench.datasets.checks import BENCHMARKS, image_problems
from dmlbench.errors import DatasetError
from tests.fixtures.standins import SOP_SUPER, build, class_sizes, plan_all


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMLBENCH_DATA", raising=False)


def sizes_of(labels: np.ndarray | list[int]) -> list[int]:
    """Sorted class sizes (the class-size distribution)."""
    return sorted(np.unique(np.asarray(labels), return_counts=True)[1].tolist())


def test_class_sizes_sum_range_and_ends() -> None:
    rng = np.random.default_rng(3)
    s = class_sizes(500, 2700, 2, 12, rng)
    assert (len(s), int(s.sum()), int(s.min()), int(s.max())) == (500, 2700, 2, 12)
    s = class_sizes(8, 469, 41, 60, rng)  # ends impossible with this mean: only the range holds
    assert int(s.sum()) == 469 and 41 <= s.min() and s.max() <= 60
    with pytest.raises(ValueError, match="cannot split 100 images into 8 classes of 41..60"):
        class_sizes(8, 100, 41, 60, rng)
    a, b = class_sizes(50, 300, 2, 12, np.random.default_rng(1)), class_sizes(50, 300, 2, 12, np.random.default_rng(1))
    assert a.tolist() == b.tolist()


def test_full_size_plan_has_the_real_counts() -> None:
    """At scale 1 every count the loaders assert (``FULL``) is met, and the class-size facts hold."""
    plans = plan_all(1.0)
    for name in BENCHMARKS:
        counts = plans[name].counts()
        full = DATASETS.get(name).FULL
        assert {k: counts[k] for k in full} == full, name
    sop = plans["sop"]
    sop_sizes = sizes_of(sop.labels)
    assert (sop_sizes[0], sop_sizes[-1]) == (2, 12)
    assert len({p.split("_final/")[0] for p in sop.rel_paths}) == len(SOP_SUPER) == 12
    inshop = plans["inshop"]
    status = np.asarray(inshop.status)
    labels = np.asarray(inshop.labels)
    train_sizes = sizes_of(labels[status == "train"])
    assert train_sizes.count(1) >= 40  # at least 1 % of the 3,997 training items
    test_items = np.unique(labels[status != "train"])
    assert set(labels[status == "query"]) == set(test_items) == set(labels[status == "gallery"])
    assert sorted(np.unique(labels).tolist()) == list(range(1, 7983))  # ids 1..7,982 as in the real list


def test_scaled_standins_load_and_check(tmp_path: Path) -> None:
    manifest = build(tmp_path, scale=0.01, seed=0, workers=1)
    plans = plan_all(0.01, seed=0)
    for name in BENCHMARKS:
        src = DATASETS.get(name)(str(tmp_path), expect_full=False)
        table = src.table()
        plan = plans[name]
        check = src.check()
        assert check.status == "found", check.message
        expected = dict(manifest["datasets"][name]["counts"])  # type: ignore[index]
        if name == "inshop":
            train = np.asarray(plan.status) == "train"
            expected["train_single_image_classes"] = sizes_of(np.asarray(plan.labels)[train]).count(1)
            assert expected["train_single_image_classes"] >= 1
        assert check.counts == expected
        assert sizes_of(table.labels) == sizes_of(plan.labels)  # the same class-size distribution
        assert table.paths is not None and all(Path(p).is_file() for p in table.paths[:: max(1, len(table) // 50)])
        img = table.load(0)
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8
        # the real full-size checks reject a scaled set, naming the count
        with pytest.raises(DatasetError, match="but the full"):
            DATASETS.get(name)(str(tmp_path)).table()
    by = {n: DATASETS.get(n)(str(tmp_path), expect_full=False) for n in BENCHMARKS}
    assert {n: s.locate()[1].key for n, s in by.items()} == {
        "cub200": "CUB_200_2011", "cars196": "car_ims", "sop": "Ebay", "inshop": "Eval"}  # fmt: skip
    assert by["cars196"].locate()[0].name == "cars196"  # the lower-case folder
    sop_sizes = sizes_of(by["sop"].table().labels)
    assert (sop_sizes[0], sop_sizes[-1]) == (2, 12)
    t = by["inshop"].table()
    assert 1 in sizes_of(t.labels[t.split == "train"])  # single-image items present
    assert image_problems("inshop", str(tmp_path), part="query") == []
    out = CliRunner().invoke(app, ["datasets", "check", "all", "--data-root", str(tmp_path), "--subset"])
    assert out.exit_code == 0, out.output
    assert out.output.count("found") == 4
    # built once: a second call with the same settings reuses the tree
    marker = tmp_path / "cars196" / "cars_annos.mat"
    before = marker.stat().st_mtime_ns
    assert build(tmp_path, scale=0.01, seed=0, workers=1) == manifest
    assert marker.stat().st_mtime_ns == before


@pytest.mark.slow
def test_rehearsal_data_part_runs_on_a_scaled_set(tmp_path: Path) -> None:
    """bench/rehearsal.py --data-only: builds, checks and caches a 1 % set, then reuses all of it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "bench" / "rehearsal.py"), "--data-only", "--scale", "0.01",
           "--standins", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c"), "--workers", "1"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count(" found ") == 4 and "(already built: reused)" not in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert second.returncode == 0 and second.stdout.count("(already built: reused)") == 4, second.stdout
