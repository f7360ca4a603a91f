"""The researcher's loop around the CLI (issue 20): fast start-up, tables within 80 columns,
short error messages, `datasets list` with each dataset's status under the data root."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmlbench.cli import app, console
from dmlbench.cli._catalog import method_catalog, searched_params, summary_line
from dmlbench.datasets.base import DatasetCheck
from dmlbench.datasets.checks import check_datasets, unusable_message

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
#: imported only by the commands that need them; never by `import dmlbench.cli` or `--help`
HEAVY = ("torch", "ray", "optuna", "pandas", "timm", "matplotlib", "scipy", "pyarrow", "sklearn")

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import dmlbench.cli
from dmlbench.cli import app
t_import = time.perf_counter() - t0
from typer.testing import CliRunner
runner = CliRunner()
commands = [["--help"], ["methods", "list"], ["datasets", "list"]]
for name in ("train", "evaluate", "sweep", "submit", "status", "leaderboard", "report", "reproduce"):
    commands.append([name, "--help"])
for group, sub in (("methods", "list"), ("datasets", "list"), ("datasets", "check")):
    commands.append([group, sub, "--help"])
codes = {" ".join(c): runner.invoke(app, c).exit_code for c in commands}
print(json.dumps({"import_s": t_import, "codes": codes,
                  "heavy": sorted(m for m in %r if m in sys.modules)}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}


def test_cli_imports_no_heavy_module_for_help_and_lists() -> None:
    """`dmlbench --help`, every command's --help, `methods list` and `datasets list` never import
    torch, ray, optuna, pandas, timm or matplotlib; the bound on the import time is generous (a
    loaded 2-core box), the real figure is ~0.3 s."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE % (HEAVY,)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], out["heavy"]
    assert all(code == 0 for code in out["codes"].values()), out["codes"]
    assert out["import_s"] < 3.0, out


_DRIVER_PROBE = """
import json, sys
from dmlbench.datasets import DATASETS
from dmlbench.datasets.splits import make_manifest
from dmlbench.orchestrator import planning
from dmlbench.orchestrator.experiment import sweep_parts
from dmlbench.orchestrator.spec import SweepSpec
from dmlbench.search_spaces.loader import build_trial_config

spec = SweepSpec(methods=("nivmf",), datasets=("digits",), backbones=("tiny",), trials=2, folds=3, output=sys.argv[1])
planning.validate(spec)
cfg = build_trial_config(planning.cell_base(spec, spec.cells()[0], "search"), {})
table = DATASETS.get("digits")().table()
hashes = {p.trial["split_hash"] for p in sweep_parts(spec)}
print(json.dumps({"hash": hashes.pop() if len(hashes) == 1 else sorted(hashes), "num_folds": cfg.num_folds,
                  "expected": make_manifest(table, "digits", cfg.num_folds, cfg.split_seed).hash,
                  "heavy": sorted(m for m in ("torchvision", "timm", "dmlbench.engine.trainer") if m in sys.modules)}))
"""


def test_sweep_planning_loads_no_training_engine(tmp_path: Path) -> None:
    """What the sweep driver does before its first trial starts (validating names and data, the
    cell phases with each cell's fold-manifest hash) imports neither the training engine nor
    torchvision, nor timm for a backbone dmlbench registers: each costs seconds of driver time while
    the cluster waits. The hash is the one the manifest itself reports."""
    proc = subprocess.run([sys.executable, "-c", _DRIVER_PROBE, str(tmp_path)], capture_output=True, text=True,
                          env=_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], out["heavy"]
    assert out["num_folds"] >= 2 and len(out["hash"]) == 16 and out["hash"] == out["expected"], out


def test_dmlbench_help_starts_fast() -> None:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dmlbench.cli", "--help"], capture_output=True, text=True, env=_env(), timeout=60
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0 and "leaderboard" in proc.stdout
    assert elapsed < 3.0, f"`dmlbench --help` took {elapsed:.2f} s"


def test_method_catalog_matches_the_registry() -> None:
    """The catalog read from the definition sites lists exactly the registered methods."""
    from dmlbench.methods import METHODS

    cards = method_catalog()
    assert [c.name for c in cards] == METHODS.names()
    for card in cards:
        cls = METHODS.get(card.name)
        assert (cls.__module__, cls.__name__) == (card.module, card.class_name)
        assert card.summary == summary_line(inspect.getdoc(cls)) and card.summary
        assert searched_params(card.name), f"{card.name} has no search space"


def test_methods_list_fits_and_defaults_are_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "width", 80)
    res = runner.invoke(app, ["methods", "list"])
    assert res.exit_code == 0, res.output
    assert max(map(len, res.stdout.splitlines())) <= 80
    assert "proxyanchor" in res.stdout and "Proxy Anchor" in res.stdout
    res = runner.invoke(app, ["methods", "list", "--defaults", "--wide"])
    assert res.exit_code == 0 and "proxies_per_class=" in res.stdout


def test_datasets_list_shows_status_under_the_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "width", 80)
    monkeypatch.delenv("DMLBENCH_DATA", raising=False)
    res = runner.invoke(app, ["datasets", "list"])
    assert res.exit_code == 0, res.output
    assert "$DMLBENCH_DATA/" not in res.stdout and "no data root" in res.stdout
    assert max(map(len, res.stdout.splitlines())) <= 80
    monkeypatch.setenv("DMLBENCH_DATA", str(tmp_path))
    res = runner.invoke(app, ["datasets", "list", "--wide"])
    text = " ".join(res.stdout.split())
    assert res.exit_code == 0 and "missing" in text and "embedded" in text
    assert f"Stanford_Online_Products/ under {tmp_path}" in text and "from DMLBENCH_DATA" in text


def test_datasets_check_fits_80_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "width", 80)
    res = runner.invoke(app, ["datasets", "check", "all", "--data-root", str(tmp_path)])
    assert res.exit_code == 2
    lines = res.stdout.splitlines()
    assert lines and max(map(len, lines)) <= 80
    assert "hidden to fit 80 columns" in res.stdout  # counts make way for the message


def test_status_fits_80_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.orchestrator.sweepdir import write_spec

    spec = SweepSpec(methods=("multisimilarity", "proxyanchor"), datasets=("synthetic", "digits"),
                     output=str(tmp_path), name="a-rather-long-sweep-name")  # fmt: skip
    write_spec(spec)
    monkeypatch.setattr(console, "width", 80)
    res = runner.invoke(app, ["status", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert max(map(len, res.stdout.splitlines())) <= 80
    assert "multisimilarity/synthetic" in res.stdout and "sweep a-rather-long-sweep-name" in res.stdout
    assert "0/" in res.stdout and "ETA unknown" in res.stdout


def test_unusable_datasets_message_says_the_fix_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMLBENCH_DATA", raising=False)
    names = ["all"]
    msg = unusable_message(check_datasets(names, None), None)
    assert msg is not None and msg.count("--data-root") == 1 and len(msg) < 260
    assert msg.startswith("no data root for cub200, cars196, sop and inshop")
    msg = unusable_message(check_datasets(names, str(tmp_path / "nope")), str(tmp_path / "nope"))
    assert msg is not None and "does not exist" in msg and msg.count("--data-root") == 1
    msg = unusable_message(check_datasets(names, str(tmp_path)), str(tmp_path))
    assert msg is not None and msg.count("dmlbench datasets check") == 1 and msg.count("http") == 0
    assert "are missing under the data root" in msg and len(msg.replace(str(tmp_path), "ROOT")) < 220
    one = check_datasets(["sop"], str(tmp_path))
    assert unusable_message(one, str(tmp_path)) == one[0].message
    assert unusable_message([DatasetCheck("cub200", "found")], None) is None
