"""``dmlbench status``: trials done / running / pending per cell, and an ETA.

Done trials are the row files; running trials come from each cell's progress file, which the
driver's row writer updates as trials start and end; pending = planned − done − running.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmlbench.errors import DmlbenchError
from dmlbench.orchestrator.spec import SweepSpec
from dmlbench.orchestrator.sweepdir import PROGRESS_DIR
from dmlbench.results import schema, store


@dataclass
class CellStatus:
    sweep_id: str
    cell: str
    phase: str
    planned: int
    done: int
    running: int
    statuses: dict[str, int]
    mean_trial_s: float | None

    @property
    def pending(self) -> int:
        return max(0, self.planned - self.done - self.running)


def sweep_status(results_dir: Path) -> list[CellStatus]:
    """Status of every sweep (``sweep.json``) under ``results_dir`` (or of one sweep folder)."""
    from dmlbench.orchestrator.spec import experiment_name

    root = Path(results_dir)
    specs = [root / "sweep.json"] if (root / "sweep.json").exists() else sorted(root.glob("*/sweep.json"))
    if not specs:
        raise DmlbenchError(
            f"no sweep under {str(root)!r} (no */sweep.json); start one with `dmlbench sweep --methods ... --datasets ...`."
        )
    out: list[CellStatus] = []
    for path in specs:
        spec = SweepSpec.model_validate(json.loads(path.read_text())["spec"])
        rows: list[dict[str, Any]] = []
        try:
            df, _ = store.read_rows(path.parent)
            rows = df.to_dict("records")
        except DmlbenchError:
            pass
        for cell in spec.cells():
            searched = spec.protocol == "mlrc"  # the paper protocol runs recipes: no search phase
            for phase, planned in (("search", spec.trials if searched else 0), ("final", spec.final_seeds)):
                if planned == 0:
                    continue
                # one trial per row, except a final trial of fold models: k fold rows + one
                # concatenated row (protocol ...-concat<k>); count its first row only
                rows_of = [r for r in rows if r[schema.CELL] == cell.key and r[schema.PHASE] == phase
                           and "-concat" not in str(r[schema.PROTOCOL] or "")]  # fmt: skip
                mine = list({r[schema.TRIAL_ID]: r for r in reversed(rows_of)}.values())
                prog = path.parent / PROGRESS_DIR / f"{experiment_name(spec, cell, phase)}.json"
                running = len(json.loads(prog.read_text())["running"]) if prog.exists() else 0
                per_trial: dict[Any, float] = {}  # a trial's time: the sum over its fold-model rows
                for r in rows_of:
                    w = r[schema.WALL_TIME_S]
                    if w is not None and w == w:
                        per_trial[r[schema.TRIAL_ID]] = per_trial.get(r[schema.TRIAL_ID], 0.0) + float(w)
                times = list(per_trial.values())
                counts = {s: sum(r[schema.STATUS] == s for r in mine) for s in schema.STATUSES}
                out.append(CellStatus(spec.sweep_id, cell.key, phase, planned, len(mine), running, counts,
                                      statistics.mean(times) if times else None))  # fmt: skip
    return out


def eta_seconds(cells: list[CellStatus]) -> float | None:
    """Remaining trials × mean trial time ÷ the number running now (at least 1); None if unknown."""
    times = [c.mean_trial_s for c in cells if c.mean_trial_s is not None]
    if not times:
        return None
    remaining = sum(c.pending + c.running for c in cells)
    parallel = max(1, sum(c.running for c in cells))
    return remaining * statistics.mean(times) / parallel


def format_status(cells: list[CellStatus]) -> str:
    head = f"{'sweep':<22} {'cell':<36} {'phase':<6} {'done':>5} {'running':>7} {'pending':>7}  statuses"
    lines = [head, "-" * len(head)]
    for c in cells:
        st = ", ".join(f"{k}={v}" for k, v in c.statuses.items() if v)
        lines.append(f"{c.sweep_id:<22} {c.cell:<36} {c.phase:<6} {c.done:>5} {c.running:>7} {c.pending:>7}  {st}")
    eta = eta_seconds(cells)
    total = sum(c.planned for c in cells)
    done = sum(c.done for c in cells)
    lines.append(f"{done}/{total} trials done; ETA " + (f"{eta / 60:.1f} min" if eta is not None else "unknown"))
    return "\n".join(lines)
