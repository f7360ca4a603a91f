"""Shared builders of small result-row fixtures for the leaderboard / report / reproduce tests.

Rows are written the way sweeps write them (``results.store.write_row`` into
``<results>/<sweep>/rows/``). Every metric value is a plain literal here, so the tests can recompute
the expected leaderboard numbers independently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dmlbench.results import schema, store


def make_row(row_id: str, **kw: Any) -> dict[str, Any]:
    """A valid schema row with sensible defaults; keyword arguments override columns."""
    row: dict[str, Any] = {
        schema.ROW_ID: row_id,
        schema.SWEEP_ID: "sw1",
        schema.SOURCE: "dmlbench",
        schema.METHOD: "ccp",
        schema.DATASET: "cub200",
        schema.BACKBONE: "resnet50",
        schema.EMBEDDING_DIM: 128,
        schema.PROTOCOL: "cv4-val-select",
        schema.PHASE: "final",
        schema.STATUS: "complete",
        schema.SCHEMA_VERSION_COL: schema.SCHEMA_VERSION,
        schema.GPU_TYPE: "NVIDIA H200",
        schema.GPU_COUNT: 1,
        schema.GIT_SHA: "unknown",
    }
    row.update(kw)
    row.setdefault(schema.CELL, f"{row[schema.METHOD]}/{row[schema.DATASET]}/{row[schema.BACKBONE]}")
    row.setdefault(schema.EVAL_SPLIT, "test" if row[schema.PHASE] == "final" else "val")
    return row


# final-phase metric values per (method, seed): map_at_r, recall_at_1, recall_at_2, recall_at_4,
# recall_at_8, precision_at_1, r_precision, nmi, gpu_hours
FINAL_VALUES: dict[str, list[tuple[float, ...]]] = {
    "ccp": [
        (0.26, 0.68, 0.78, 0.86, 0.91, 0.68, 0.37, 0.70, 1.0),
        (0.28, 0.70, 0.79, 0.87, 0.92, 0.70, 0.38, 0.71, 1.5),
        (0.27, 0.69, 0.80, 0.85, 0.93, 0.69, 0.36, 0.75, 2.0),
    ],
    "diva": [(0.25, 0.66, 0.77, 0.84, 0.90, 0.66, 0.35, 0.69, 3.0)],
    "proxyanchor": [
        (0.24, 0.67, 0.76, 0.83, 0.89, 0.67, 0.34, 0.68, 0.5),
        (0.22, 0.65, 0.74, 0.82, 0.88, 0.65, 0.33, 0.66, 0.5),
    ],
}
FINAL_METRICS = (
    "map_at_r",
    "recall_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
    "precision_at_1",
    "r_precision",
    "nmi",
)
# search trials per method: (status, params, map_at_r, recall_at_1, gpu_hours)
SEARCH_TRIALS: dict[str, list[tuple[str, dict[str, Any], float | None, float | None, float]]] = {
    "ccp": [
        ("complete", {"lam": 1e-4, "proxies_per_class": 2, "base_loss": "c2"}, 0.30, 0.71, 0.2),
        ("complete", {"lam": 1e-2, "proxies_per_class": 8, "base_loss": "ms"}, 0.34, 0.75, 0.2),
        ("pruned", {"lam": 1e-3, "proxies_per_class": 4, "base_loss": "c1"}, 0.20, 0.60, 0.1),
        ("complete", {"lam": 1e-5, "proxies_per_class": 1, "base_loss": "c2"}, 0.29, 0.70, 0.2),
        ("diverged", {"lam": 1e-1, "proxies_per_class": 16, "base_loss": "triplet"}, None, None, 0.05),
        ("complete", {"lam": 3e-3, "proxies_per_class": 6, "base_loss": "ms"}, 0.33, 0.74, 0.2),
        ("complete", {"lam": 5e-4, "proxies_per_class": 3, "base_loss": "triplet"}, 0.31, 0.72, 0.2),
    ],
    "diva": [
        ("complete", {"alpha": 0.3, "rho": 100}, 0.28, 0.69, 0.4),
        ("complete", {"alpha": 0.1, "rho": 500}, 0.31, 0.72, 0.4),
        ("failed", {"alpha": 0.5, "rho": 1000}, None, None, 0.0),
        ("complete", {"alpha": 0.2, "rho": 300}, 0.30, 0.71, 0.4),
    ],
    "proxyanchor": [
        ("complete", {"alpha": 32.0, "delta": 0.1}, 0.27, 0.70, 0.1),
        ("complete", {"alpha": 16.0, "delta": 0.2}, 0.26, 0.69, 0.1),
        ("complete", {"alpha": 48.0, "delta": 0.05}, 0.28, 0.71, 0.1),
    ],
}


def _history(status: str, final: float | None) -> str:
    """A learning curve ending at ``final`` MAP@R: 4 validations, 2 for pruned trials, none without a value."""
    if final is None:
        return json.dumps([])
    epochs = 2 if status == "pruned" else 4
    return json.dumps([{"epoch": e, "map_at_r": final * (e + 1) / epochs} for e in range(epochs)])


def fixture_rows() -> list[dict[str, Any]]:
    """All rows of the standard fixture: cub200 final + search rows of three methods, one SOP row."""
    rows: list[dict[str, Any]] = []
    for method, seeds in FINAL_VALUES.items():
        for seed, values in enumerate(seeds):
            metrics = dict(zip(FINAL_METRICS, values[:-1], strict=True))
            rows.append(
                make_row(
                    f"sw1-{method}-final-s{seed}",
                    method=method,
                    seed=seed,
                    gpu_hours=values[-1],
                    wall_time_s=values[-1] * 3600.0,
                    params_json=json.dumps({}),
                    created_at=f"2025-01-02T00:00:{seed:02d}Z",
                    **metrics,
                )
            )
    # a failed final run never enters the mean
    rows.append(
        make_row("sw1-ccp-final-s9", seed=9, status="failed", error="boom", map_at_r=0.99, gpu_hours=0.25)
    )
    for method, trials in SEARCH_TRIALS.items():
        for i, (status, params, mapr, r1, hours) in enumerate(trials):
            rows.append(
                make_row(
                    f"sw1-{method}-search-t{i:03d}",
                    method=method,
                    phase="search",
                    status=status,
                    trial_id=f"t{i:03d}",
                    fold=0,
                    seed=i,
                    params_json=json.dumps(params),
                    map_at_r=mapr,
                    recall_at_1=r1,
                    precision_at_1=r1,
                    gpu_hours=hours,
                    wall_time_s=hours * 3600.0,
                    history_json=_history(status, mapr),
                    created_at=f"2025-01-01T00:{i:02d}:00Z",
                )
            )
    rows.append(
        make_row(
            "sw1-ccp-sop-final-s0",
            dataset="sop",
            seed=0,
            map_at_r=0.45,
            recall_at_1=0.78,
            recall_at_10=0.90,
            recall_at_100=0.96,
            recall_at_1000=0.99,
            precision_at_1=0.78,
            r_precision=0.50,
            nmi=0.90,
            gpu_hours=4.0,
        )
    )
    return rows


def write_fixture(results_dir: Path, rows: list[dict[str, Any]] | None = None, sweep: str = "sw1") -> Path:
    """Write the rows under ``<results_dir>/<sweep>/rows/`` with the store; returns ``results_dir``."""
    rows_dir = Path(results_dir) / sweep / store.ROWS_DIR
    for row in rows if rows is not None else fixture_rows():
        store.write_row(rows_dir, row)
    return Path(results_dir)
