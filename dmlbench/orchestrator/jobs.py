"""``dmlbench submit``: run a sweep as a Ray Job on a cluster (Ray Jobs SDK, ``ray[default]``).

The job's driver runs on the cluster, in a temporary copy of the uploaded code, so the sweep's
``--output`` (and ``--storage``) must name places on the cluster: absolute paths (``~`` is the home
folder of the user running Ray on the head node) or, for ``--storage``, URIs; a relative folder would
land in Ray's temporary package folder. The token of a cluster with token authentication is sent in
the ``Authorization`` header when one is available here (:func:`.cluster.http_auth_headers`).
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmlbench.errors import ClusterError, ConfigError, JobFailed
from dmlbench.orchestrator import cluster

Printer = Callable[[str], None]

#: never uploaded with the job: outputs, data, environments, VCS, and common secret files. Folder
#: names are anchored at the uploaded folder's top ("/results/"): gitignore-style patterns match at
#: any depth, and an unanchored "results/" would also leave out the package dmlbench/results/
EXCLUDES = [
    "/results/", "/data/", "/datasets_cache/", "/.venv/", "/venv/", ".git/", "__pycache__/", "*.pyc",
    ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", "*.ckpt", "*.pt", "*.parquet",
    ".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", "credentials*", ".aws/", ".netrc",
]  # fmt: skip


def package_root() -> Path:
    """The folder holding the ``dmlbench`` package (uploaded as the job's working_dir)."""
    return Path(__file__).resolve().parents[2]


def option_value(args: list[str], name: str) -> str | None:
    """Value of ``--name X`` or ``--name=X`` in a command line (the last one wins, as in Typer)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _on_cluster(path: str) -> bool:
    return path.startswith(("/", "~")) or "://" in path


def build_job(args: list[str]) -> dict[str, Any]:
    """Entrypoint and runtime_env of a submitted ``dmlbench <args>`` (pure, for tests)."""
    if not args or args[0] != "sweep":
        raise ConfigError(
            "submit runs a sweep: use `dmlbench submit --address http://HEAD:8265 -- sweep --methods ... --output /abs/path`."
        )
    if any(a == "--address" or a.startswith("--address=") for a in args):
        raise ConfigError("do not pass --address after `--`: inside a Ray Job the sweep joins the job's cluster itself.")
    output = option_value(args, "--output")
    if output is None or not output.startswith(("/", "~")):
        given = "no --output" if output is None else f"--output {output} is relative"
        raise ConfigError(
            f"{given}: a submitted sweep runs on the cluster in Ray's temporary copy of the code, so give --output "
            "an absolute folder on the cluster, e.g. --output /mnt/nfs/dmlbench (shared) or ~/dmlbench-results (head node)."
        )
    storage = option_value(args, "--storage")
    if storage is not None and not _on_cluster(storage):
        raise ConfigError(
            f"--storage {storage} is relative: give an absolute folder every node sees (e.g. /mnt/nfs/dmlbench) "
            "or a URI (s3://bucket/dmlbench)."
        )
    root = package_root()
    if (root / "pyproject.toml").exists():  # a source checkout: upload it as the working dir
        env: dict[str, Any] = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    else:  # an installed package: upload only the package (never the whole site-packages)
        env = {"py_modules": [str(root / "dmlbench")], "excludes": list(EXCLUDES)}
    return {"entrypoint": "python -m dmlbench.cli " + shlex.join(args), "runtime_env": env}


def _auth_error(address: str, err: Exception) -> ClusterError:
    found = cluster.auth_token()
    if found is None:
        return ClusterError(
            f"the Ray dashboard at {address} requires an authentication token and none was found here; {cluster.TOKEN_HELP}."
        )
    return ClusterError(
        f"the Ray dashboard at {address} rejected the authentication token from {found[1]}; use the cluster's own "
        f"token: {cluster.TOKEN_HELP}."
    )


def check_url(address: str) -> None:
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address!r} must be the Ray dashboard URL, e.g. http://HEAD:8265.")


def client(address: str) -> Any:
    """A ``JobSubmissionClient`` for the dashboard at ``address`` (token sent when available here)."""
    check_url(address)
    cluster.probe(address)
    try:
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient
    except ImportError as err:
        raise ClusterError(
            f"dmlbench submit needs the Ray Jobs client ({err}); reinstall dmlbench (it depends on ray[default])."
        ) from None
    try:
        return JobSubmissionClient(address, headers=cluster.http_auth_headers())
    except AuthenticationError as err:
        raise _auth_error(address, err) from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"could not reach the Ray Jobs API at {address}: {err}".rstrip(".") + ".") from None


def submit(address: str, args: list[str]) -> tuple[Any, str]:
    """Submit the job; returns the client and the job id. Bad input → one clear sentence."""
    check_url(address)
    job = build_job(args)
    jobs = client(address)
    from ray.exceptions import AuthenticationError

    try:
        return jobs, str(jobs.submit_job(**job))
    except AuthenticationError as err:
        raise _auth_error(address, err) from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"could not submit to {address}: {err}".rstrip(".") + ".") from None


def follow(jobs: Any, job_id: str, echo: Printer, poll_s: float = 2.0) -> str:
    """Print the job's log as it runs; returns its final status. A job that ends FAILED or STOPPED
    raises :class:`JobFailed` with Ray's reason (the log above says what happened)."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            echo(chunk.rstrip("\n"))

    try:
        asyncio.run(tail())
    except RuntimeError:  # the log stream closed early: fall back to polling the status
        pass
    while True:
        info = jobs.get_job_info(job_id)
        if info.status.is_terminal():
            break
        time.sleep(poll_s)
    status = str(info.status)
    if status != "SUCCEEDED":
        reason = (info.message or "").strip().splitlines()[0] if info.message else "no reason given"
        raise JobFailed(f"job {job_id} ended {status}: {reason.rstrip('.')}; its log is above.")
    return status


def follow_hint(address: str, job_id: str, output: str | None = None) -> str:
    env = "RAY_AUTH_MODE=token " if cluster.http_auth_headers() else ""
    return (
        f"submitted job {job_id}\n"
        f"  follow:   {env}ray job logs --address {address} --follow {job_id}\n"
        f"  status:   {env}ray job status --address {address} {job_id}\n"
        f"  stop:     {env}ray job stop --address {address} {job_id}\n"
        f"  progress: dmlbench status {output or '<--output>'}   (on the cluster)"
    )
