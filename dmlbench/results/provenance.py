"""Provenance of a result row: package versions, git sha (+ dirty flag), GPU model and count (no hostname).

:func:`machine_facts` is what a trial reads on the worker that runs it (DESIGN §4: machine facts are
read by the trial, not by the driver), so a GPU-less head node never stamps ``cpu`` on GPU rows.
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "dmlbench",
    "torch",
    "torchvision",
    "timm",
    "ray",
    "optuna",
    "pytorch-metric-learning",
    "faiss-cpu",
    "faiss-gpu-cu12",
    "numba",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic",
)


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the results (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def package_versions_json() -> str:
    return json.dumps(package_versions(), sort_keys=True)


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    here = Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, bool | None]:
    """``(sha, dirty)`` of the checkout the package runs from; ``("unknown", None)`` outside one
    (installed wheel, no git). ``dirty``: tracked files differ from the commit."""
    res = _git("rev-parse", "HEAD")
    sha = res.stdout.strip() if res is not None and res.returncode == 0 else ""
    if len(sha) != 40:
        return "unknown", None
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return sha, dirty


def git_sha() -> str:
    """The commit of the checkout the package runs from, or ``"unknown"``."""
    return git_state()[0]


def machine_facts(device: str) -> dict[str, Any]:
    """Provenance of the machine running a trial, read where the trial runs.

    Args:
        device: the torch device type the trial trains on (``"cuda"`` or ``"cpu"``): a CPU trial
            on a GPU node records ``cpu``.
    """
    gpu_type, gpu_count = gpu_info() if device == "cuda" else ("cpu", 0)
    sha, dirty = git_state()
    return {"gpu_type": gpu_type, "gpu_count": gpu_count, "package_versions": package_versions(),
            "git_sha": sha, "git_dirty": dirty}  # fmt: skip


def gpu_info() -> tuple[str, int]:
    """``(model, count)`` of the visible CUDA devices, or ``("cpu", 0)``."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return torch.cuda.get_device_name(0), int(torch.cuda.device_count())
    except Exception:
        return "cpu", 0
    return "cpu", 0
