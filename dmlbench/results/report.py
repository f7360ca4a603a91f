"""``dmlbench report``: one self-contained HTML page (plots embedded as base64 PNG) for a results folder.

Sections: leaderboard tables; best-so-far validation metric vs trial per cell; parameter importance
per method (Optuna's fANOVA on a study rebuilt from the search rows); per-seed spread of the final
runs; accuracy vs GPU-hours. Every plot can also be written as a PNG file (``--png DIR``).
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

from dmlbench.results import leaderboard as lbm
from dmlbench.results import schema

SECTION_IDS = ("leaderboards", "search-progress", "importance", "seed-spread", "cost")
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


def search_progress_plots(rows: pd.DataFrame, metric: str) -> list[Plot]:
    """One plot per dataset: best-so-far validation ``metric`` vs trial number, a line per cell."""
    search = rows[(rows[schema.SOURCE] == "dmlbench") & (rows[schema.PHASE] == "search")]
    plots: list[Plot] = []
    for ds, dgrp in sorted(search.groupby(schema.DATASET), key=lambda kv: str(kv[0])):
        fig, ax = plt.subplots(figsize=(7, 4))
        for (method, backbone), cgrp in sorted(dgrp.groupby([schema.METHOD, schema.BACKBONE], dropna=False)):
            cgrp = _order_trials(cgrp)
            vals = [
                (float(v) if s == "complete" and v is not None and not pd.isna(v) else math.nan)
                for v, s in zip(cgrp[metric], cgrp[schema.STATUS], strict=True)
            ]
            x = np.arange(1, len(vals) + 1)
            (line,) = ax.step(
                x, [100 * v for v in best_so_far(vals)], where="post", label=f"{method} / {backbone}"
            )
            ax.scatter(x, [100 * v for v in vals], s=12, alpha=0.45, color=line.get_color())
        ax.set_xlabel("trial (in start order)")
        ax.set_ylabel(f"validation {lbm.display_name(metric)} (%)")
        ax.set_title(
            f"{ds}: best-so-far validation {lbm.display_name(metric)} (line) and each complete trial (dots)"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots.append(Plot(_name("search-progress", str(ds)), f"{ds}: search progress", _png(fig)))
    return plots


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
    """One bar chart per (method, dataset) with enough search trials; notes for the others."""
    search = rows[(rows[schema.SOURCE] == "dmlbench") & (rows[schema.PHASE] == "search")]
    plots: list[Plot] = []
    notes: list[str] = []
    for (method, ds), grp in sorted(search.groupby([schema.METHOD, schema.DATASET])):
        imp = param_importances(grp, metric)
        if not imp:
            notes.append(
                f"{method} on {ds}: fewer than 3 complete trials or no varied parameter; no importance."
            )
            continue
        names = list(imp)[::-1]
        fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
        ax.barh(names, [imp[n] for n in names], color="#4c72b0")
        ax.set_xlabel(f"fANOVA importance for validation {lbm.display_name(metric)}")
        n = int(((grp[schema.STATUS] == "complete") & grp[metric].notna()).sum())
        ax.set_title(f"{method} on {ds} ({n} complete trials)")
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
        plots.append(
            Plot(
                _name("importance", str(method), str(ds)),
                f"{method} on {ds}: parameter importance",
                _png(fig),
            )
        )
    return plots, notes


def _final_complete(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[
        (rows[schema.SOURCE] == "dmlbench")
        & (rows[schema.PHASE] == "final")
        & (rows[schema.STATUS] == "complete")
    ]


def _entry_label(r: Any) -> str:
    return f"{r[schema.METHOD]}\n{r[schema.BACKBONE]}-{r[schema.EMBEDDING_DIM]}"


def seed_spread_plots(rows: pd.DataFrame, metric: str) -> list[Plot]:
    """One plot per dataset: each final seed's test ``metric`` per entry, with the mean marked."""
    final = _final_complete(rows)
    plots: list[Plot] = []
    for ds, dgrp in sorted(final.groupby(schema.DATASET), key=lambda kv: str(kv[0])):
        groups = sorted(dgrp.groupby([schema.METHOD, schema.BACKBONE, schema.EMBEDDING_DIM], dropna=False))
        fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) + 2), 4))
        labels = []
        for i, (_key, grp) in enumerate(groups):
            vals = 100 * grp[metric].astype(float).dropna().to_numpy()
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(len(vals))
            ax.scatter(i + jitter, vals, s=28, alpha=0.8, zorder=3)
            if len(vals):
                ax.hlines(vals.mean(), i - 0.25, i + 0.25, color="black", lw=2, zorder=4)
            labels.append(_entry_label(grp.iloc[0]) + f"\n(n={len(vals)})")
        ax.set_xticks(range(len(groups)), labels, fontsize=8)
        ax.set_ylabel(f"test {lbm.display_name(metric)} (%)")
        ax.set_title(f"{ds}: per-seed test {lbm.display_name(metric)} of the final runs (bar = mean)")
        ax.grid(axis="y", alpha=0.3)
        plots.append(Plot(_name("seed-spread", str(ds)), f"{ds}: per-seed spread", _png(fig)))
    return plots


def cost_plots(rows: pd.DataFrame, metric: str) -> list[Plot]:
    """One plot per dataset: final mean test ``metric`` (± 95 % CI) vs GPU-hours (search + final) per entry."""
    plots: list[Plot] = []
    for ds in sorted(set(_final_complete(rows)[schema.DATASET])):
        table = lbm.final_table(rows, str(ds), sort=metric)
        fig, ax = plt.subplots(figsize=(7, 4))
        for _, r in table.iterrows():
            hours = r[schema.GPU_HOURS]
            x = 0.0 if pd.isna(hours) else float(hours)
            ci = r[metric + lbm.CI_SUFFIX]
            ax.errorbar(
                x,
                100 * r[metric + lbm.MEAN_SUFFIX],
                yerr=None if pd.isna(ci) else 100 * ci,
                fmt="o",
                capsize=4,
                label=f"{r[schema.METHOD]} / {r[schema.BACKBONE]}-{r[schema.EMBEDDING_DIM]} (n={r[lbm.N_SEEDS]})",
            )
        ax.set_xlabel("GPU-hours (search trials + final runs)")
        ax.set_ylabel(f"test {lbm.display_name(metric)} (%)")
        ax.set_title(f"{ds}: accuracy vs cost")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots.append(Plot(_name("cost", str(ds)), f"{ds}: accuracy vs GPU-hours", _png(fig)))
    return plots


def _html_table(df: pd.DataFrame, title: str, row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    classes = list(row_classes) if row_classes is not None else [""] * len(df)
    body = "".join(
        f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for cls, row in zip(classes, df.itertuples(index=False), strict=True)
    )
    return f"<h3>{html.escape(title)}</h3><div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


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
                _html_table(lbm.display_final(final, sort), lbm.final_title(key), classes)
            )
        if key in boards.search:
            tables.html_parts.append(
                _html_table(lbm.display_search(boards.search[key], sort), lbm.search_title(key))
            )
    progress = Section("search-progress", "Search: best-so-far validation score vs trial, per cell")
    progress.plots = search_progress_plots(rows, sort)
    importance = Section("importance", "Parameter importance per method (Optuna fANOVA on the search trials)")
    importance.plots, notes = importance_plots(rows, sort)
    importance.html_parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    spread = Section("seed-spread", "Final runs: per-seed spread of the test score")
    spread.plots = seed_spread_plots(rows, sort)
    cost = Section("cost", "Accuracy vs GPU-hours")
    cost.plots = cost_plots(rows, sort)
    sections = [tables, progress, importance, spread, cost]
    for s in sections:
        if not s.plots and not s.html_parts:
            phase = "search" if s.id in ("search-progress", "importance") else "final"
            s.html_parts.append(
                f"<p class='note'>No {phase}-phase rows yet, so nothing to plot here; run the sweep's {phase} phase.</p>"
            )
    return sections


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1320px;color:#222;
line-height:1.4;padding:0 16px}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}h3{font-size:1.02em;margin:18px 0 6px}
.meta{color:#666;font-size:.9em}.note{color:#555;font-style:italic}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.82em;white-space:nowrap}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f3f3f3;position:sticky;top:0;text-align:left}
td:nth-child(-n+5){text-align:left}tbody tr:nth-child(even){background:#fafafa}
tr.ours{font-weight:600;background:#eef5ff!important}tr.paper{color:#666;font-style:italic}
figure{display:inline-block;margin:8px 12px 8px 0;vertical-align:top}figure img{max-width:100%;border:1px solid #eee}
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
            "their protocol column says how they were selected, e.g. test-select = best epoch on the test set).</p>"
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
