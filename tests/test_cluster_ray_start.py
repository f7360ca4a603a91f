"""A real ``ray start --head`` cluster, as a user starts one: Ray's default settings (token
authentication on, because a token exists in the cluster user's home, as after any local
``ray.init`` or ``ray get-auth-token --generate``), its own temp dir, home and free ports, started in
its own process group and torn down by killing that group.

* ``dmlbench sweep --address`` joins it with no extra environment variable (the token is on the
  machine), and a driver without the token, or with a wrong one, ends with one sentence saying so;
* ``dmlbench submit --wait`` runs a sweep on it as a Ray Job (rows where ``--output`` says), and a
  job that fails makes ``submit --wait`` fail with it;
* a cluster killed under a running sweep ends the driver within the watchdog's bound, with one
  sentence and its rows intact.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sweep_driver import run_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("sweep_driver.py")
RAY = Path(sys.executable).with_name("ray")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def base_env(home: Path, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(home), RAY_TMPDIR=str(tmp), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # fmt: skip
    return env


@dataclass
class RayStart:
    base: Path
    env: dict[str, str]  # a driver's environment on this machine: same home (the token), own temp dir
    gcs: str
    dashboard: str | None
    proc: subprocess.Popen[bytes]

    def kill(self) -> None:
        """SIGKILL the whole process group of ``ray start --block`` (every Ray process it started)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # a process that left the group (Ray's reaper) is found by this cluster's private temp dir
        for pid in os.listdir("/proc"):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if pid.isdigit() and str(self.base) in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass


def start_cluster(dashboard: bool, **worker_env: str) -> RayStart:
    """``ray start --head --block`` in its own process group; ``worker_env`` reaches its workers (the
    fake train function's settings: a remote cluster's workers do not see the driver's environment)."""
    base = Path(tempfile.mkdtemp(prefix="dmlb-", dir="/tmp"))
    home = base / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    env = {**base_env(home, base), **worker_env}
    gcs, dash, client, agent_http, agent_grpc, rt_env, metrics, nm, om = free_ports(9)
    cmd = [str(RAY), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           f"--temp-dir={base / 'ray'}", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={nm}", f"--object-manager-port={om}"]  # fmt: skip
    if dashboard:
        cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
    else:
        cmd += ["--include-dashboard=false"]
    with open(base / "ray-start.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = RayStart(base, {**env, "RAY_TMPDIR": str(base / "driver")}, f"127.0.0.1:{gcs}",
                       f"http://127.0.0.1:{dash}" if dashboard else None, proc)  # fmt: skip
    (base / "driver").mkdir()
    deadline = time.time() + 180
    try:
        while True:
            assert proc.poll() is None, (base / "ray-start.log").read_text()[-3000:]
            assert time.time() < deadline, "ray start did not come up in 180 s"
            if "Ray runtime started" in (base / "ray-start.log").read_text(errors="replace"):
                if not dashboard or _answers(cluster.dashboard + "/api/version"):
                    return cluster
            time.sleep(1)
    except BaseException:
        cluster.kill()
        shutil.rmtree(base, ignore_errors=True)
        raise


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError as err:  # 401/403 (token required) still means it is up
        return getattr(err, "code", None) in (401, 403)


@pytest.fixture(scope="module")
def head() -> Iterator[RayStart]:
    cluster = start_cluster(dashboard=True)
    try:
        yield cluster
    finally:
        cluster.kill()
        shutil.rmtree(cluster.base, ignore_errors=True)


def run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True)


def sweep_args(out: Path, name: str, trials: int = 2, epochs: int = 1) -> list[str]:
    return ["sweep", "--methods", "proxyanchor", "--datasets", "digits", "--backbones", "tiny", "--trials", str(trials),
            "--epochs", str(epochs), "--grace-period", str(epochs), "--final-seeds", "0", "--folds", "3",
            "--output", str(out), "--name", name]  # fmt: skip


def rows_of(out: Path):  # type: ignore[no-untyped-def]
    from dmlbench.results import store

    df, warnings = store.read_rows(out)
    assert warnings == []
    return df


def flat(res: subprocess.CompletedProcess[str]) -> str:
    return " ".join((res.stdout + res.stderr).split())


def test_sweep_joins_a_token_cluster_with_no_extra_settings(head: RayStart, tmp_path: Path) -> None:
    from dmlbench.results import schema

    out = tmp_path / "out"
    t0 = time.time()
    res = run([sys.executable, str(DRIVER), *sweep_args(out, "joined"), "--address", head.gcs], head.env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"sweep --address: {time.time() - t0:.0f} s")
    text = flat(res)
    assert f"joining the Ray cluster at {head.gcs} (--address; token from {head.base / 'home' / '.ray' / 'auth_token'})" in text
    assert f"joined the Ray cluster at {head.gcs}: 1 node(s), 2 CPUs, 0 GPUs" in text
    df = rows_of(out)
    assert len(df) == 2 and set(df[schema.STATUS]) == {"complete"}


def test_a_local_sweep_never_follows_rays_pointer_to_a_running_cluster(head: RayStart, tmp_path: Path) -> None:
    """Ray's pointer file in the driver's temp dir names the live cluster (as after `ray start` by
    someone on this machine): a sweep without --address still runs on its own local Ray."""
    from dmlbench.results import schema

    pointer = Path(head.env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(head.gcs)
    log = tmp_path / "starts.log"
    out = tmp_path / "out"
    res = run([sys.executable, str(DRIVER), *sweep_args(out, "local")], {**head.env, "SWEEP_LOG": str(log)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "joining the Ray cluster" not in flat(res)
    gcs = {ln.split()[5] for ln in log.read_text().splitlines()}  # the GCS of the trials' cluster
    assert len(gcs) == 1 and gcs.pop().rsplit(":", 1)[1] != head.gcs.rsplit(":", 1)[1], "ran on the pointer's cluster"
    assert pointer.read_text() == head.gcs  # not ours: left as it was
    assert set(rows_of(out)[schema.STATUS]) == {"complete"}


def test_missing_or_wrong_token_is_one_sentence(head: RayStart, tmp_path: Path) -> None:
    no_token = {**head.env, "HOME": str(tmp_path)}  # a machine without the cluster's token
    wrong = {**head.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    cmd = [sys.executable, "-m", "dmlbench.cli", *sweep_args(tmp_path / "out", "tok"), "--address", head.gcs]
    t0 = time.time()
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
             for name, env in (("missing", no_token), ("wrong", wrong))}  # fmt: skip
    outs = {name: " ".join(p.communicate(timeout=180)[0].split()) for name, p in procs.items()}
    took = time.time() - t0
    print(f"both token failures reported within {took:.0f} s")
    for name, p in procs.items():
        assert p.returncode == 2, f"{name}: {outs[name][-2000:]}"
        assert "Traceback" not in outs[name] and "InvalidAuthToken" not in outs[name], outs[name][-2000:]
    assert f"cannot join the Ray cluster at {head.gcs}: it requires an authentication token and none was found here" \
        in outs["missing"]  # fmt: skip
    assert "RAY_AUTH_TOKEN=<token>" in outs["missing"] and "~/.ray/auth_token" in outs["missing"]
    assert f"cannot join the Ray cluster at {head.gcs}: it rejected the authentication token from $RAY_AUTH_TOKEN" \
        in outs["wrong"]  # fmt: skip
    assert took < 150
    assert not (tmp_path / "out" / "tok" / "rows").exists()
    # the Jobs API: the same sentences, without waiting
    assert head.dashboard is not None
    sub = ["submit", "--address", head.dashboard, "--", *sweep_args(tmp_path / "out", "tok")]
    res = run([sys.executable, "-m", "dmlbench.cli", *sub], wrong, timeout=120)
    assert res.returncode == 2 and "rejected the authentication token from $RAY_AUTH_TOKEN" in flat(res), flat(res)
    res = run([sys.executable, "-m", "dmlbench.cli", *sub], no_token, timeout=120)
    assert res.returncode == 2 and "requires an authentication token and none was found here" in flat(res), flat(res)


def test_submit_runs_the_sweep_as_a_job_and_fails_with_it(head: RayStart, tmp_path: Path) -> None:
    from dmlbench.results import schema

    assert head.dashboard is not None
    out = tmp_path / "jobout"
    args = ["sweep", "--methods", "proxyanchor", "--datasets", "digits", "--preset", "smoke", "--trials", "1",
            "--epochs", "1", "--final-seeds", "0", "--output", str(out), "--name", "job1"]  # fmt: skip
    t0 = time.time()
    res = run([sys.executable, "-m", "dmlbench.cli", "submit", "--wait", "--address", head.dashboard, "--", *args],
              head.env)  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    print(f"submit --wait: {time.time() - t0:.0f} s")
    text = flat(res)
    assert "submitted job raysubmit_" in text and "ray job logs --address" in text
    assert "joining the Ray cluster at" in text and "($RAY_ADDRESS; token from" in text  # the job's driver
    assert res.stdout.strip().splitlines()[-1].endswith("SUCCEEDED")
    df = rows_of(out)
    assert len(df) == 1 and set(df[schema.STATUS]) == {"complete"}
    assert "_ray_pkg_" not in " ".join(str(p) for p in out.rglob("*"))
    # the job ran the uploaded code: every module of the package was uploaded (where an installed
    # copy exists, as here, a missing one would silently be imported from it instead)
    pkgs = [p for p in (head.base / "ray").glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
            if (p / "dmlbench").is_dir()]  # fmt: skip
    assert pkgs, "no uploaded working_dir found on the cluster"
    pkg = max(pkgs, key=lambda p: p.stat().st_mtime)
    ours = {p.relative_to(ROOT) for p in (ROOT / "dmlbench").rglob("*.py")}
    assert ours and {p for p in ours if not (pkg / p).is_file()} == set()

    bad = [*args[:2], "nosuch", *args[3:-1], "job2"]  # --methods nosuch: the job's sweep exits 2
    res = run([sys.executable, "-m", "dmlbench.cli", "submit", "--wait", "--address", head.dashboard, "--", *bad],
              head.env)  # fmt: skip
    assert res.returncode == 1, flat(res)[-3000:]
    assert "unknown method 'nosuch'" in flat(res) and "ended FAILED" in flat(res)


def test_lost_cluster_ends_the_driver_with_one_sentence(tmp_path: Path) -> None:
    log = tmp_path / "starts.log"
    cluster = start_cluster(dashboard=False, SWEEP_EPOCH_S="4", SWEEP_LOG=str(log))
    out = tmp_path / "out"
    cmd = [sys.executable, str(DRIVER), *sweep_args(out, "lost", trials=4, epochs=4), "--address", cluster.gcs]

    def kill_cluster(pid: int) -> float:
        cluster.kill()
        return time.time()

    try:
        rc, output, _, took = run_until(cmd, cluster.env, lambda: log.exists() and "epoch" in log.read_text(),
                                     kill_cluster, "a trial with a checkpoint on the cluster")  # fmt: skip
    finally:
        cluster.kill()
        shutil.rmtree(cluster.base, ignore_errors=True)
    print(f"driver ended {took:.0f} s after the cluster was killed")
    assert rc == 3, output[-3000:]
    assert "lost the Ray cluster" in output and "rerun the same command" in output
    assert took < 90
    if (out / "lost" / "rows").exists():
        rows_of(out)  # what was written is intact
