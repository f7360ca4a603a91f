"""``dmlbench submit``: run a sweep as a Ray Job on a cluster (Ray Jobs SDK)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from dmlbench.errors import ConfigError, DmlbenchError
from dmlbench.orchestrator.cluster import probe

#: never uploaded with the job: outputs, data, environments, VCS, and common secret files
EXCLUDES = [
    "results/", "data/", "datasets_cache/", ".venv/", "venv/", ".git/", "__pycache__/", "*.pyc",
    ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", "*.ckpt", "*.pt", "*.parquet",
    ".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", "credentials*", ".aws/", ".netrc",
]  # fmt: skip


def package_root() -> Path:
    """The folder holding the ``dmlbench`` package (uploaded as the job's working_dir)."""
    return Path(__file__).resolve().parents[2]


def build_job(args: list[str]) -> dict[str, Any]:
    """Entrypoint and runtime_env of a submitted ``dmlbench <args>`` (pure, for tests)."""
    if not args or args[0] != "sweep":
        raise ConfigError("submit runs a sweep: use `dmlbench submit --address http://HEAD:8265 -- sweep --methods ...`.")
    if any(a == "--address" or a.startswith("--address=") for a in args):
        raise ConfigError("do not pass --address after `--`: inside a Ray Job the sweep joins the job's cluster itself.")
    root = package_root()
    if (root / "pyproject.toml").exists():  # a source checkout: upload it as the working dir
        env: dict[str, Any] = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    else:  # an installed package: upload only the package (never the whole site-packages)
        env = {"py_modules": [str(root / "dmlbench")], "excludes": list(EXCLUDES)}
    return {"entrypoint": "python -m dmlbench.cli " + shlex.join(args), "runtime_env": env}


def submit(address: str, args: list[str]) -> str:
    """Submit the job; returns its id. Unreachable address → one clear sentence."""
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address!r} must be the Ray dashboard URL, e.g. http://HEAD:8265.")
    job = build_job(args)
    probe(address)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        return str(client.submit_job(**job))
    except (ConnectionError, RuntimeError) as err:
        raise DmlbenchError(f"could not submit to {address}: {err}".rstrip(".") + ".") from None


def follow_hint(address: str, job_id: str) -> str:
    return (
        f"submitted job {job_id}\n"
        f"  follow:  ray job logs --address {address} --follow {job_id}\n"
        f"  status:  ray job status --address {address} {job_id}\n"
        f"  stop:    ray job stop --address {address} {job_id}\n"
        f"  progress: dmlbench status <results folder on the cluster's storage>"
    )
