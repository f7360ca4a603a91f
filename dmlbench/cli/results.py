"""``dmlbench leaderboard``, ``dmlbench report`` and ``dmlbench reproduce``: reading a sweep's rows.

pandas, scipy and the results modules are imported inside the commands (fast ``--help``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from dmlbench.cli import Wide, app, console, err_console, friendly
from dmlbench.cli._tables import Col, print_table
from dmlbench.errors import ConfigError, DmlbenchError

if TYPE_CHECKING:
    import pandas as pd

    from dmlbench.results.leaderboard import Comparison, Leaderboards

FORMATS = ("table", "markdown", "csv", "json", "latex")
DEFAULT_RESULTS = Path("results")

ResultsDir = Annotated[
    Path,
    typer.Argument(
        help="results folder (or one sweep folder) holding <sweep>/rows/*.parquet", show_default=True
    ),
]
SortOption = Annotated[
    str | None, typer.Option("--sort", help="metric to rank by, e.g. recall_at_1 (default map_at_r)")
]


def load_rows(results_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Rows under ``results_dir`` via the store; warnings go to stderr; nothing readable is an error."""
    from dmlbench.results.store import read_rows

    rows, warnings = read_rows(results_dir)
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if rows.empty:
        raise DmlbenchError(
            f"none of the row files under {str(results_dir)!r} could be read (see the warnings above); "
            "re-run the sweep or upgrade dmlbench if the rows need a newer version."
        )
    return rows, warnings


#: drop priority of the leaderboard's display columns (0 = always shown; see cli._tables)
_PRIORITY = {
    "rank": 0, "method": 0, "vs #1": 1, "seeds": 2, "backbone": 3, "dim": 4, "trials": 20, "cost": 21,
    "config": 22, "split": 23, "complete/pruned/diverged/failed": 6, "best trial": 24,
    "protocol": 5, "B − A": 1, "CIs": 1, "A seeds": 7, "B seeds": 7, "same split": 8,
}  # fmt: skip
_WRAP = {"method", "best trial"}


def _print_frame(df: pd.DataFrame, title: str, *, wide: bool, caption: str | None = None) -> None:
    """Print a display table: the sort metric (▼) and the keys always, other columns as width allows."""
    cols = []
    for i, name in enumerate(df.columns):
        name = str(name)
        if name in _PRIORITY:
            prio = _PRIORITY[name]
        elif "▼" in name or name.startswith(("A ", "B ")):
            prio = 0
        else:  # further metrics: the earlier listed, the longer kept
            prio = 9 + i
        right = name not in ("method", "backbone", "protocol", "best trial", "config", "split", "same split")
        cols.append(Col(escape(name), prio, "right" if right else "left", wrap=name in _WRAP, wrap_width=22))
    rows = [[escape(str(v)) for v in r] for r in df.itertuples(index=False)]
    print_table(console, cols, rows, title=escape(title), caption=caption and escape(caption), wide=wide)


def _print_boards(lb: Leaderboards, *, wide: bool) -> None:
    from dmlbench.results import leaderboard as lbm
    from dmlbench.results import schema

    for key in lb.keys():
        if key in lb.final:
            t = lb.final[key]
            _print_frame(lbm.display_final(t, lb.sort), lbm.final_title(key), wide=wide, caption=lbm.SPREAD_LEGEND)
            for c in sorted(set(t.loc[t[schema.SOURCE] == "paper", schema.CITATION])):
                console.print(f"  [dim]paper:[/] {escape(c)}", highlight=False)
        if key in lb.search:
            _print_frame(lbm.display_search(lb.search[key], lb.sort), lbm.search_title(key), wide=wide)


def _print_comparison(cmp: Comparison, *, wide: bool) -> None:
    from dmlbench.results import leaderboard as lbm

    for ds, t in cmp.tables.items():
        _print_frame(lbm.display_compare(t, cmp), lbm.compare_title(ds, cmp), wide=wide, caption=lbm.COMPARE_LEGEND)
        if (t[lbm.SAME_SPLIT] == "no").any():
            err_console.print(
                f"[yellow]warning:[/] on {ds} the two sweeps used different class splits (split hash), "
                "so their numbers are not directly comparable.",
                highlight=False,
                soft_wrap=True,
            )


def _paper_rows(with_paper: bool) -> pd.DataFrame | None:
    """The published rows for ``--with-paper``, else None."""
    if not with_paper:
        return None
    from dmlbench.results.paper import paper_rows

    return paper_rows()


def _emit(fmt: str, subject: Any, warnings: list[str], writers: tuple[Any, ...], *, table: Callable[[], None]) -> None:
    """Write ``subject`` in the ``--format`` asked for; ``writers`` = (json_obj, frame, markdown, latex)."""
    json_obj, frame, markdown, latex = writers
    if fmt == "json":
        typer.echo(json.dumps(json_obj(subject, warnings), indent=2))
    elif fmt == "csv":
        typer.echo(frame(subject).to_csv(index=False), nl=False)
    elif fmt == "markdown":
        typer.echo(markdown(subject), nl=False)
    elif fmt == "latex":
        typer.echo(latex(subject), nl=False)
    else:
        table()


@app.command(
    "leaderboard",
    epilog=(
        "Examples:\n\n  dmlbench leaderboard results/\n\n"
        "  dmlbench leaderboard results/ --sweep sweep-1a2b3c4d --dataset cub200 --format latex\n\n"
        "  dmlbench leaderboard results/ --compare sweep-old sweep-new\n\n"
        "  dmlbench leaderboard results/ --phase search --sort recall_at_1 --wide"
    ),
)
@friendly
def leaderboard_cmd(
    results_dir: ResultsDir = DEFAULT_RESULTS,
    *,
    sweep: Annotated[str | None, typer.Option("--sweep", help="only these sweeps (names, comma-separated)")] = None,
    compare: Annotated[
        tuple[str, str] | None,
        typer.Option("--compare", help="two sweeps side by side: --compare SWEEP_A SWEEP_B (final phase)"),
    ] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="dataset name(s), comma-separated")] = None,
    method: Annotated[str | None, typer.Option("--method", help="method name(s), comma-separated")] = None,
    phase: Annotated[
        str, typer.Option("--phase", help="all | final (test scores) | search (validation scores)")
    ] = "all",
    sort: SortOption = None,
    fmt: Annotated[str, typer.Option("--format", help="table | markdown | csv | json | latex (booktabs)")] = "table",
    with_paper: Annotated[
        bool,
        typer.Option("--with-paper", help="show published numbers beside ours (unranked, protocol shown)"),
    ] = False,
    wide: Wide = False,
) -> None:
    """Leaderboards per dataset and sweep: final test scores (mean ± 95% CI from 3 seeds, else ± std) and best validation scores.

    Rows of different sweeps, protocols, split hashes or configurations are never averaged together.
    """
    from dmlbench.results import leaderboard as lbm

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}.")
    sort = lbm.check_sort(sort or lbm.DEFAULT_SORT)
    rows, warnings = load_rows(results_dir)
    if compare is not None:
        if sweep is not None or with_paper or phase != "all":
            raise ConfigError("--compare shows the final phase of two sweeps; drop --sweep, --phase and --with-paper.")
        cmp = lbm.compare(rows, compare[0], compare[1], sort=sort, datasets=dataset, methods=method)
        compare_writers = (lbm.compare_json_obj, lbm.compare_frame, lbm.compare_markdown, lbm.compare_latex)
        _emit(fmt, cmp, warnings, compare_writers, table=lambda: _print_comparison(cmp, wide=wide))
        return
    paper = _paper_rows(with_paper)
    lb = lbm.build(rows, datasets=dataset, methods=method, sweeps=sweep, phase=phase, sort=sort, paper=paper)
    if lb.is_empty():
        raise DmlbenchError(
            f"no {'' if phase == 'all' else phase + '-phase '}rows to show under {str(results_dir)!r} for these filters; "
            "final tables need complete phase=final rows (run the sweep's final phase), search tables phase=search rows."
        )
    writers = (lbm.to_json_obj, lbm.to_frame, lbm.to_markdown, lbm.to_latex)
    _emit(fmt, lb, warnings, writers, table=lambda: _print_boards(lb, wide=wide))


@app.command("report", epilog="Examples:\n\n  dmlbench report results/ --out report.html\n\n  dmlbench report results/ --out report.html --png plots/")
@friendly
def report_cmd(
    results_dir: ResultsDir = DEFAULT_RESULTS,
    *,
    out: Annotated[
        Path, typer.Option("--out", help="HTML file to write (self-contained, plots embedded)")
    ] = Path("report.html"),
    png: Annotated[
        Path | None, typer.Option("--png", help="also write every plot as a PNG into this folder")
    ] = None,
    sort: SortOption = None,
    with_paper: Annotated[
        bool, typer.Option("--with-paper", help="show published numbers in the tables")
    ] = False,
) -> None:
    """Write an HTML report: leaderboards, search progress, learning curves, parameter importance, seed spread, accuracy vs cost."""
    from dmlbench.results import leaderboard as lbm
    from dmlbench.results.report import write_report

    sort = lbm.check_sort(sort or lbm.DEFAULT_SORT)
    rows, warnings = load_rows(results_dir)
    paper = _paper_rows(with_paper)
    with console.status("rendering plots…"):
        files = write_report(
            rows, out, png_dir=png, sort=sort, paper=paper, warnings=warnings, source=str(results_dir)
        )
    console.print(f"wrote {files[0]}" + (f" and {len(files) - 1} PNG files under {png}" if png else ""))


@app.command("reproduce", epilog="Examples:\n\n  dmlbench leaderboard results/ --format json   # find a row_id\n\n  dmlbench reproduce sweep-1a2b3c4d-ccp_digits_tiny-final-0001 results/")
@friendly
def reproduce_cmd(
    row_id: Annotated[
        str, typer.Argument(help="row_id of the row to re-run (see `dmlbench leaderboard --format csv`)")
    ],
    results_dir: ResultsDir = DEFAULT_RESULTS,
    *,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", help="fresh folder for the re-run (default: a new temp folder)"),
    ] = None,
    data_root: Annotated[str | None, typer.Option("--data-root", help="override the row's data root")] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="override the row's device, e.g. cpu")
    ] = None,
) -> None:
    """Re-run the exact TrialConfig of one row (printed first) and compare the new metrics with the stored ones."""
    import tempfile

    import pandas as pd
    from rich.table import Table

    from dmlbench.config import TrialConfig
    from dmlbench.results import leaderboard as lbm
    from dmlbench.results import schema

    rows, _warnings = load_rows(results_dir)
    row = lbm.find_row(rows, row_id, where=repr(str(results_dir)))
    if row[schema.SOURCE] == "paper":
        raise DmlbenchError(
            f"row {row_id!r} is a published number (source=paper); there is nothing to re-run."
        )
    config_json = row[schema.CONFIG_JSON]
    if not isinstance(config_json, str) or not config_json.strip():
        raise DmlbenchError(f"row {row_id!r} has no config_json, so its run cannot be reproduced.")
    try:
        cfg = TrialConfig.from_json(config_json)
    except json.JSONDecodeError as err:
        raise DmlbenchError(f"row {row_id!r} has a config_json that is not valid JSON ({err.msg}).") from None
    if pd.isna(row[schema.FOLD]) and cfg.fold is not None:
        raise DmlbenchError(
            f"row {row_id!r} stands for several fold models (a search trial's fold mean, or a seed's concatenated "
            f"embedding), not one run; reproduce one of its fold models' rows instead (row ids ending in -f<i>)."
        )
    console.rule(f"TrialConfig of {row_id}")
    console.print(cfg.to_yaml(), highlight=False, markup=False)
    if output_dir is None:
        out = Path(tempfile.mkdtemp(prefix="dmlbench-reproduce-"))
    else:
        out = output_dir
        if (out / "checkpoints" / "last.pt").exists():
            raise ConfigError(
                f"{str(out)!r} already holds a checkpoint, so the run would resume instead of re-running; "
                "give a fresh --output-dir."
            )
    changes: dict[str, object] = {"output_dir": str(out)}
    if data_root is not None:
        changes["data_root"] = data_root
    if device is not None:
        changes["device"] = device
    run_cfg = cfg.replace(**changes)
    console.print(
        f"re-running into {out} (changed for the re-run: {', '.join(sorted(changes))})", highlight=False
    )

    from dmlbench import engine

    result = engine.train(run_cfg)
    stored_split = row[schema.EVAL_SPLIT]
    if stored_split and result.eval_split != stored_split:
        err_console.print(
            f"[yellow]warning:[/] stored metrics are on the {stored_split} split, the re-run's on {result.eval_split}.",
            highlight=False,
        )
    if (
        row[schema.SPLIT_HASH]
        and getattr(result, "split_hash", None)
        and result.split_hash != row[schema.SPLIT_HASH]
    ):
        err_console.print(
            f"[yellow]warning:[/] split hash differs (stored {row[schema.SPLIT_HASH]}, now {result.split_hash}): "
            "the class split is not the same, so the metrics are not comparable.",
            highlight=False,
        )
    extra = {
        schema.EPOCHS: result.epochs_run,
        schema.BEST_EPOCH: result.best_epoch,
        schema.STEPS: result.steps,
    }
    cmp = lbm.compare_metrics(row, dict(result.metrics), extra)
    table = Table(title=f"{row_id}: stored vs re-run ({result.eval_split} split)", title_justify="left")
    for col in ("metric", "stored", "new", "new − stored"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in cmp.itertuples(index=False):
        fmt = "{:.0f}" if r.metric in extra else "{:.4f}"
        cells = ["–" if pd.isna(v) else fmt.format(v) for v in (r.stored, r.new)]
        diff = "–" if pd.isna(r.diff) else ("{:+.0f}" if r.metric in extra else "{:+.4f}").format(r.diff)
        table.add_row(lbm.display_name(r.metric), *cells, diff)
    console.print(table)
