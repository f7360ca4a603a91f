"""``dmlbench report``: one self-contained HTML page (plots embedded as base64 PNG) for a results folder.

Sections (``SECTION_IDS``):

* leaderboards: the tables of ``dmlbench leaderboard`` (one per dataset, sweep and protocol), with
  the legend that says what ± means; they wrap to the page width (no horizontal scrolling);
* search progress: per dataset and sweep, the best-so-far validation metric vs trial number (integer
  axis), a line per cell;
* learning curves: per cell of each sweep, every search trial's validation metric per epoch (from the
  rows' ``history_json``), coloured by how the trial ended;
* importance: Optuna's fANOVA per cell, only with at least :data:`MIN_TRIALS_FOR_IMPORTANCE` complete
  trials (fewer give noise); the page says how many each cell has;
* seed spread: per dataset, sweep and protocol, each final seed's test metric per line;
* cost: accuracy vs cost, only where cost was measured: GPU-hours when the trials had GPUs, else the
  trials' wall-clock hours on CPU, labelled as such; never a mix of the two on one axis.

Every plot can also be written as a PNG file (``--png DIR``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dmlbench.results import leaderboard as lbm
from dmlbench.results import schema
from dmlbench.results.fields import decode_history

SECTION_IDS = ("leaderboards", "search-progress", "learning-curves", "importance", "seed-spread", "cost")
#: fANOVA on fewer complete trials than this attributes noise; the report says so instead
MIN_TRIALS_FOR_IMPORTANCE = 10
#: line colour of a trial in the learning curves, by its row status
STATUS_COLOURS = {"complete": "#1f77b4", "pruned": "#999999", "diverged": "#d62728", "failed": "#d62728"}
_SLUG = re.compile(r"[^A-Za-z0-9-]+")


@dataclass
class Plot:
    """One figure: a file-safe name, a caption, and the PNG bytes."""

    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    """A report section: its plots and HTML fragments (tables, notes)."""

    id: str
    title: str
    plots: list[Plot] = field(default_factory=list)
    html_parts: list[str] = field(default_factory=list)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _name(*parts: str) -> str:
    return "-".join(_SLUG.sub("_", p).strip("_") for p in parts if p)


def best_so_far(values: Sequence[float]) -> list[float]:
    """Running maximum, ignoring NaN (NaN until the first finite value).

    Example:
        >>> best_so_far([0.2, float("nan"), 0.1, 0.5, 0.3])
        [0.2, 0.2, 0.2, 0.5, 0.5]
    """
    out: list[float] = []
    best = math.nan
    for v in values:
        if v is not None and not math.isnan(v) and (math.isnan(best) or v > best):
            best = float(v)
        out.append(best)
    return out


def _order_trials(df: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in (schema.CREATED_AT, schema.TRIAL_ID, schema.ROW_ID) if c in df.columns]
    return df.sort_values(keys, na_position="last", kind="mergesort")


def _search_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[(rows[schema.SOURCE] == "dmlbench") & (rows[schema.PHASE] == "search")]


def _sweep_label(sweep: Any) -> str:
    return "–" if sweep is None or (not isinstance(sweep, str) and pd.isna(sweep)) else str(sweep)


def _integer_axis(ax: Any, axis: str = "x") -> None:
    """Whole-number ticks only (trial numbers, epochs)."""
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def search_progress_plots(rows: pd.DataFrame, metric: str) -> list[Plot]:
    """One plot per (dataset, sweep): best-so-far validation ``metric`` vs trial number, a line per cell."""
    search = _search_rows(rows)
    plots: list[Plot] = []
    keys = [schema.DATASET, schema.SWEEP_ID]
    for (ds, sweep), dgrp in sorted(search.groupby(keys, dropna=False), key=lambda kv: str(kv[0])):
        fig, ax = plt.subplots(figsize=(7, 4))
        n_max = 0
        for (method, backbone), cgrp in sorted(dgrp.groupby([schema.METHOD, schema.BACKBONE], dropna=False)):
            cgrp = _order_trials(cgrp)
            vals = [
                (float(v) if s == "complete" and v is not None and not pd.isna(v) else math.nan)
                for v, s in zip(cgrp[metric], cgrp[schema.STATUS], strict=True)
            ]
            x = np.arange(1, len(vals) + 1)
            n_max = max(n_max, len(vals))
            (line,) = ax.step(
                x, [100 * v for v in best_so_far(vals)], where="post", label=f"{method} / {backbone}"
            )
            ax.scatter(x, [100 * v for v in vals], s=12, alpha=0.45, color=line.get_color())
        ax.set_xlabel("trial (in start order)")
        ax.set_xlim(0.5, n_max + 0.5)
        _integer_axis(ax)
        ax.set_ylabel(f"validation {lbm.display_name(metric)} (%)")
        ax.set_title(
            f"{ds}, sweep {_sweep_label(sweep)}: best-so-far (line) and each complete trial (dots)",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots.append(
            Plot(
                _name("search-progress", str(ds), _sweep_label(sweep)),
                f"{ds} ({_sweep_label(sweep)}): search progress",
                _png(fig),
            )
        )
    return plots


def learning_curve_plots(rows: pd.DataFrame, metric: str) -> tuple[list[Plot], list[str]]:
    """One plot per cell of each sweep: every search trial's validation ``metric`` per epoch.

    Curves come from ``history_json``; cells whose rows carry no history get a note instead.
    """
    search = _search_rows(rows)
    plots: list[Plot] = []
    notes: list[str] = []
    for (sweep, cell), grp in sorted(
        search.groupby([schema.SWEEP_ID, schema.CELL], dropna=False), key=lambda kv: str(kv[0])
    ):
        curves = []
        for _, r in _order_trials(grp).iterrows():
            pts = [(e["epoch"], e[metric]) for e in decode_history(r[schema.HISTORY_JSON]) if metric in e]
            if pts:
                curves.append((str(r[schema.STATUS]), pts))
        label = f"{cell} (sweep {_sweep_label(sweep)})"
        if not curves:
            notes.append(
                f"{label}: the rows carry no per-epoch history (history_json), e.g. rows written before schema "
                "version 2; no learning curves."
            )
            continue
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        seen: set[str] = set()
        for status, pts in curves:
            xs, ys = zip(*pts, strict=True)
            colour = STATUS_COLOURS.get(status, "#333333")
            ax.plot(xs, [100 * y for y in ys], color=colour, alpha=0.7, lw=1.2, marker="o", ms=2.5,
                    label=None if status in seen else status)  # fmt: skip
            seen.add(status)
        _integer_axis(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {lbm.display_name(metric)} (%)")
        ax.set_title(f"{label}: {len(curves)} search trials", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="trial ended", title_fontsize=8)
        plots.append(
            Plot(_name("curves", _sweep_label(sweep), str(cell)), f"{label}: learning curves", _png(fig))
        )
    return plots, notes


def _scalar_params(params_json: Any) -> dict[str, Any]:
    if params_json is None or (isinstance(params_json, float) and math.isnan(params_json)):
        return {}
    data = json.loads(params_json)
    return {k: v for k, v in data.items() if isinstance(v, (bool, int, float, str)) and v is not None}


def infer_distributions(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Optuna distributions inferred from the sampled values of each parameter.

    Strings / booleans → categorical over the seen values; ints → IntDistribution(min, max); floats
    → FloatDistribution(min, max), log-scaled when all values are positive and span ≥ 2 decades.
    Parameters with a single seen value or mixed types are left out (nothing to attribute).

    Example:
        >>> d = infer_distributions([{"lam": 1e-4, "k": 2, "loss": "ms"}, {"lam": 1e-1, "k": 8, "loss": "c2"}])
        >>> d["lam"].log, d["k"].low, d["k"].high, sorted(d["loss"].choices)
        (True, 2, 8, ['c2', 'ms'])
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    values: dict[str, list[Any]] = {}
    for t in trials:
        for k, v in t.items():
            values.setdefault(k, []).append(v)
    out: dict[str, Any] = {}
    for k, vs in values.items():
        kinds = {type(v) for v in vs}
        if len({json.dumps(v) for v in vs}) < 2:
            continue
        if kinds <= {str} or kinds <= {bool}:
            out[k] = CategoricalDistribution(sorted(set(vs), key=str))
        elif kinds <= {int}:
            out[k] = IntDistribution(min(vs), max(vs))
        elif kinds <= {int, float}:
            lo, hi = float(min(vs)), float(max(vs))
            out[k] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 100.0)
    return out


def param_importances(search_rows: pd.DataFrame, metric: str, seed: int = 0) -> dict[str, float]:
    """fANOVA importances of a method's parameters for ``metric`` over its complete search trials.

    The study is rebuilt with ``optuna.create_study`` + ``study.add_trial(create_trial(...))`` from
    each row's ``params_json`` and metric value, with distributions from :func:`infer_distributions`.

    Returns:
        ``{param: importance}`` summing to 1, or ``{}`` when fewer than 3 usable trials or no
        parameter varied.
    """
    import optuna

    done = search_rows[(search_rows[schema.STATUS] == "complete") & search_rows[metric].notna()]
    trials = [
        (_scalar_params(p), float(v)) for p, v in zip(done[schema.PARAMS_JSON], done[metric], strict=True)
    ]
    dists = infer_distributions([p for p, _ in trials])
    if len(trials) < 3 or not dists:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for params, value in trials:
        keep = {k: v for k, v in params.items() if k in dists}
        study.add_trial(
            optuna.trial.create_trial(params=keep, distributions={k: dists[k] for k in keep}, value=value)
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError):  # e.g. no parameter shared by all trials
        return {}
    return {k: float(v) for k, v in imp.items()}


def importance_plots(rows: pd.DataFrame, metric: str) -> tuple[list[Plot], list[str]]:
    """One bar chart per cell of each sweep with ≥ :data:`MIN_TRIALS_FOR_IMPORTANCE` complete trials; notes for the others."""
    search = _search_rows(rows)
    plots: list[Plot] = []
    notes: list[str] = []
    for (sweep, cell), grp in sorted(
        search.groupby([schema.SWEEP_ID, schema.CELL], dropna=False), key=lambda kv: str(kv[0])
    ):
        label = f"{cell} (sweep {_sweep_label(sweep)})"
        n = int(((grp[schema.STATUS] == "complete") & grp[metric].notna()).sum())
        if n < MIN_TRIALS_FOR_IMPORTANCE:
            notes.append(
                f"{label}: {n} complete trials; parameter importance needs at least {MIN_TRIALS_FOR_IMPORTANCE}, "
                "so none is shown."
            )
            continue
        imp = param_importances(grp, metric)
        if not imp:
            notes.append(f"{label}: {n} complete trials but no parameter varied; no importance.")
            continue
        names = list(imp)[::-1]
        fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
        ax.barh(names, [imp[k] for k in names], color="#4c72b0")
        ax.set_xlabel(f"fANOVA importance for validation {lbm.display_name(metric)}")
        ax.set_title(f"{label}: {n} complete trials", fontsize=9)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
        plots.append(
            Plot(
                _name("importance", _sweep_label(sweep), str(cell)),
                f"{label}: parameter importance",
                _png(fig),
            )
        )
    return plots, notes


def _final_boards(rows: pd.DataFrame, metric: str) -> list[tuple[lbm.TableKey, pd.DataFrame]]:
    """Our final-table lines per (dataset, sweep, protocol): the groups the plots show (never pooled)."""
    boards = lbm.build(rows, phase="final", sort=metric) if _has_final(rows) else lbm.Leaderboards(metric)
    return [
        (k, t[t[schema.SOURCE] == "dmlbench"].reset_index(drop=True)) for k, t in sorted(boards.final.items())
    ]


def _has_final(rows: pd.DataFrame) -> bool:
    return bool(
        (
            (rows[schema.SOURCE] == "dmlbench")
            & (rows[schema.PHASE] == "final")
            & (rows[schema.STATUS] == "complete")
        ).any()
    )


def _line_label(r: Any) -> str:
    dim = "" if pd.isna(r[schema.EMBEDDING_DIM]) else f"-{int(r[schema.EMBEDDING_DIM])}"
    return f"{r[schema.METHOD]}\n{r[schema.BACKBONE]}{dim}"


def _spread_label(r: Any) -> str:
    n = int(r[lbm.N_SEEDS])
    return {"ci95": f"± 95% CI, n={n}", "std": f"± sd, n={n}"}.get(str(r[lbm.SPREAD]), f"n={n}")


def seed_spread_plots(rows: pd.DataFrame, metric: str) -> list[Plot]:
    """One plot per final table: each seed's test ``metric`` per line, with the mean marked."""
    plots: list[Plot] = []
    by_id = rows.set_index(schema.ROW_ID)
    for key, table in _final_boards(rows, metric):
        fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(table) + 2), 4))
        labels = []
        for i, (_, r) in enumerate(table.iterrows()):
            grp = by_id.loc[str(r[lbm.ROW_IDS]).split()].reset_index()
            vals = 100 * np.asarray([v for v in lbm.per_seed(grp, metric) if not math.isnan(v)])
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(len(vals))
            ax.scatter(i + jitter, vals, s=28, alpha=0.8, zorder=3)
            if len(vals):
                ax.hlines(vals.mean(), i - 0.25, i + 0.25, color="black", lw=2, zorder=4)
            labels.append(_line_label(r) + f"\n(n={len(vals)})")
        ax.set_xticks(range(len(table)), labels, fontsize=8)
        ax.set_ylabel(f"test {lbm.display_name(metric)} (%)")
        ax.set_title(f"{lbm.final_title(key)}: {lbm.display_name(metric)} per seed (bar = mean)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        plots.append(
            Plot(
                _name("seed-spread", key.dataset, key.sweep, key.protocol),
                f"{lbm.final_title(key)}: per-seed spread",
                _png(fig),
            )
        )
    return plots


def cost_axis(table: pd.DataFrame) -> tuple[str, str] | None:
    """The measured cost of a final table's lines: ``(column, axis label)``, or None when not measured.

    GPU-hours when every line charged GPU time; the trials' wall-clock hours when no line did (CPU
    sweeps, labelled as CPU hours); None when the lines mix the two or nothing was measured.

    Example:
        >>> t = pd.DataFrame({"gpu_hours": [0.0, 0.0], "trial_hours": [0.02, 0.05]})
        >>> cost_axis(t)[0], cost_axis(t.assign(gpu_hours=[1.0, 2.0]))[0], cost_axis(t.assign(gpu_hours=[1.0, 0.0]))
        ('trial_hours', 'gpu_hours', None)
    """
    gpu = pd.to_numeric(table[schema.GPU_HOURS], errors="coerce").fillna(0.0)
    wall = pd.to_numeric(table[lbm.TRIAL_HOURS], errors="coerce")
    if len(table) and (gpu > 0).all():
        return schema.GPU_HOURS, "GPU-hours (search trials + final runs)"
    if len(table) and (gpu == 0).all() and wall.notna().all() and (wall > 0).all():
        return lbm.TRIAL_HOURS, "CPU hours: wall-clock time of the trials (search + final; no GPU)"
    return None


def cost_plots(rows: pd.DataFrame, metric: str) -> tuple[list[Plot], list[str]]:
    """One plot per final table whose cost was measured: mean test ``metric`` (± its spread) vs cost."""
    plots: list[Plot] = []
    notes: list[str] = []
    for key, table in _final_boards(rows, metric):
        axis = cost_axis(table)
        if axis is None:
            notes.append(
                f"{lbm.final_title(key)}: cost was not measured the same way for every line (GPU-hours or CPU "
                "wall time missing or mixed), so there is no accuracy-vs-cost plot."
            )
            continue
        col, xlabel = axis
        fig, ax = plt.subplots(figsize=(7, 4))
        lows, highs = [], []
        for _, r in table.iterrows():
            mean, half = 100 * r[metric + lbm.MEAN_SUFFIX], r[metric + lbm.CI_SUFFIX]
            if pd.isna(half):
                half = r[metric + lbm.STD_SUFFIX]
            half = None if pd.isna(half) else 100 * half
            lows.append(mean - (half or 0.0))
            highs.append(mean + (half or 0.0))
            ax.errorbar(float(r[col]), mean, yerr=half, fmt="o", capsize=4,
                        label=f"{_line_label(r).replace(chr(10), ' / ')} ({_spread_label(r)})")  # fmt: skip
        xmax = float(pd.to_numeric(table[col]).max())
        ax.set_xlim(0, xmax * 1.15)
        lo, hi = min(lows), max(highs)
        pad = max(1.0, 0.1 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {lbm.display_name(metric)} (%)")
        ax.set_title(f"{lbm.final_title(key)}: accuracy vs cost", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        unit = "GPU-hours" if col == schema.GPU_HOURS else "CPU hours"
        plots.append(
            Plot(
                _name("cost", key.dataset, key.sweep, key.protocol),
                f"{lbm.final_title(key)}: accuracy vs {unit}",
                _png(fig),
            )
        )
    return plots, notes


#: display columns of running text: the only ones allowed to break inside a word (long ids, labels)
LONG_COLUMNS = frozenset({"method", "best trial"})


def _html_table(df: pd.DataFrame, title: str, row_classes: Sequence[str] | None = None, legend: str = "") -> str:
    def header(c: Any) -> str:  # "complete/pruned/..." may break after each slash
        return html.escape(str(c)).replace("/", "/<wbr>")

    long = [str(c) in LONG_COLUMNS for c in df.columns]
    head = "".join(f"<th>{header(c)}</th>" for c in df.columns)
    classes = list(row_classes) if row_classes is not None else [""] * len(df)
    body = "".join(
        f"<tr class='{cls}'>"
        + "".join(
            f"<td class='long'>{html.escape(str(v))}</td>" if is_long else f"<td>{html.escape(str(v))}</td>"
            for v, is_long in zip(row, long, strict=True)
        )
        + "</tr>"
        for cls, row in zip(classes, df.itertuples(index=False), strict=True)
    )
    note = f"<p class='legend'>{html.escape(legend)}</p>" if legend else ""
    return (
        f"<h3>{html.escape(title)}</h3>{note}<div class='fit'><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


def _notes(notes: Sequence[str]) -> list[str]:
    return [f"<p class='note'>{html.escape(n)}</p>" for n in notes]


def build_sections(
    rows: pd.DataFrame, *, sort: str = lbm.DEFAULT_SORT, paper: pd.DataFrame | None = None
) -> list[Section]:
    """Every section of the report, each with its plots or an explanatory note (never empty)."""
    lbm.check_sort(sort)
    boards = lbm.build(rows, sort=sort, paper=paper)
    tables = Section("leaderboards", "Leaderboards")
    for key in boards.keys():
        if key in boards.final:
            final = boards.final[key]
            classes = ["ours" if src == "dmlbench" else "paper" for src in final[schema.SOURCE]]
            tables.html_parts.append(
                _html_table(lbm.display_final(final, sort), lbm.final_title(key), classes, lbm.SPREAD_LEGEND)
            )
        if key in boards.search:
            tables.html_parts.append(
                _html_table(lbm.display_search(boards.search[key], sort), lbm.search_title(key))
            )
    progress = Section("search-progress", "Search progress: best-so-far validation score vs trial, per cell")
    progress.plots = search_progress_plots(rows, sort)
    curves = Section("learning-curves", "Learning curves: validation score per epoch of every search trial")
    curves.plots, notes = learning_curve_plots(rows, sort)
    curves.html_parts += _notes(notes)
    importance = Section(
        "importance",
        f"Parameter importance: Optuna fANOVA per cell with at least {MIN_TRIALS_FOR_IMPORTANCE} complete trials",
    )
    importance.plots, notes = importance_plots(rows, sort)
    importance.html_parts += _notes(notes)
    spread = Section("seed-spread", "Seed spread: the test score of every final seed")
    spread.plots = seed_spread_plots(rows, sort)
    cost = Section("cost", "Cost: test score vs GPU-hours (or CPU hours on GPU-less sweeps)")
    cost.plots, notes = cost_plots(rows, sort)
    cost.html_parts += _notes(notes)
    sections = [tables, progress, curves, importance, spread, cost]
    for s in sections:
        if not s.plots and not s.html_parts:
            phase = "search" if s.id in ("search-progress", "learning-curves", "importance") else "final"
            s.html_parts.append(
                f"<p class='note'>No {phase}-phase rows yet, so nothing to plot here; run the sweep's {phase} phase.</p>"
            )
    return sections


#: tables wrap inside the page (max 1320 px): cells break long ids, so nothing scrolls sideways
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1320px;color:#222;
line-height:1.4;padding:0 16px}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}h3{font-size:1.02em;margin:18px 0 6px}
.meta{color:#666;font-size:.9em}.note{color:#555;font-style:italic}.legend{color:#555;font-size:.85em;margin:2px 0 6px}
.fit{max-width:100%}table{border-collapse:collapse;font-size:.8em;width:100%;table-layout:auto}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:normal}td.long{overflow-wrap:anywhere}
th{background:#f3f3f3;text-align:left}
td:nth-child(-n+4){text-align:left}tbody tr:nth-child(even){background:#fafafa}
tr.ours{font-weight:600;background:#eef5ff!important}tr.paper{color:#666;font-style:italic}
figure{display:inline-block;margin:8px 12px 8px 0;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}nav a{margin-right:14px}
"""


def render_html(sections: list[Section], *, title: str, meta: str, warnings: Sequence[str] = ()) -> str:
    """The self-contained page: inline CSS, plots as ``data:image/png;base64`` images."""
    nav = "".join(f"<a href='#{s.id}'>{html.escape(s.title.split(':')[0])}</a>" for s in sections)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(meta)}</p><nav>{nav}</nav>",
        (
            "<p class='meta'>Bold blue rows are ours (ranked); grey italic rows are published numbers (never ranked; "
            "their label ends with their protocol, e.g. test-select = best epoch chosen on the test set).</p>"
        ),
    ]
    if warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
        parts.append(f"<h2>Warnings</h2><ul class='note'>{items}</ul>")
    for s in sections:
        parts.append(f"<section id='{s.id}'><h2>{html.escape(s.title)}</h2>")
        parts += s.html_parts
        for p in s.plots:
            b64 = base64.b64encode(p.png).decode("ascii")
            parts.append(
                f"<figure><img alt='{html.escape(p.caption)}' src='data:image/png;base64,{b64}'>"
                f"<figcaption>{html.escape(p.caption)}</figcaption></figure>"
            )
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    rows: pd.DataFrame,
    out: Path,
    *,
    png_dir: Path | None = None,
    sort: str = lbm.DEFAULT_SORT,
    paper: pd.DataFrame | None = None,
    warnings: Sequence[str] = (),
    source: str = "",
) -> list[Path]:
    """Write the HTML report (and each plot as PNG under ``png_dir``); returns the files written."""
    sections = build_sections(rows, sort=sort, paper=paper)
    n_rows = int((rows[schema.SOURCE] == "dmlbench").sum())
    meta = (
        f"{n_rows} rows from {source or 'the results folder'}; ranked by {lbm.display_name(sort)}; "
        "final tables are test scores of the final phase, search tables validation scores."
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        render_html(sections, title="dmlbench report", meta=meta, warnings=warnings), encoding="utf-8"
    )
    written = [out]
    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        for s in sections:
            for p in s.plots:
                dest = png_dir / f"{p.name}.png"
                dest.write_bytes(p.png)
                written.append(dest)
    return written
