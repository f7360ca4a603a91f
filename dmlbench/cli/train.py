"""``dmlbench train`` (one run, no Ray), ``dmlbench methods list``, ``dmlbench datasets list``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dmlbench.cli import Wide, app, console, datasets_app, friendly, methods_app
from dmlbench.cli._tables import Col, print_table
from dmlbench.errors import DmlbenchError


@app.command(
    epilog=(
        "Examples:\n\n"
        "  dmlbench train --method proxyanchor --dataset digits\n\n"
        "  dmlbench train --method nivmf --dataset digits --epochs 5 --set temp=0.05 --set params.n_samples=3\n\n"
        "  dmlbench train --method ccp --dataset cub200 --backbone resnet50 --phase final --output runs/ccp"
    )
)
@friendly
def train(
    *,
    method: Annotated[str, typer.Option(help="Registered method (see `dmlbench methods list`).")],
    dataset: Annotated[str, typer.Option(help="Registered dataset (see `dmlbench datasets list`).")],
    backbone: Annotated[str | None, typer.Option(help="Registered backbone or any timm model name.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    phase: Annotated[str | None, typer.Option(help="search: validate on a fold; final: also test once.")] = None,
    fold: Annotated[int | None, typer.Option(help="Validation fold index.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Root of the benchmark datasets ($DMLBENCH_DATA).")] = None,
    output: Annotated[Path | None, typer.Option(help="Folder for checkpoints and metrics (resumes if present).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of trial keys (applied before --set).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="key=value override; a trial key or a method parameter (params.NAME)."),
    ] = None,
    format: Annotated[str, typer.Option(help="Output: table or json.")] = "table",
) -> None:
    """Train one method on one dataset and print the metrics (no Ray)."""
    from dmlbench.engine import train as run_train
    from dmlbench.engine.resolve import layered_config
    from dmlbench.errors import ConfigError

    if format not in ("table", "json"):
        raise ConfigError(f"--format must be table or json, got {format!r}.")
    explicit: dict[str, Any] = {}
    for key, value in (("backbone", backbone), ("epochs", epochs), ("phase", phase), ("fold", fold),
                       ("seed", seed)):
        if value is not None:
            explicit[key] = value
    if data_root is not None:
        explicit["data_root"] = str(data_root)
    if output is not None:
        explicit["output_dir"] = str(output)
    cfg = layered_config(method, dataset, explicit, config, set_ or [])
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    created = out_dir is not None and not out_dir.exists()
    if out_dir is not None:
        last = out_dir / "checkpoints" / "last.pt"
        if last.exists():  # refuse a corrupt or foreign checkpoint before touching the folder
            from dmlbench.engine.trainer import load_checkpoint

            load_checkpoint(last, cfg)
    first: dict[str, float] = {}

    def report(epoch: int, metrics: dict[str, float], _ckpt: str | None) -> None:
        if epoch == 0:
            first.update(metrics)

    try:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(cfg.to_yaml())
        result = run_train(cfg, report=report)
    except DmlbenchError:
        # a run that failed before its first checkpoint leaves no folder it created behind
        if created and out_dir is not None and not (out_dir / "checkpoints" / "last.pt").exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    payload = {
        "method": cfg.method, "dataset": cfg.dataset, "backbone": cfg.backbone, "phase": cfg.phase,
        "eval_split": result.eval_split, "best_epoch": result.best_epoch, "epochs": result.epochs_run,
        "steps": result.steps, "wall_time_s": round(result.wall_time_s, 2), "split_hash": result.split_hash,
        "metrics": result.metrics, "untrained": first,
    }
    if cfg.output_dir:
        (Path(cfg.output_dir) / "result.json").write_text(json.dumps(payload, indent=2))
    if format == "json":
        typer.echo(json.dumps(payload))
        return
    table = Table(title=f"{cfg.method} on {cfg.dataset} ({result.eval_split}, best epoch {result.best_epoch})")
    table.add_column("metric")
    table.add_column("untrained", justify="right")
    table.add_column("trained", justify="right")
    for k in sorted(result.metrics):
        if k in ("loss", "lr", "epoch") or "/" in k:
            continue
        before = f"{first[k]:.4f}" if k in first else ""
        table.add_row(k, before, f"{result.metrics[k]:.4f}")
    console.print(table)
    console.print(f"{result.steps} steps in {result.wall_time_s:.1f}s; split hash {result.split_hash}")


@methods_app.command(
    "list", epilog="Examples:\n\n  dmlbench methods list\n\n  dmlbench methods list --defaults --wide"
)
@friendly
def methods_list(
    *,
    defaults: Annotated[
        bool,
        typer.Option("--defaults", help="also list every parameter with its default (imports the methods: slower)"),
    ] = False,
    wide: Wide = False,
) -> None:
    """List the registered methods and the parameters their search space searches."""
    from dmlbench.cli._catalog import method_catalog, searched_params

    cards = method_catalog()
    cols = [Col("name"), Col("method", wrap=True, wrap_width=34), Col("searched", 1, wrap=True, wrap_width=30)]
    rows = [[c.name, c.summary, ", ".join(searched_params(c.name)) or "-"] for c in cards]
    if defaults:
        from dmlbench.methods import METHODS

        cols.append(Col("parameters (defaults)", 2, wrap=True, wrap_width=40))
        for row, card in zip(rows, cards, strict=True):
            params = METHODS.get(card.name).Params()
            row.append(", ".join(f"{k}={v}" for k, v in params.model_dump().items()))
    print_table(console, cols, rows, title="methods", wide=wide)


@datasets_app.command(
    "list",
    epilog="Examples:\n\n  dmlbench datasets list\n\n  dmlbench datasets list --data-root /data/dml,cars196=/mnt/cars",
)
@friendly
def datasets_list(
    *,
    data_root: Annotated[
        str | None,
        typer.Option(
            "--data-root",
            help="roots holding the benchmarks, comma-separated, NAME=PATH for one dataset (default: $DMLBENCH_DATA)",
        ),
    ] = None,
    wide: Wide = False,
) -> None:
    """List the registered datasets and whether each is ready under the data root."""
    from rich.markup import escape

    from dmlbench.datasets import DATASETS
    from dmlbench.datasets.checks import check_datasets
    from dmlbench.datasets.roots import DATA_ENV, data_roots

    roots = data_roots(data_root)
    colours = {"found": "green", "missing": "yellow", "malformed": "red"}
    rows = []
    for name in DATASETS.names():
        src = DATASETS.get(name)
        if src.embedded:
            status, where = "[green]embedded[/]", "built in, no download"
        else:
            chk = check_datasets([name], data_root)[0]
            status = f"[{colours[chk.status]}]{chk.status}[/]"
            searched = roots.describe(name)
            where = chk.path or (f"{src.folder}/ under {searched}" if searched else f"<data root>/{src.folder}")
        rows.append([name, status, ",".join(map(str, src.recall_ks)), escape(str(where))])
    cols = [Col("name"), Col("status"), Col("recall@k", 1), Col("where", wrap=True, wrap_width=30)]
    if not roots.roots and not roots.explicit:
        caption = f"no data root: pass --data-root DIR or set {DATA_ENV}; `dmlbench datasets check NAME` says how to get one."
    else:
        origin = "--data-root" if data_root else DATA_ENV
        caption = f"data root from {origin}; `dmlbench datasets check NAME` explains a missing or malformed one."
    print_table(console, cols, rows, title="datasets", caption=caption, wide=wide)
