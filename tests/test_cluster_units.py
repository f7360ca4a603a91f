"""The pure parts of the cluster path (no Ray started): which cluster a sweep joins, where the token
comes from, the one sentence of each failed join, submit's rules for --output/--storage, resources
per trial, cells without a complete trial, and the deadline that bounds a blocking join."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from dmlbench.errors import ConfigError
from dmlbench.orchestrator import cluster, jobs
from dmlbench.orchestrator.experiment import CellOutcome
from dmlbench.orchestrator.planning import cell_base
from dmlbench.orchestrator.spec import Cell, SweepSpec
from dmlbench.orchestrator.sweep import incomplete_cells
from dmlbench.results import schema

SPEC = SweepSpec(methods=("proxyanchor",), datasets=("digits",), backbones=("tiny",))


@pytest.fixture
def no_ray_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Ray address or token settings, and a HOME without ``~/.ray/auth_token``. Each variable is
    set through monkeypatch before it is removed, so the undo puts back exactly what was there before
    the test, absence included: ``prepare_auth`` sets ``RAY_AUTH_MODE`` itself, and a value it left
    behind made the next test's local Ray fail to start when this file ran before test_interrupt."""
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


# ---- which cluster -------------------------------------------------------------------------------
def test_join_address_local_explicit_and_ray_address(no_ray_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cluster.join_address(SPEC) == (None, "local")
    assert cluster.join_address(SPEC.model_copy(update={"address": "head:6379"})) == ("head:6379", "--address")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster.join_address(SPEC) == ("10.0.0.5:6379", "$RAY_ADDRESS")
    assert cluster.join_address(SPEC.model_copy(update={"address": "head:6379"}))[0] == "head:6379"  # --address wins
    with pytest.raises(ConfigError, match="Ray Client address.*dmlbench submit"):
        cluster.join_address(SPEC.model_copy(update={"address": "ray://head:10001"}))
    with pytest.raises(ConfigError, match="dashboard URL.*HEAD:6379"):
        cluster.join_address(SPEC.model_copy(update={"address": "http://head:8265"}))


# ---- tokens --------------------------------------------------------------------------------------
def test_token_precedence_and_auth_mode(no_ray_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    assert cluster.auth_token() is None
    assert cluster.prepare_auth() is None and "RAY_AUTH_MODE" not in os.environ  # nothing to send
    assert cluster.http_auth_headers() == {}
    (no_ray_env / ".ray").mkdir()
    (no_ray_env / ".ray" / "auth_token").write_text("home-token\n")
    assert cluster.auth_token() == ("home-token", str(no_ray_env / ".ray" / "auth_token"))
    (no_ray_env / "tok").write_text("file-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_ray_env / "tok"))
    assert cluster.auth_token() == ("file-token", f"$RAY_AUTH_TOKEN_PATH ({no_ray_env / 'tok'})")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert cluster.auth_token() == ("env-token", "$RAY_AUTH_TOKEN")
    assert cluster.prepare_auth() == "$RAY_AUTH_TOKEN" and os.environ["RAY_AUTH_MODE"] == "token"
    assert cluster.http_auth_headers() == {"Authorization": "Bearer env-token"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's explicit choice is kept
    assert cluster.prepare_auth() is None and os.environ["RAY_AUTH_MODE"] == "disabled"
    assert cluster.http_auth_headers() == {}


def test_a_local_sweep_leaves_the_auth_mode_to_ray(no_ray_env: Path) -> None:
    import os

    (no_ray_env / ".ray").mkdir()
    (no_ray_env / ".ray" / "auth_token").write_text("t")
    assert cluster.prepare_auth_for(SPEC) is None and "RAY_AUTH_MODE" not in os.environ


# ---- one sentence per failed join ----------------------------------------------------------------
VERSION_ERROR = (
    "RuntimeError: Version mismatch: The cluster was started with:\n    Ray: 2.59.0\n    Python: 3.11.4\n"
    "This process on node 10.0.0.2 was started with:\n    Ray: 2.60.0\n    Python: 3.11.9\n"
)  # the text of ray._private.utils.check_version_info


@pytest.mark.parametrize(
    ("error", "log", "source", "mode", "expected"),
    [
        ("ConnectionError: Failed to connect", "gcs_client.cc:210: Unauthenticated: RPC error: InvalidAuthToken",
         None, None, "it requires an authentication token and none was found here; copy the head node's token"),
        ("ConnectionError: Failed to connect", "InvalidAuthToken: Authentication token is missing or incorrect",
         "$RAY_AUTH_TOKEN", "token", "it rejected the authentication token from $RAY_AUTH_TOKEN; use the cluster's own"),
        ("ConnectionError: Failed to connect", "InvalidAuthToken", None, "disabled",
         "it requires an authentication token but RAY_AUTH_MODE=disabled is set here; unset it"),
        (VERSION_ERROR, "", None, None,
         "its Ray or Python version differs from this machine's (cluster Ray 2.59.0 / Python 3.11.4, here Ray 2.60.0 "
         "/ Python 3.11.9); install the same"),
        ("ConnectionError: Failed to connect to GCS", "", None, None,
         "(ConnectionError: Failed to connect to GCS); check that it is the head's GCS address"),
    ],
    ids=["missing-token", "wrong-token", "auth-disabled-here", "version-mismatch", "other"],
)  # fmt: skip
def test_join_error_names_the_cause(
    error: str, log: str, source: str | None, mode: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    text = cluster.join_error("head:6379", error, log, source)
    assert text.startswith("cannot join the Ray cluster at head:6379")
    assert expected in text
    assert "\n" not in text and text.endswith(".")


def test_deadline_ends_a_blocked_call_with_one_sentence() -> None:
    code = textwrap.dedent("""
        import time
        from dmlbench.orchestrator.cluster import deadline
        with deadline(0.5, "cannot join the Ray cluster at h:1: no answer within 0 s."):
            time.sleep(30)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: cannot join the Ray cluster at h:1: no answer within 0 s."


def test_unreachable_address_is_one_sentence_without_ray(no_ray_env: Path) -> None:
    from typer.testing import CliRunner

    from dmlbench.cli import app

    args = ["sweep", "--methods", "proxyanchor", "--datasets", "digits", "--preset", "smoke", "--address", "127.0.0.1:1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in " ".join(res.output.split())


# ---- submit ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no --output: a submitted sweep runs on the cluster in Ray's temporary copy"),
        (["--output", "results"], "--output results is relative"),
        (["--output=out/x"], "--output out/x is relative"),
        (["--output", "/srv/out", "--storage", "tune"], "--storage tune is relative"),
    ],
)
def test_submit_needs_paths_on_the_cluster(extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        jobs.build_job(["sweep", "--methods", "ccp", "--datasets", "cub200", *extra])


def test_submit_accepts_absolute_home_and_uri_paths() -> None:
    for extra in (["--output", "/srv/out"], ["--output", "~/dmlbench-results", "--storage", "s3://b/p"],
                  ["--output=/srv/out", "--storage=/mnt/nfs/tune"]):  # fmt: skip
        job = jobs.build_job(["sweep", "--methods", "ccp", "--datasets", "cub200", *extra])
        assert job["entrypoint"].startswith("python -m dmlbench.cli sweep ")


def test_follow_fails_with_the_job(capsys: pytest.CaptureFixture[str]) -> None:
    from dmlbench.errors import JobFailed

    class Status(str):
        def is_terminal(self) -> bool:
            return True

    class Client:
        async def tail_job_logs(self, job_id: str) -> Any:
            for chunk in ("line 1\n", "line 2\n"):
                yield chunk

        def get_job_info(self, job_id: str) -> Any:
            return type("Info", (), {"status": Status("FAILED"), "message": "Job entrypoint command failed with exit code 1"})

    lines: list[str] = []
    with pytest.raises(JobFailed, match="job j1 ended FAILED: Job entrypoint command failed with exit code 1") as info:
        jobs.follow(Client(), "j1", lines.append)
    assert info.value.exit_code == 1
    assert lines == ["line 1", "line 2"]


# ---- resources ---------------------------------------------------------------------------------------
def test_gpu_default_fractions_and_cpu_refusal() -> None:
    gpu_nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 8, "GPU": 0}]
    cpu_nodes = [{"CPU": 16, "GPU": 0}]
    assert cluster.resolve_resources(SPEC, gpu_nodes).gpus_per_trial == 1.0
    assert cluster.resolve_resources(SPEC, cpu_nodes).gpus_per_trial == 0.0  # embedded data: CPU is fine
    half = SPEC.model_copy(update={"gpus_per_trial": 0.5})
    assert cluster.resolve_resources(half, gpu_nodes).gpus_per_trial == 0.5
    bench = SPEC.model_copy(update={"datasets": ("cub200", "digits")})
    with pytest.raises(ConfigError, match=r"cub200 would train on CPU \(the Ray cluster has no GPU \(1 node\(s\), 16 CPUs"):
        cluster.resolve_resources(bench, cpu_nodes)
    with pytest.raises(ConfigError, match=r"would train on CPU \(--gpus-per-trial is 0\)"):
        cluster.resolve_resources(bench.model_copy(update={"gpus_per_trial": 0.0}), gpu_nodes)
    with pytest.raises(ConfigError, match=r"would train on CPU \(the trials' device is set to cpu\)"):
        cluster.resolve_resources(bench.model_copy(update={"trial_base": {"device": "cpu"}}), gpu_nodes)
    assert cluster.resolve_resources(bench.model_copy(update={"allow_cpu": True}), cpu_nodes).gpus_per_trial == 0.0
    assert cluster.resolve_resources(bench, gpu_nodes).gpus_per_trial == 1.0


def test_loader_settings_follow_cpus_per_trial_and_show_in_the_plan() -> None:
    gpu8 = SPEC.model_copy(update={"gpus_per_trial": 1.0, "cpus_per_trial": 8.0})
    base = cell_base(gpu8, Cell("proxyanchor", "digits", "tiny"), "search")
    assert (base["num_workers"], base["torch_threads"], base["pin_memory"]) == (7, 1, True)
    assert cluster.format_resources(gpu8) == (
        "per trial: 8 CPU(s), 1 GPU(s), 7 data-loader worker(s), 1 thread(s), pinned memory"
    )
    cpu4 = SPEC.model_copy(update={"gpus_per_trial": 0.0, "cpus_per_trial": 4.0})
    base = cell_base(cpu4, Cell("proxyanchor", "digits", "tiny"), "search")
    assert (base["num_workers"], base["torch_threads"], base["pin_memory"]) == (1, 3, False)
    assert "1 GPU if the cluster has GPUs, else 0" in cluster.format_resources(SPEC)
    # a preset's explicit trial settings win over the defaults
    mine = cpu4.model_copy(update={"trial_base": {"num_workers": 0}})
    assert cell_base(mine, Cell("proxyanchor", "digits", "tiny"), "search")["num_workers"] == 0


def test_resources_are_not_part_of_the_sweep_identity() -> None:
    assert SPEC.spec_hash() == SPEC.model_copy(update={"gpus_per_trial": 1.0, "cpus_per_trial": 8.0,
                                                       "allow_cpu": True}).spec_hash()  # fmt: skip


# ---- cells without a complete trial ------------------------------------------------------------------
def _row(phase: str, status: str) -> dict[str, Any]:
    return {schema.PHASE: phase, schema.STATUS: status}


def test_incomplete_cells_name_cell_and_phase() -> None:
    a, b, c = (CellOutcome(Cell("proxyanchor", d, "tiny")) for d in ("digits", "synthetic", "cub200"))
    a.rows = {"1": _row("search", "complete"), "2": _row("final", "complete")}
    b.rows = {"3": _row("search", "failed"), "4": _row("search", "pruned")}
    c.rows = {"5": _row("search", "complete"), "6": _row("final", "failed")}
    spec = SPEC.model_copy(update={"final_seeds": 2})
    assert incomplete_cells([a, b, c], spec) == [
        "proxyanchor/synthetic/tiny (search and final)", "proxyanchor/cub200/tiny (final)"]  # fmt: skip
    assert incomplete_cells([a, c], spec.model_copy(update={"final_seeds": 0})) == []


def test_relink_checkpoints_fills_a_deleted_or_partial_checkpoint_from_the_trials_newest(tmp_path: Path) -> None:
    """A killed driver's experiment state can name a checkpoint that Tune already deleted (it deletes
    on registering the next one, but saves its state only every second or two): the folder gets the
    trial's newest complete checkpoint, the state file last; a complete folder is left alone."""
    import pyarrow.fs as pafs

    from dmlbench.orchestrator.experiment import relink_checkpoints
    from dmlbench.orchestrator.trainable import STATE_FILE

    exp = tmp_path / "exp"

    def ckpt(rel: str, epoch: int, state: bool = True) -> None:
        d = exp / rel
        (d / "fold1" / "checkpoints").mkdir(parents=True)
        (d / "fold1" / "checkpoints" / "last.pt").write_text(str(epoch))
        if state:
            (d / STATE_FILE).write_text(f'{{"epoch": {epoch}}}')

    ckpt("gone/checkpoint_000002", 3)  # the state names checkpoint_000001, deleted
    ckpt("gone/checkpoint_000003", 4, state=False)  # an upload cut by the kill: not complete
    ckpt("partial/checkpoint_000000", 1)
    ckpt("partial/checkpoint_000001", 1, state=False)  # a relink cut short earlier
    ckpt("partial/checkpoint_000004", 5)
    ckpt("fine/checkpoint_000000", 1)
    ckpt("fine/checkpoint_000001", 2)
    (exp / "lost").mkdir()  # nothing to resume from: left for Tune to report

    wanted = ["gone/checkpoint_000001", "partial/checkpoint_000001", "fine/checkpoint_000000", "lost/checkpoint_000000"]
    filled = relink_checkpoints(pafs.LocalFileSystem(), str(exp), wanted)

    assert filled == ["gone/checkpoint_000001", "partial/checkpoint_000001"]
    for rel, epoch in (("gone/checkpoint_000001", 3), ("partial/checkpoint_000001", 5)):
        assert (exp / rel / "fold1" / "checkpoints" / "last.pt").read_text() == str(epoch)
        assert (exp / rel / STATE_FILE).read_text() == f'{{"epoch": {epoch}}}'
    assert not (exp / "gone" / "checkpoint_000002").exists() and not (exp / "partial" / "checkpoint_000004").exists()
    assert (exp / "gone" / "checkpoint_000003").exists()  # the incomplete one is not a source, and stays
    assert (exp / "fine" / "checkpoint_000000" / "fold1" / "checkpoints" / "last.pt").read_text() == "1"
    assert (exp / "fine" / "checkpoint_000001").exists()
    assert not (exp / "lost" / "checkpoint_000000").exists()
