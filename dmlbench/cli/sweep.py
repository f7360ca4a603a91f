"""``dmlbench sweep``, ``dmlbench submit`` and ``dmlbench status``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmlbench.cli import Wide, app, console, friendly
from dmlbench.cli._tables import Col, print_table


@app.command(epilog="Examples:\n\n  dmlbench sweep --methods nivmf,ccp,diva --datasets embedded --preset smoke\n\n  dmlbench sweep --methods all --datasets all --data-root /data/dml --gpus-per-trial 0.5 --trials 40\n\n  dmlbench sweep --methods ccp --datasets cub200 --address ray://head:10001 --storage s3://bucket/dml\n\n  dmlbench sweep ... --dry-run")
@friendly
def sweep(
    *,
    methods: Annotated[str, typer.Option(help="comma list of methods, or 'all'")],
    datasets: Annotated[str, typer.Option(help="comma list; 'all' = cub200,cars196,sop,inshop; 'embedded' = synthetic,digits")],
    backbones: Annotated[str | None, typer.Option(help="comma list of backbones (timm names or 'tiny'); default resnet50")] = None,
    trials: Annotated[int | None, typer.Option(help="search trials per cell (default 20)")] = None,
    epochs: Annotated[int | None, typer.Option(help="max epochs per trial (ASHA budget, default 30)")] = None,
    gpus_per_trial: Annotated[float | None, typer.Option(help="GPUs per trial; fractions share a GPU (default 0)")] = None,
    cpus_per_trial: Annotated[float | None, typer.Option(help="CPUs per trial (default 1)")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="max trials running at once per cell (default: as resources allow)")] = None,
    search_space: Annotated[Path | None, typer.Option(help="YAML replacing the search space of the method it names")] = None,
    folds: Annotated[int | None, typer.Option(help="class-disjoint validation folds of the train classes (default 4)")] = None,
    final_seeds: Annotated[int | None, typer.Option(help="seeds of the final retraining of each cell's best params (default 3)")] = None,
    seed: Annotated[int | None, typer.Option(help="sweep seed (samplers, splits, final seeds)")] = None,
    name: Annotated[str | None, typer.Option(help="sweep name (default sweep-<spec hash>)")] = None,
    output: Annotated[Path | None, typer.Option(help="results folder (default results/)")] = None,
    address: Annotated[str | None, typer.Option(help="join a Ray cluster (ray://HEAD:10001 or HEAD:6379); default: local Ray")] = None,
    storage: Annotated[str | None, typer.Option(help="shared storage for multi-node: a path all nodes see, s3://..., gs://...")] = None,
    data_root: Annotated[Path | None, typer.Option(help="benchmark datasets root (default $DMLBENCH_DATA)")] = None,
    metric: Annotated[str | None, typer.Option(help="validation metric to maximise (default map_at_r)")] = None,
    grace_period: Annotated[int | None, typer.Option(help="ASHA: epochs before a trial can be pruned (default 1)")] = None,
    dashboard_host: Annotated[str | None, typer.Option(help="bind the local Ray dashboard here (default: no dashboard, localhost)")] = None,
    preset: Annotated[str | None, typer.Option(help="'smoke': tiny backbone and images, few epochs, for CPU")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="resume a sweep (the newest one under --output without --name)")] = False,
    force: Annotated[bool, typer.Option("--force", help="continue a sweep whose spec changed")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print cells, trial counts and cost; start nothing")] = False,
) -> None:
    """Sweep methods × datasets × backbones with Ray Tune + Optuna; rows go to OUTPUT/<sweep>/rows/."""
    from dmlbench.orchestrator import sweep as sw

    spec = sw.build_spec(
        methods=methods, datasets=datasets, preset=preset, backbones=backbones, trials=trials, epochs=epochs,
        gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, max_concurrent=max_concurrent,
        search_space=search_space, folds=folds, final_seeds=final_seeds, seed=seed, name=name, output=output,
        address=address, storage=storage, data_root=data_root, metric=metric, grace_period=grace_period,
        dashboard_host=dashboard_host,
    )  # fmt: skip
    sw.run(spec, resume=resume, force=force, dry_run=dry_run, echo=lambda s: console.print(s, highlight=False, soft_wrap=True))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Examples:\n\n  dmlbench submit --address http://head:8265 -- sweep --methods ccp --datasets cub200 --data-root /data/dml",
)
@friendly
def submit(
    ctx: typer.Context,
    *,
    address: Annotated[str, typer.Option(help="Ray dashboard URL of the cluster, e.g. http://HEAD:8265")],
) -> None:
    """Submit a sweep as a Ray Job: dmlbench submit --address http://HEAD:8265 -- sweep --methods ..."""
    from dmlbench.orchestrator import jobs

    job_id = jobs.submit(address, list(ctx.args))
    console.print(jobs.follow_hint(address, job_id), highlight=False, soft_wrap=True)


@app.command(epilog="Examples:\n\n  dmlbench status results/")
@friendly
def status(
    results: Annotated[Path, typer.Argument(help="results folder or one sweep folder")] = Path("results"),
    *,
    wide: Wide = False,
) -> None:
    """Trials done / running / pending per cell of each sweep, and an ETA."""
    from dmlbench.orchestrator.status import eta_seconds, sweep_status

    cells = sweep_status(results)
    cols = [
        Col("sweep", 3), Col("cell"), Col("phase"), Col("done", justify="right"), Col("running", justify="right"),
        Col("pending", justify="right"), Col("statuses", 2, wrap=True, wrap_width=24),
    ]  # fmt: skip
    rows = [
        [c.sweep_id, c.cell, c.phase, str(c.done), str(c.running), str(c.pending),
         ", ".join(f"{k}={v}" for k, v in c.statuses.items() if v) or "-"]
        for c in cells
    ]  # fmt: skip
    sweeps = sorted({c.sweep_id for c in cells})
    if len(sweeps) == 1:  # one sweep: its name goes in the title, not in every row
        cols, rows = cols[1:], [r[1:] for r in rows]
    print_table(console, cols, rows, title=f"sweep {sweeps[0]}" if len(sweeps) == 1 else "sweeps", wide=wide)
    eta = eta_seconds(cells)
    done, total = sum(c.done for c in cells), sum(c.planned for c in cells)
    console.print(f"{done}/{total} trials done; ETA " + (f"{eta / 60:.1f} min" if eta is not None else "unknown"))
