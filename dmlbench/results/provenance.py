"""Provenance of a result row: package versions, git sha, GPU model and count (no hostname)."""

from __future__ import annotations

import functools
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

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


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit of the checkout the package runs from, or ``"unknown"`` (installed wheel, no git)."""
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and len(sha) == 40 else "unknown"


def gpu_info() -> tuple[str, int]:
    """``(model, count)`` of the visible CUDA devices, or ``("cpu", 0)``."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return torch.cuda.get_device_name(0), int(torch.cuda.device_count())
    except Exception:
        return "cpu", 0
    return "cpu", 0
