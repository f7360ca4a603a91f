"""Values of the derived row columns: ``config_digest`` and ``history_json`` (schema version 2).

Pure functions on plain JSON values (no pandas, no Ray), so the orchestrator's row builder and the
readers compute them the same way.

* :func:`config_digest`: which trained model a row belongs to. Rows of one sweep cell that differ
  only in seed, fold, phase or where they ran (paths, device, loader workers, evaluation chunking)
  share the digest; any other change of the resolved config (a hyper-parameter, the epochs, the
  image size...) gives another digest. The leaderboard groups by it, so rows trained with different
  settings are never averaged as if they were seeds.
* :func:`encode_history` / :func:`decode_history`: the validation metrics of every evaluated epoch
  of a run (the learning curve of the report).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

#: TrialConfig keys that say how or where a run happened, not what was trained: left out of the digest
RUN_ONLY_KEYS: frozenset[str] = frozenset(
    {
        "seed",
        "fold",
        "phase",
        "output_dir",
        "data_root",
        "device",
        "num_workers",
        "eval_batch_size",
        "eval_chunk",
        "knn_backend",
        "progress",
    }
)
DIGEST_CHARS = 12
#: the key of the epoch in every history entry
EPOCH = "epoch"


def config_digest(config: Any) -> str | None:
    """Digest of a resolved TrialConfig without :data:`RUN_ONLY_KEYS` (12 hex characters of SHA-256).

    Args:
        config: the config as a dict or as its JSON text (the ``config_json`` column); anything
            else (None, NaN from an empty pandas cell, empty or unparsable text) gives None.

    Example:
        >>> a = config_digest({"method": "ccp", "lr": 1e-5, "seed": 0, "output_dir": "/tmp/a"})
        >>> a == config_digest('{"seed": 7, "lr": 1e-05, "method": "ccp", "output_dir": "/x"}')
        True
        >>> a == config_digest({"method": "ccp", "lr": 2e-5, "seed": 0}), len(a)
        (False, 12)
    """
    if isinstance(config, str):
        if not config.strip():
            return None
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            return None
    if not isinstance(config, Mapping):
        return None
    kept = {k: v for k, v in config.items() if k not in RUN_ONLY_KEYS}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGEST_CHARS]


def encode_history(reports: Iterable[Mapping[str, Any]], metrics: Iterable[str], epoch_key: str = EPOCH) -> str:
    """JSON of a run's learning curve: one ``{"epoch": e, metric: value, ...}`` per validation.

    Args:
        reports: the run's per-epoch reports in order, each with its epoch under ``epoch_key``;
            reports without any of ``metrics`` (e.g. a loss-only report) are left out, and a later
            report of the same epoch replaces an earlier one (a trial resumed from a checkpoint
            repeats epochs).
        metrics: the metric names to keep (e.g. ``schema.METRIC_COLUMNS``); non-finite values are dropped.
        epoch_key: the key of the epoch in ``reports`` (the Ray trainable reports ``trial_epoch``);
            the history always stores it as ``"epoch"``.

    Example:
        >>> encode_history([{"epoch": 0, "map_at_r": 0.1, "loss": 3.0}, {"epoch": 1, "map_at_r": 0.2}],
        ...                ["map_at_r"])
        '[{"epoch": 0, "map_at_r": 0.1}, {"epoch": 1, "map_at_r": 0.2}]'
    """
    keep = tuple(metrics)
    by_epoch: dict[int, dict[str, Any]] = {}
    for rep in reports:
        epoch = rep.get(epoch_key)
        if epoch is None or not _finite(epoch):
            continue
        vals = {m: float(rep[m]) for m in keep if _finite(rep.get(m))}
        if vals:
            by_epoch[int(epoch)] = {EPOCH: int(epoch), **vals}
    return json.dumps([by_epoch[e] for e in sorted(by_epoch)])


def decode_history(text: Any) -> list[dict[str, float]]:
    """The entries of a ``history_json`` cell, sorted by epoch; NULL / empty / invalid gives ``[]``.

    Example:
        >>> decode_history('[{"epoch": 2, "map_at_r": 0.3}, {"epoch": 1, "map_at_r": 0.2}]')
        [{'epoch': 1, 'map_at_r': 0.2}, {'epoch': 2, 'map_at_r': 0.3}]
        >>> decode_history(None), decode_history("not json")
        ([], [])
    """
    if not isinstance(text, str) or not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(data, list):
        return []
    entries = [e for e in data if isinstance(e, dict) and isinstance(e.get(EPOCH), (int, float))]
    return sorted(entries, key=lambda e: e[EPOCH])


def _finite(v: Any) -> bool:
    if isinstance(v, bool) or v is None:
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
