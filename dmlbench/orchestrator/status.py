"""Progress of a sweep: ``dmlbench status``, the live view of a running sweep, and their shared ETA.

Sources, all under the sweep folder: the row files (done trials, the truth), and the progress
files the driver keeps (:func:`dmlbench.orchestrator.sweepdir.write_progress`): per cell phase its
running trials (epoch, latest validation metric) and the start/end of each ended trial; for the
sweep its trial slots (what the cluster can run at once) and start time.

ETA (:func:`eta_seconds`), from measured trial times only. A sweep is one Tune experiment, and Tune
hands an ended trial's process to the next trial of any cell, so a trial either starts cold (a new
process: imports, set-up, seconds) or warm (right where an ended trial of the sweep left off); the
measured start cost is the mean cold trial time minus the mean warm one of the cell phases that have
both. Each cell phase's expected trial time is the mean of its ended trials' times without that start
(else of ended trials of the same phase in other cells; a final phase before any final trial ended
uses the longest ended search trial of its cell, since final trials are never pruned, scaled by the
models each trains: a final seed trains every fold model). Remaining work = the expected rest of
every running trial (a cold one also its start) + pending trials × their expected time + the process
starts still to come (the processes the sweep will run at once, its slots or fewer when fewer trials
are left, less those it has started). ETA = remaining work ÷ (slots × the busy fraction measured so
far), but never less than the longest chain that cannot run in parallel (a running trial's rest; a
cell still searching, then its final phase) plus the experiment's measured wrap-up (last trial end →
``fit`` returned); a running trial past its expected time is expected to run as long as the measured
trials that ran longer. The driver's own wrap-up after the last trial (leaderboard, Ray shutdown) is
counted as half its measured set-up before the experiment (Ray start or join), the one comparable
cost it has measured by then (:data:`WRAPUP_PER_SETUP`).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmlbench.errors import DmlbenchError
from dmlbench.orchestrator.spec import SweepSpec, experiment_name
from dmlbench.orchestrator.sweepdir import SWEEP_PROGRESS, read_progress
from dmlbench.results import schema, store

#: seconds between two plain progress lines when the output is not a terminal
PLAIN_PERIOD_S = 30.0
#: seconds of sweep history before the measured busy fraction is used (1 before)
BUSY_MIN_HISTORY_S = 5.0
#: a trial that starts at most this long after another trial of the sweep ended reused its process
WARM_GAP_S = 0.5
#: the driver's wrap-up after the last trial (leaderboard, ``ray.shutdown``) as a share of its
#: measured set-up (Ray start or join): stopping a local Ray is quicker than starting it. Measured on
#: the 2-core dev box: Ray started in 6.3 s and stopped in 1.4 s; three smoke sweeps had set-ups of
#: 5.0, 5.3 and 8.4 s and wrap-ups of 2.4, 2.4 and 2.2 s (``bench/eta_accuracy.py``)
WRAPUP_PER_SETUP = 0.5


@dataclass
class RunningTrial:
    cell: str
    phase: str
    trial_id: str
    started: float
    epoch: int
    budget: int
    metric: float | None
    #: whether it started on a process an ended trial of the sweep left (Tune reuses it), so
    #: without the process start-up a new one costs
    warm: bool = False


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
    #: driver-clock durations (s) of the ended trials of this cell phase
    durations: list[float] = field(default_factory=list)
    trials: list[RunningTrial] = field(default_factory=list)
    best: float | None = None
    #: when the sweep's experiment ``fit`` returned, and this cell phase's last trial's end (driver
    #: clock; None when not yet)
    closed: float | None = None
    last_end: float | None = None
    #: models one trial trains (search: the search folds; final: the fold models, or 1)
    models: int = 1
    #: per ended trial (as ``durations``): whether it started warm (see :attr:`RunningTrial.warm`);
    #: empty when unknown (every trial then counts as it was measured)
    warm: list[bool] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return max(0, self.planned - self.done - self.running)


@dataclass
class SweepProgress:
    """Everything the ETA and the views need about one sweep at one moment."""

    sweep_id: str
    metric: str
    cells: list[CellStatus]
    slots: int | None
    started: float | None
    now: float
    #: the driver's measured set-up (Ray start or join, resources) before the first experiment
    #: opened; the ETA counts :data:`WRAPUP_PER_SETUP` of it for its wrap-up after the last trial
    #: (leaderboard, Ray shutdown)
    setup_s: float = 0.0
    #: when the driver's latest run ended (None while it runs, or if it never ended cleanly)
    ended: float | None = None

    @property
    def running(self) -> list[RunningTrial]:
        return [t for c in self.cells for t in c.trials]

    def eta_s(self) -> float | None:
        wrapup = 0.0 if self.ended is not None else WRAPUP_PER_SETUP * self.setup_s
        return eta_seconds(self.cells, slots=self.slots, started=self.started, now=self.now, wrapup=wrapup)


def _sweep_specs(results_dir: Path) -> list[Path]:
    root = Path(results_dir)
    specs = [root / "sweep.json"] if (root / "sweep.json").exists() else sorted(root.glob("*/sweep.json"))
    if not specs:
        raise DmlbenchError(
            f"no sweep under {str(root)!r} (no */sweep.json); start one with `dmlbench sweep --methods ... --datasets ...`."
        )
    return specs


def sweep_progress(spec: SweepSpec, folder: Path, rows: list[dict[str, Any]] | None = None,
                   now: float | None = None) -> SweepProgress:  # fmt: skip
    """The progress of one sweep. ``rows``: its rows (``None``: count the trials the progress files
    say ended, which is what the live view does instead of re-reading every row file)."""
    now = time.time() if now is None else now
    sweep = read_progress(folder, SWEEP_PROGRESS)
    cells: list[CellStatus] = []
    from dmlbench.orchestrator.planning import cell_settings, search_folds

    n_search = len(search_folds(spec))
    # each cell phase's progress file, read once (the live view calls this every second)
    progs = {(cell, phase): read_progress(folder, experiment_name(spec, cell, phase))
             for cell in spec.cells() for phase in ("search", "final")}  # fmt: skip
    # every trial end of the sweep: a trial that starts as any of them ends took over its process
    sweep_ends = [float(e["ended"]) for prog in progs.values() for e in (prog.get("ended") or {}).values()
                  if isinstance(e, dict) and _num(e.get("ended"))]  # fmt: skip
    for cell in spec.cells():
        n_final = spec.folds if cell_settings(spec, cell).fold_models else 1
        search_done_without_complete = False
        searched = spec.protocol == "mlrc"  # the paper protocol trains each cell's recipe, no search
        for phase, planned in (("search", spec.trials if searched else 0), ("final", spec.final_seeds)):
            if planned == 0:
                continue
            prog = progs[(cell, phase)]
            ended: dict[str, dict[str, Any]] = {k: v for k, v in (prog.get("ended") or {}).items() if isinstance(v, dict)}
            running = prog.get("running") if isinstance(prog.get("running"), dict) else {}
            budget = int(prog.get("budget") or spec.epochs or 0)
            if rows is not None:
                # one trial per row, except a final trial of fold models: k fold rows + one
                # concatenated row (protocol ...-concat<k>); count its first row only
                rows_of = [r for r in rows if r[schema.CELL] == cell.key and r[schema.PHASE] == phase
                           and "-concat" not in str(r[schema.PROTOCOL] or "")]  # fmt: skip
                mine = list({r[schema.TRIAL_ID]: r for r in reversed(rows_of)}.values())
                statuses = [str(r[schema.STATUS]) for r in mine]
                values = [_metric(r, spec.metric) for r in mine]
                per_trial: dict[Any, float] = {}  # a trial's time: the sum over its fold-model rows
                for r in rows_of:
                    if _num(r.get(schema.WALL_TIME_S)):
                        per_trial[r[schema.TRIAL_ID]] = per_trial.get(r[schema.TRIAL_ID], 0.0) + float(r[schema.WALL_TIME_S])
                walls = list(per_trial.values())
            else:
                statuses = [str(e.get("status")) for e in ended.values()]
                values = [e.get("metric") for e in ended.values()]
                walls = []
            if phase == "final" and search_done_without_complete:
                planned = 0  # no complete search trial: the cell's final phase is skipped
            spans = [(float(e["started"]), float(e["ended"])) for e in ended.values()
                     if _num(e.get("ended")) and _num(e.get("started"))]  # fmt: skip
            durations = [b - a for a, b in spans]
            ends = [b for _, b in spans]
            trials = [RunningTrial(cell.key, phase, tid, float(t.get("started") or now), int(t.get("epoch") or 0),
                                   budget, t.get("metric") if _num(t.get("metric")) else None,
                                   warm=_warm(float(t.get("started") or now), sweep_ends))
                      for tid, t in sorted(running.items())]  # fmt: skip
            done = len(statuses)
            scores = [v for v in values if _num(v)] + [t.metric for t in trials if t.metric is not None]
            best = (max if spec.mode == "max" else min)(scores) if scores else None  # type: ignore[type-var]
            counts = {s: statuses.count(s) for s in schema.STATUSES}
            times = walls or durations
            cells.append(CellStatus(spec.sweep_id, cell.key, phase, planned, min(done, planned) if planned else done,
                                    len(trials), counts, statistics.mean(times) if times else None,
                                    durations or walls, trials, best,
                                    closed=_time(prog.get("closed")), last_end=max(ends, default=None),
                                    models=n_search if phase == "search" else n_final,
                                    warm=[_warm(a, sweep_ends) for a, _ in spans] if durations else []))  # fmt: skip
            if phase == "search":
                search_done_without_complete = done >= planned and counts["complete"] == 0
    slots = sweep.get("slots")
    started = sweep.get("started")
    begun, setup, finished = _time(started), _time(sweep.get("setup_s")), _time(sweep.get("ended"))
    return SweepProgress(spec.sweep_id, spec.metric, cells, int(slots) if _num(slots) else None, begun, now,
                         setup or 0.0, finished if begun is not None and finished is not None and finished >= begun else None)  # fmt: skip


def sweep_status(results_dir: Path) -> list[CellStatus]:
    """Status of every sweep (``sweep.json``) under ``results_dir`` (or of one sweep folder)."""
    return [c for p in progress_of(results_dir) for c in p.cells]


def progress_of(results_dir: Path) -> list[SweepProgress]:
    out = []
    for path in _sweep_specs(results_dir):
        spec = SweepSpec.model_validate(json.loads(path.read_text())["spec"])
        rows: list[dict[str, Any]] = []
        try:
            df, _ = store.read_rows(path.parent)
            rows = [r for r in df.to_dict("records") if r[schema.SWEEP_ID] == spec.sweep_id]
        except DmlbenchError:
            pass
        out.append(sweep_progress(spec, path.parent, rows))
    return out


def _warm(started: float, ends: list[float]) -> bool:
    """Whether a trial that started at ``started`` took over the process of a trial of the sweep
    that ended just before (Tune's actor reuse starts the next trial within tens of ms;
    a new process takes seconds to start)."""
    return any(0.0 <= started - e <= WARM_GAP_S for e in ends)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _time(v: Any) -> float | None:
    return float(v) if _num(v) else None


def _metric(row: dict[str, Any], metric: str) -> float | None:
    v = row.get(metric)
    if _num(v):
        return float(v)
    try:
        m = json.loads(row.get(schema.METRICS_JSON) or "{}").get(metric)
    except (TypeError, ValueError):
        return None
    return float(m) if _num(m) else None


def _start_cost(cells: list[CellStatus]) -> float:
    """Measured cost of starting a trial's process: over the cell phases that have both, the mean
    time of their cold trials (a new process) minus that of their warm ones (a reused process);
    0 until one has both."""
    gaps = []
    for c in cells:
        if len(c.warm) != len(c.durations):
            continue
        cold = [d for d, w in zip(c.durations, c.warm) if not w]
        warm = [d for d, w in zip(c.durations, c.warm) if w]
        if cold and warm:
            gaps.append(statistics.mean(cold) - statistics.mean(warm))
    return max(0.0, statistics.mean(gaps)) if gaps else 0.0


def _work_times(c: CellStatus, start: float) -> list[float]:
    """The cell phase's measured trial times without their process start (a cold trial's time minus
    ``start``, never below a tenth of it)."""
    if len(c.warm) != len(c.durations):
        return list(c.durations)
    return [d if w else max(d - start, 0.1 * d) for d, w in zip(c.durations, c.warm)]


def _expected(c: CellStatus, cells: list[CellStatus], start: float = 0.0) -> float | None:
    """Expected time of one trial of the cell phase ``c`` on a process that already runs (see the
    module doc); ``start``: the measured process start, taken out of cold trials' times."""
    own = _work_times(c, start)
    if own:
        return statistics.mean(own)
    same = [d for o in cells if o.phase == c.phase for d in _work_times(o, start)]
    if same:
        return statistics.mean(same)
    if c.phase == "final":
        search = [(d, o.models) for o in cells if o.cell == c.cell and o.phase == "search" for d in _work_times(o, start)]
        if search:  # the longest search trial (never pruned), per model, times the final trial's models
            d, n = max(search)
            return d * c.models / max(n, 1)
    anything = [d for o in cells for d in _work_times(o, start)]
    return statistics.mean(anything) if anything else None


def _starts_to_come(cells: list[CellStatus], slots: int | None) -> float:
    """Processes the sweep is expected to start still: as many as it will run at once (its slots, or
    the trials left if fewer) less those it started (its cold trials); each ended trial's process
    is handed to the next trial of any cell."""
    left = sum(c.pending + len(c.trials) for c in cells)
    started = sum(c.warm.count(False) if len(c.warm) == len(c.durations) else len(c.durations) for c in cells)
    started += sum(1 for c in cells for t in c.trials if not t.warm)
    at_once = min(slots, left) if slots else left
    return float(max(0, at_once - started))


def eta_seconds(cells: list[CellStatus], slots: int | None = None, started: float | None = None,
                now: float | None = None, wrapup: float = 0.0) -> float | None:  # fmt: skip
    """Seconds until the sweep ends: every planned trial ended, plus ``wrapup`` (the driver's
    work after the last trial; pass 0 once the driver ended); None while no trial has ended yet
    (nothing measured). See the module doc for the model."""
    now = time.time() if now is None else now
    closing = _closing_lag(cells)
    if not any(c.pending or c.trials for c in cells):
        return wrapup  # every trial ended: the driver's wrap-up is left (0 once it ended)
    start = _start_cost(cells)
    to_come = _starts_to_come(cells, slots)
    work = to_come * start
    chain = 0.0
    for c in cells:
        exp = _expected(c, cells, start)
        if exp is None:
            if c.pending or c.trials:
                return None
            continue
        rests = [_rest(now - t.started, exp + (0.0 if t.warm else start), c.durations) for t in c.trials]
        work += sum(rests) + c.pending * exp
        if not (c.pending or c.trials):
            continue
        # a cell phase not running yet starts on a new process only while the sweep starts some
        tail = max(rests, default=0.0) if c.trials else exp + (start if to_come else 0.0)
        if c.phase == "search":
            final = next((f for f in cells if f.cell == c.cell and f.phase == "final"), None)
            if final is not None and final.planned:
                tail += _expected(final, cells, start) or 0.0  # on a process an ended trial leaves
        chain = max(chain, tail + closing)
    running_now = sum(len(c.trials) for c in cells)
    capacity = float(slots) if slots else float(max(1, running_now))
    capacity *= _busy_fraction(cells, capacity, started, now)
    return max(work / max(capacity, 1e-9), chain) + wrapup


def _rest(elapsed: float, expected: float, durations: list[float]) -> float:
    """Expected remaining time of a trial running for ``elapsed`` s: the expected time minus what
    ran; once it ran longer than that, the mean remaining time of the measured trials that ran
    longer still (their durations minus ``elapsed``), else a twentieth of the expected time."""
    if elapsed < expected:
        return expected - elapsed
    longer = [d - elapsed for d in durations if d > elapsed]
    return statistics.mean(longer) if longer else 0.05 * expected


def _closing_lag(cells: list[CellStatus]) -> float:
    """Measured wrap-up of the sweep's experiment (its last trial's end to ``fit`` returned: Tune's
    clean-up, the rows), from a run of the driver that got that far (a resumed sweep); 0 until then.
    (Its start-up is not measurable apart from the wait for a free slot, which the busy fraction
    already counts.)"""
    closed = [c.closed for c in cells if c.closed is not None]
    ends = [c.last_end for c in cells if c.last_end is not None]
    if not closed or not ends or max(closed) < max(ends):
        return 0.0
    return max(closed) - max(ends)


def _busy_fraction(cells: list[CellStatus], capacity: float, started: float | None, now: float) -> float:
    """Measured share of the slots that trials kept busy since the sweep started (gaps between
    trials, scheduling; used as soon as a trial ended, which the ETA needs anyway); never below 0.5."""
    if started is None or now - started < BUSY_MIN_HISTORY_S:
        return 1.0
    busy = sum(sum(c.durations) for c in cells) + sum(now - t.started for c in cells for t in c.trials)
    return min(1.0, max(0.5, busy / (capacity * (now - started))))


def sweep_eta(progress: list[SweepProgress]) -> float | None:
    """ETA of several sweeps (each with its own slots): the longest; None if any is unknown."""
    etas = [p.eta_s() for p in progress]
    if any(e is None for e in etas):
        return None
    return max((e for e in etas if e is not None), default=0.0)


def format_eta(eta: float | None) -> str:
    if eta is None:
        return "unknown (no trial ended yet)"
    return f"{eta / 60:.1f} min" if eta >= 60 else f"{eta:.0f} s"


def format_status(cells: list[CellStatus], progress: list[SweepProgress] | None = None) -> str:
    head = f"{'sweep':<22} {'cell':<36} {'phase':<6} {'done':>5} {'running':>7} {'pending':>7}  statuses"
    lines = [head, "-" * len(head)]
    for c in cells:
        st = ", ".join(f"{k}={v}" for k, v in c.statuses.items() if v)
        lines.append(f"{c.sweep_id:<22} {c.cell:<36} {c.phase:<6} {c.done:>5} {c.running:>7} {c.pending:>7}  {st}")
    eta = sweep_eta(progress) if progress is not None else eta_seconds(cells)
    total = sum(c.planned for c in cells)
    done = sum(c.done for c in cells)
    lines.append(f"{done}/{total} trials done; ETA {format_eta(eta)}")
    return "\n".join(lines)


def summary_line(p: SweepProgress) -> str:
    """One plain line: trials done / running / pending, cells per phase, ETA."""
    done = sum(c.done for c in p.cells)
    total = sum(c.planned for c in p.cells)
    running = sum(c.running for c in p.cells)
    searching = sum(1 for c in p.cells if c.phase == "search" and (c.running or c.pending))
    finals = sum(1 for c in p.cells if c.phase == "final" and c.running)
    return (f"[{time.strftime('%H:%M:%S')}] {done}/{total} trials done, {running} running "
            f"({searching} cell(s) searching, {finals} in final); ETA {format_eta(p.eta_s())}")  # fmt: skip


class LiveView:
    """What a running sweep shows: on a terminal a rich live table (running trials with cell,
    epoch/budget and latest validation metric; per cell done/running/pending and best so far; the
    sweep ETA), refreshed by :meth:`update`; otherwise one plain line every :data:`PLAIN_PERIOD_S`.
    Event lines (a cell's search ended, its final phase started) go through :meth:`say` either way."""

    def __init__(self, spec: SweepSpec, folder: Path, echo: Any, interactive: bool | None = None):
        self.spec, self.folder, self.echo = spec, folder, echo
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.live: Any = None
        self.last_plain = time.time()
        if self.interactive:
            from rich.live import Live

            self.live = Live(auto_refresh=False, transient=False)
            self.live.start()

    def say(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, highlight=False, soft_wrap=True)
        else:
            self.echo(text)

    def update(self, force: bool = False) -> None:
        p = sweep_progress(self.spec, self.folder)
        if self.live is not None:
            self.live.update(render(p), refresh=True)
        elif force or time.time() - self.last_plain >= PLAIN_PERIOD_S:
            self.last_plain = time.time()
            self.echo(summary_line(p))

    def close(self) -> None:
        if self.live is not None:
            self.update()
            self.live.stop()
            self.live = None


def render(p: SweepProgress) -> Any:
    """The rich renderable of the live view."""
    from rich.console import Group
    from rich.table import Table

    cells = Table(title=f"sweep {p.sweep_id}", title_justify="left", expand=False)
    for col in ("cell", "phase", "done", "running", "pending", f"best {p.metric}"):
        cells.add_column(col, justify="left" if col in ("cell", "phase") else "right")
    for c in p.cells:
        cells.add_row(c.cell, c.phase, str(c.done), str(c.running), str(c.pending),
                      f"{c.best:.4f}" if c.best is not None else "-")  # fmt: skip
    trials = Table(title="running trials", title_justify="left", expand=False)
    for col in ("cell", "phase", "trial", "epoch", f"val {p.metric}", "time"):
        trials.add_column(col, justify="left" if col in ("cell", "phase", "trial") else "right")
    for t in p.running:
        trials.add_row(t.cell, t.phase, t.trial_id, f"{t.epoch}/{t.budget}",
                       f"{t.metric:.4f}" if t.metric is not None else "-", f"{p.now - t.started:.0f} s")  # fmt: skip
    done = sum(c.done for c in p.cells)
    total = sum(c.planned for c in p.cells)
    return Group(cells, trials, f"{done}/{total} trials done; ETA {format_eta(p.eta_s())}")
