"""The files of one sweep folder (``<output>/<sweep id>/``) that the driver owns: ``sweep.json``
(the spec a resumed sweep must match) and ``progress/`` (which trials run now, for ``dmlbench status``).
Rows (``rows/``) belong to :mod:`dmlbench.results.store`, Tune state (``tune/``) to Tune.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from dmlbench.errors import ConfigError, DmlbenchError
from dmlbench.orchestrator.spec import SweepSpec

SPEC_FILE = "sweep.json"
PROGRESS_DIR = "progress"
#: name of the sweep-wide progress file (cell phase files are named after the phase's study)
SWEEP_PROGRESS = "_sweep"

log = logging.getLogger(__name__)


def sweep_dir(spec: SweepSpec) -> Path:
    return Path(spec.output).expanduser() / spec.sweep_id


def check_resume(spec: SweepSpec, resume: bool, force: bool) -> SweepSpec:
    """Compare with ``sweep.json`` of an existing sweep; refuse a changed spec unless ``force``.

    ``--resume`` without ``--name`` resumes the newest sweep under ``--output``.
    Returns the spec to run (with the resumed sweep's name when one was picked).
    """
    out = Path(spec.output).expanduser()
    if resume and spec.name is None and not (sweep_dir(spec) / SPEC_FILE).exists():
        found = sorted(out.glob(f"*/{SPEC_FILE}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise DmlbenchError(f"--resume: no sweep under {str(out)!r} to resume; drop --resume to start one.")
        spec = spec.model_copy(update={"name": found[-1].parent.name})
    path = sweep_dir(spec) / SPEC_FILE
    if not path.exists():
        if resume:
            raise DmlbenchError(f"--resume: no sweep {spec.sweep_id!r} under {str(out)!r}; drop --resume to start it.")
        return spec
    stored = json.loads(path.read_text())
    old = SweepSpec.model_validate(stored["spec"])
    changes = [c for c in spec.diff(old) if not c.startswith("search_space_digests:")]
    old_digests = stored.get("search_space_digests") or {}
    for method, digest in spec.space_digests().items():
        if method in old_digests and old_digests[method] != digest:
            changes.append(f"the search space of {method} changed since the sweep started")
    if changes and not force:
        raise ConfigError(
            f"sweep {spec.sweep_id!r} already exists with a different spec ({'; '.join(changes)}); "
            "rerun with the old options, pick a new --name, or pass --force to continue it with the new spec."
        )
    return spec


def write_spec(spec: SweepSpec) -> None:
    d = sweep_dir(spec)
    d.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"sweep_id": spec.sweep_id, "spec_hash": spec.spec_hash(), "spec": spec.model_dump(mode="json"),
                       "search_space_digests": spec.space_digests()}, indent=2, sort_keys=True)  # fmt: skip
    tmp = d / f".{SPEC_FILE}.tmp"
    tmp.write_text(text)
    os.replace(tmp, d / SPEC_FILE)


def write_progress(sweep_path: Path, name: str, state: dict[str, Any]) -> None:
    """Atomically write ``progress/<name>.json``: ``state`` (JSON values) plus the time it was written.

    Per cell phase (by :class:`~dmlbench.orchestrator.experiment.RowCallback`): cell, phase, planned
    trials, epoch budget, running trials (``{id: {started, epoch, metric}}``) and ended ones
    (``{id: {started, ended, status, metric}}``) and, once the sweep's ``fit`` returned, when (``closed``);
    times on the driver's clock. :data:`SWEEP_PROGRESS` (by the scheduler): the sweep's trial slots,
    start time and the seconds the driver took to start or join Ray; ``ended`` once the driver's
    run ended (by ``sweep.run``).
    """
    d = sweep_path / PROGRESS_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.json.tmp"
    tmp.write_text(json.dumps({**state, "updated": time.time()}))
    os.replace(tmp, d / f"{name}.json")


def read_progress(sweep_path: Path, name: str) -> dict[str, Any]:
    """What :func:`write_progress` wrote (``{}`` when nothing or an unreadable file)."""
    try:
        data = json.loads((sweep_path / PROGRESS_DIR / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stamp_progress(sweep_path: Path, name: str, key: str, *, only_if: str | None = None) -> None:
    """Add ``key``: the time now to ``progress/<name>.json``, keeping the rest of it; with
    ``only_if``, only when the file already has that key. A failed write (full disk) is logged, not
    raised: progress files feed only the live view and the ETA."""
    state = read_progress(sweep_path, name)
    if only_if is not None and state.get(only_if) is None:
        return
    state.pop("updated", None)
    try:
        write_progress(sweep_path, name, {**state, key: time.time()})
    except OSError as err:
        log.warning("progress/%s.json not written (%s)", name, err)
