"""``dmlbench train`` (one run, no Ray), ``dmlbench methods list``, ``dmlbench datasets list``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dmlbench.cli import app, console, datasets_app, friendly, methods_app
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


@methods_app.command("list", epilog="Examples:\n\n  dmlbench methods list")
@friendly
def methods_list() -> None:
    """List the registered methods with their parameters and defaults."""
    from dmlbench.methods import METHODS

    table = Table(title="methods")
    table.add_column("name")
    table.add_column("parameters (defaults)")
    for name in METHODS.names():
        params = METHODS.get(name).Params()
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in params.model_dump().items()))
    console.print(table)


@datasets_app.command("list", epilog="Examples:\n\n  dmlbench datasets list")
@friendly
def datasets_list() -> None:
    """List the registered datasets (embedded ones need no download)."""
    from dmlbench.datasets import DATASETS

    table = Table(title="datasets")
    table.add_column("name")
    table.add_column("kind")
    table.add_column("recall@k")
    table.add_column("where")
    for name in DATASETS.names():
        src = DATASETS.get(name)
        kind = "embedded" if src.embedded else "benchmark"
        where = src.how_to_get if src.embedded else f"$DMLBENCH_DATA/{src.folder}"
        table.add_row(name, kind, ",".join(map(str, src.recall_ks)), where)
    console.print(table)
