"""`dmlbench sweep/submit/status` option validation with the runner patched (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.errors import ConfigError, DmlbenchError
from dmlbench.orchestrator import cluster, jobs, sweep
from dmlbench.orchestrator.spec import SweepSpec

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_run(spec: SweepSpec, **kw: Any) -> list[Any]:
        calls.append({"spec": spec, **{k: v for k, v in kw.items() if k != "echo"}})
        return []

    monkeypatch.setattr(sweep, "run", fake_run)
    return calls


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def test_full_option_set_builds_exact_spec(captured: list[dict[str, Any]], tmp_path: Path) -> None:
    space = tmp_path / "s.yaml"
    res = invoke(
        "sweep", "--methods", "proxyanchor,nivmf", "--datasets", "digits", "--backbones", "tiny,resnet18",
        "--trials", "7", "--epochs", "5", "--gpus-per-trial", "0.5", "--cpus-per-trial", "2",
        "--max-concurrent", "3", "--search-space", str(space), "--folds", "3", "--final-seeds", "4",
        "--seed", "9", "--name", "mine", "--output", str(tmp_path / "out"), "--address", "ray://h:10001",
        "--storage", "s3://b/p", "--data-root", "/data", "--metric", "precision_at_1", "--grace-period", "2",
        "--resume", "--force",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    (call,) = captured
    assert call["resume"] is True and call["force"] is True and call["dry_run"] is False
    expected = SweepSpec(
        methods=("proxyanchor", "nivmf"), datasets=("digits",), backbones=("tiny", "resnet18"), trials=7, epochs=5,
        gpus_per_trial=0.5, cpus_per_trial=2.0, max_concurrent=3, search_space=str(space), folds=3, final_seeds=4,
        seed=9, name="mine", output=str(tmp_path / "out"), address="ray://h:10001", storage="s3://b/p",
        data_root="/data", metric="precision_at_1", grace_period=2,
    )  # fmt: skip
    assert call["spec"] == expected


def test_defaults_and_expansions(captured: list[dict[str, Any]]) -> None:
    assert invoke("sweep", "--methods", "proxyanchor", "--datasets", "embedded", "--dry-run").exit_code == 0
    spec = captured[-1]["spec"]
    assert spec == SweepSpec(methods=("proxyanchor",), datasets=("synthetic", "digits"), folds=3)  # embedded only: 3 folds
    assert captured[-1]["dry_run"] is True
    assert invoke("sweep", "--methods", "proxyanchor", "--datasets", "all").exit_code == 0
    assert captured[-1]["spec"].datasets == ("cub200", "cars196", "sop", "inshop")
    # a name listed twice (directly or through an expansion) runs once
    assert invoke("sweep", "--methods", "proxyanchor,proxyanchor", "--datasets", "digits,embedded").exit_code == 0
    assert captured[-1]["spec"].methods == ("proxyanchor",)
    assert captured[-1]["spec"].datasets == ("digits", "synthetic")
    assert invoke("sweep", "--methods", "all", "--datasets", "digits").exit_code == 0
    from dmlbench.methods import METHODS

    assert captured[-1]["spec"].methods == tuple(METHODS.names())


def test_smoke_preset_and_explicit_override(captured: list[dict[str, Any]]) -> None:
    assert invoke("sweep", "--methods", "proxyanchor", "--datasets", "digits", "--preset", "smoke", "--trials", "5").exit_code == 0
    spec = captured[-1]["spec"]
    assert spec.preset == "smoke" and spec.backbones == ("tiny",) and spec.epochs == 2 and spec.final_seeds == 2
    assert spec.trials == 5  # explicit option wins over the preset
    assert spec.trial_base["image_size"] == 32 and spec.trial_base["pretrained"] is False


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--methods", "proxyanchr", "--datasets", "digits"], r"unknown method 'proxyanchr' \(did you mean proxyanchor.*\); valid methods: .*proxyanchor"),
        (["--methods", "proxyanchor", "--datasets", "digts"], r"unknown dataset 'digts' \(did you mean digits\?\); valid datasets:"),
        (["--methods", "proxyanchor", "--datasets", "digits", "--trials", "0"], r"trials.*greater than or equal to 1"),
        (["--methods", "proxyanchor", "--datasets", "digits", "--gpus-per-trial", "-1"], r"gpus_per_trial"),
        (["--methods", "proxyanchor", "--datasets", "digits", "--cpus-per-trial", "0"], r"cpus_per_trial"),
        (["--methods", "proxyanchor", "--datasets", "digits", "--folds", "1"], r"folds"),
        (["--methods", "proxyanchor", "--datasets", "digits", "--final-seeds", "-1"], r"final_seeds"),
        (["--methods", "proxyanchor", "--datasets", "digits", "--max-concurrent", "0"], r"max_concurrent"),
        (["--methods", "proxyanchor", "--datasets", "digits", "--preset", "huge"], r"unknown preset 'huge'; valid presets: smoke"),
        (["--methods", "proxyanchor", "--datasets", "digits", "--metric", "acc"], r"unknown metric 'acc'"),
        (["--methods", "proxyanchor", "--datasets", "digits", "--name", "a/b"], r"sweep name"),
        (["--methods", "", "--datasets", "digits"], r"--methods is empty"),
        (["--methods", "proxyanchor", "--datasets", "digits", "--epochs", "2", "--grace-period", "3"], r"grace_period"),
    ],
)
def test_bad_options_one_line_exit_2(captured: list[dict[str, Any]], args: list[str], pattern: str) -> None:
    import re

    res = invoke("sweep", *args)
    assert res.exit_code == 2, res.output
    assert captured == []
    out = " ".join(res.output.split())
    assert re.search(pattern, out), out


def test_validate_rejects_missing_search_space_and_unwritable_output(tmp_path: Path) -> None:
    spec = SweepSpec(methods=("proxyanchor",), datasets=("digits",), output=str(tmp_path / "o"), folds=3,
                     search_space=str(tmp_path / "none.yaml"))  # fmt: skip
    with pytest.raises(ConfigError, match="does not exist"):
        sweep.validate(spec)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    spec = SweepSpec(methods=("proxyanchor",), datasets=("digits",), output=str(blocker / "sub"), folds=3)
    with pytest.raises(ConfigError, match="is not writable"):
        sweep.validate(spec)
    spec = SweepSpec(methods=("proxyanchor",), datasets=("digits",), backbones=("resnet5000",), output=str(tmp_path),
                     folds=3)  # fmt: skip
    with pytest.raises(ConfigError, match="unknown backbone 'resnet5000'"):
        sweep.validate(spec)
    spec = SweepSpec(methods=("proxyanchor",), datasets=("digits",), output=str(tmp_path), folds=4)
    with pytest.raises(ConfigError, match="digits has 6 training classes, too few for 4 validation folds"):
        sweep.validate(spec)
    spec = SweepSpec(methods=("proxyanchor",), datasets=("digits",), output=str(tmp_path), folds=3)
    sweep.validate(spec)  # a good spec passes
    spec = SweepSpec(methods=("proxyanchor",), datasets=("digits",), backbones=("resnet5000",), output=str(tmp_path),
                     folds=3)  # fmt: skip
    with pytest.raises(ConfigError, match="unknown backbone 'resnet5000'"):
        sweep.validate(spec)


def test_validate_reports_missing_benchmark_before_ray(tmp_path: Path) -> None:
    from dmlbench.errors import DatasetError

    spec = SweepSpec(methods=("proxyanchor",), datasets=("cub200",), output=str(tmp_path),
                     data_root=str(tmp_path / "nodata"))  # fmt: skip
    with pytest.raises(DatasetError, match=r"data root .*nodata does not exist.*CUB_200_2011"):
        sweep.validate(spec)


def test_resume_refuses_changed_spec_naming_the_change(tmp_path: Path) -> None:
    old = SweepSpec(methods=("proxyanchor",), datasets=("digits",), name="s1", output=str(tmp_path), trials=3)
    sweep.write_spec(old)
    new = old.model_copy(update={"trials": 5})
    with pytest.raises(ConfigError, match=r"trials: 3 -> 5.*--force"):
        sweep.check_resume(new, resume=True, force=False)
    assert sweep.check_resume(new, resume=True, force=True) == new
    # where it runs is not part of the identity
    assert sweep.check_resume(old.model_copy(update={"max_concurrent": 2}), resume=False, force=False)
    # --resume without --name picks the newest sweep
    anon = SweepSpec(methods=("proxyanchor",), datasets=("digits",), output=str(tmp_path), trials=3)
    assert sweep.check_resume(anon, resume=True, force=True).name == "s1"
    with pytest.raises(DmlbenchError, match="no sweep .* to resume"):
        sweep.check_resume(anon.model_copy(update={"output": str(tmp_path / "empty")}), resume=True, force=False)
    saved = json.loads((tmp_path / "s1" / "sweep.json").read_text())
    assert saved["spec"]["trials"] == 3


def test_resources_and_addresses() -> None:
    spec = SweepSpec(methods=("proxyanchor",), datasets=("digits",), gpus_per_trial=2)
    with pytest.raises(ConfigError, match="largest node has 1 GPU"):
        cluster.check_resources(spec, [{"CPU": 8, "GPU": 1}, {"CPU": 4, "GPU": 0}])
    with pytest.raises(ConfigError, match="no node has a GPU"):
        cluster.check_resources(spec, [{"CPU": 8, "GPU": 0}])
    cluster.check_resources(spec.model_copy(update={"gpus_per_trial": 0.5}), [{"CPU": 8, "GPU": 1}])
    with pytest.raises(DmlbenchError, match="cannot reach a Ray cluster at 127.0.0.1:1"):
        cluster.probe("127.0.0.1:1", timeout_s=1)


def test_unreachable_address_is_one_line(captured: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    res = invoke("submit", "--address", "http://127.0.0.1:1", "--", "sweep", "--methods", "proxyanchor", "--output", "/srv/out")
    assert res.exit_code == 2
    assert "cannot reach a Ray cluster at http://127.0.0.1:1" in " ".join(res.output.split())


def test_submit_job_excludes_data_results_and_secrets() -> None:
    job = jobs.build_job(["sweep", "--methods", "ccp", "--datasets", "all", "--output", "/srv/out"])
    assert job["entrypoint"] == "python -m dmlbench.cli sweep --methods ccp --datasets all --output /srv/out"
    env = job["runtime_env"]
    assert (Path(env["working_dir"]) / "dmlbench" / "__init__.py").exists()
    for pat in ("/results/", "/data/", "/.venv/", ".git/", ".env", "*.pem", "id_rsa*", "credentials*"):
        assert pat in env["excludes"]
    with pytest.raises(ConfigError, match="submit runs a sweep"):
        jobs.build_job(["leaderboard"])
    with pytest.raises(ConfigError, match="do not pass --address"):
        jobs.build_job(["sweep", "--address", "x:1"])


def test_status_reports_missing_sweep(tmp_path: Path) -> None:
    res = invoke("status", str(tmp_path))
    assert res.exit_code == 2
    assert "no sweep under" in " ".join(res.output.split())


def test_every_command_has_help() -> None:
    for cmd in ("sweep", "submit", "status"):
        res = invoke(cmd, "--help")
        assert res.exit_code == 0 and "Usage" in res.output


def test_resume_refuses_a_changed_search_space(tmp_path: Path) -> None:
    from dmlbench.orchestrator.sweep import check_resume, write_spec

    space = tmp_path / "triplet.yaml"
    space.write_text("method: triplet\nparams:\n  - {name: margin, type: float, low: 0.05, high: 0.5}\n")
    spec = SweepSpec(methods=("triplet",), datasets=("digits",), output=str(tmp_path / "out"), name="s1",
                     search_space=str(space))  # fmt: skip
    write_spec(spec)
    assert check_resume(spec, resume=True, force=False) == spec  # unchanged: resumes
    unnamed = spec.model_copy(update={"name": None})
    before_id = unnamed.sweep_id
    space.write_text("method: triplet\nparams:\n  - {name: margin, type: float, low: 0.1, high: 0.3}\n")
    with pytest.raises(ConfigError, match="the search space of triplet changed"):
        check_resume(spec, resume=True, force=False)
    assert check_resume(spec, resume=True, force=True) == spec
    # without --name the edited space gives another sweep id: a new sweep, never mixed rows
    assert unnamed.sweep_id != before_id


def test_embedded_only_sweeps_default_to_three_folds() -> None:
    """docs/protocol.md: 4 folds by default, 3 for the embedded datasets (digits has 6 training classes)."""
    from dmlbench.orchestrator.planning import build_spec

    assert build_spec(methods="ccp", datasets="embedded").folds == 3
    assert build_spec(methods="ccp", datasets="embedded", folds=2).folds == 2
    assert build_spec(methods="ccp", datasets="cub200").folds == 4
    assert build_spec(methods="ccp", datasets="digits,cub200").folds == 4
