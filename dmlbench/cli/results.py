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
    typer.Argument(
        help="results folder (or one sweep folder) holding <sweep>/rows/*.parquet", show_default=True
    ),
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


@app.command("leaderboard", epilog="Examples:\n\n  dmlbench leaderboard results/\n\n  dmlbench leaderboard results/ --dataset cub200 --with-paper --format markdown\n\n  dmlbench leaderboard results/ --phase search --sort recall_at_1")
@friendly
def leaderboard_cmd(
    results_dir: ResultsDir = DEFAULT_RESULTS,
    *,
    dataset: Annotated[str | None, typer.Option("--dataset", help="dataset name(s), comma-separated")] = None,
    method: Annotated[str | None, typer.Option("--method", help="method name(s), comma-separated")] = None,
    phase: Annotated[
        str, typer.Option("--phase", help="all | final (test scores) | search (validation scores)")
    ] = "all",
    sort: Annotated[
        str, typer.Option("--sort", help="metric to rank by, e.g. map_at_r, recall_at_1")
    ] = lbm.DEFAULT_SORT,
    fmt: Annotated[str, typer.Option("--format", help="table | markdown | csv | json")] = "table",
    with_paper: Annotated[
        bool,
        typer.Option("--with-paper", help="show published numbers beside ours (unranked, protocol shown)"),
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
    sort: Annotated[
        str, typer.Option("--sort", help="metric of the tables and plots, e.g. map_at_r")
    ] = lbm.DEFAULT_SORT,
    with_paper: Annotated[
        bool, typer.Option("--with-paper", help="show published numbers in the tables")
    ] = False,
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

    from dmlbench.config import TrialConfig
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
