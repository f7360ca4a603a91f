"""``dmlbench leaderboard``, ``dmlbench report`` and ``dmlbench reproduce``: reading a sweep's rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from dmlbench.cli import app, console, err_console, friendly
from dmlbench.errors import ConfigError, DmlbenchError
from dmlbench.results import leaderboard as lbm

FORMATS = ("table", "markdown", "csv", "json")
DEFAULT_RESULTS = Path("results")

ResultsDir = Annotated[
    Path,
    typer.Argument(help="results folder (or one sweep folder) holding <sweep>/rows/*.parquet", show_default=True),
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


def _rich_table(title: str, df: pd.DataFrame) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    for col in df.columns:
        text_col = str(col) in ("method", "backbone", "protocol", "best trial")
        table.add_column(str(col), no_wrap=text_col, overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*[str(v) for v in row])
    return table


def _print_wide(table: Table) -> None:
    """Print a table at its natural width, even when wider than the terminal (nothing squeezed away)."""
    need = Measurement.get(console, console.options.update(width=10_000), table).maximum
    if need <= console.width:
        console.print(table)
    else:
        Console(file=sys.stdout, width=need, force_terminal=console.is_terminal).print(table)


@app.command("leaderboard")
@friendly
def leaderboard_cmd(
    results_dir: ResultsDir = DEFAULT_RESULTS,
    *,
    dataset: Annotated[str | None, typer.Option("--dataset", help="dataset name(s), comma-separated")] = None,
    method: Annotated[str | None, typer.Option("--method", help="method name(s), comma-separated")] = None,
    phase: Annotated[str, typer.Option("--phase", help="all | final (test scores) | search (validation scores)")] = "all",
    sort: Annotated[str, typer.Option("--sort", help="metric to rank by, e.g. map_at_r, recall_at_1")] = lbm.DEFAULT_SORT,
    fmt: Annotated[str, typer.Option("--format", help="table | markdown | csv | json")] = "table",
    with_paper: Annotated[
        bool, typer.Option("--with-paper", help="show published numbers beside ours (unranked, protocol shown)")
    ] = False,
) -> None:
    """Leaderboards per dataset: final-phase test scores (mean ± 95% CI over seeds) and search-phase best validation scores."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}.")
    rows, warnings = load_rows(results_dir)
    paper = None
    if with_paper:
        from dmlbench.results.paper import paper_rows

        paper = paper_rows()
    lb = lbm.build(rows, datasets=dataset, methods=method, phase=phase, sort=sort, paper=paper)
    if lb.is_empty():
        raise DmlbenchError(
            f"no {'' if phase == 'all' else phase + '-phase '}rows to show under {str(results_dir)!r} for these filters; "
            "final tables need complete phase=final rows (run the sweep's final phase), search tables phase=search rows."
        )
    if fmt == "json":
        typer.echo(json.dumps(lbm.to_json_obj(lb, warnings), indent=2))
    elif fmt == "csv":
        typer.echo(lbm.to_frame(lb).to_csv(index=False), nl=False)
    elif fmt == "markdown":
        typer.echo(lbm.to_markdown(lb), nl=False)
    else:
        for ds in sorted(set(lb.final) | set(lb.search)):
            if ds in lb.final:
                _print_wide(_rich_table(lbm.final_title(ds), lbm.display_final(lb.final[ds], lb.sort)))
                cites = sorted(set(lb.final[ds].loc[lb.final[ds]["source"] == "paper", "citation"]))
                for c in cites:
                    console.print(f"  [dim]paper:[/] {c}", highlight=False, soft_wrap=True)
            if ds in lb.search:
                _print_wide(_rich_table(lbm.search_title(ds), lbm.display_search(lb.search[ds], lb.sort)))


@app.command("report")
@friendly
def report_cmd(
    results_dir: ResultsDir = DEFAULT_RESULTS,
    *,
    out: Annotated[Path, typer.Option("--out", help="HTML file to write (self-contained, plots embedded)")] = Path(
        "report.html"
    ),
    png: Annotated[Path | None, typer.Option("--png", help="also write every plot as a PNG into this folder")] = None,
    sort: Annotated[str, typer.Option("--sort", help="metric of the tables and plots, e.g. map_at_r")] = lbm.DEFAULT_SORT,
    with_paper: Annotated[bool, typer.Option("--with-paper", help="show published numbers in the tables")] = False,
) -> None:
    """Write an HTML report: leaderboards, search progress, parameter importance, seed spread, accuracy vs GPU-hours."""
    from dmlbench.results.report import write_report

    lbm.check_sort(sort)
    rows, warnings = load_rows(results_dir)
    paper = None
    if with_paper:
        from dmlbench.results.paper import paper_rows

        paper = paper_rows()
    with console.status("rendering plots…"):
        files = write_report(
            rows, out, png_dir=png, sort=sort, paper=paper, warnings=warnings, source=str(results_dir)
        )
    console.print(f"wrote {files[0]}" + (f" and {len(files) - 1} PNG files under {png}" if png else ""))
