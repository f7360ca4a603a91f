"""Shared test settings: CPU, few threads, small data."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

#: a trial config for a seconds-long CPU run on the embedded digits data
TINY: dict[str, object] = {
    "dataset": "digits",
    "backbone": "tiny",
    "pretrained": False,
    "image_size": 16,
    "embedding_dim": 32,
    "bn_policy": "train",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "epochs": 2,
    "iters_per_epoch": 3,
    "classes_per_batch": 4,
    "samples_per_class": 4,
    "num_folds": 3,
    "eval_batch_size": 512,
    "progress": False,
}


@pytest.fixture
def tiny_cfg() -> dict[str, object]:
    return dict(TINY)


@pytest.fixture(scope="module")
def ray_tmpdir() -> Iterator[str]:
    """A private, short folder for Ray's temp files: set it as ``RAY_TMPDIR`` of a subprocess that
    starts Ray (or pass it as ``_temp_dir``), so no test follows or leaves /tmp/ray's pointer.
    Short, because Ray's Unix socket paths live under it (about 107 characters at most)."""
    path = tempfile.mkdtemp(prefix="dmlt-ray-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End a test process that loaded Ray's native core with ``os._exit``, once pytest has printed
    its summary and written its files, keeping pytest's exit status.

    Why: once, in a full run, after every test had passed, Ray's C++ logger reported
    ``[ray_log_sink] Failed writing to file <the last Ray test's private temp dir>/…/python-core-driver-….log:
    Bad file descriptor`` and the interpreter segfaulted at exit, so ``make test`` failed (the Ray
    tests remove their temp dirs after ``ray.shutdown()``; not reproduced since). ``os._exit`` skips
    only the interpreter's teardown (atexit handlers and native destructors): every test has ended,
    and the tests shut Ray down themselves."""
    import sys

    if "ray._raylet" not in sys.modules or not _EXIT_STATUS:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
