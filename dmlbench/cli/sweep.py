"""``dmlbench sweep``, ``dmlbench submit`` and ``dmlbench status``."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from dmlbench.cli import Wide, app, console, friendly
from dmlbench.cli._tables import Col, print_table
from dmlbench.errors import SweepInterrupted

PREFLIGHT_HELP = (
    "Preflight a sweep (same options as sweep): every cell trains a few steps of a search and a final trial on the "
    "real data and backbone, evaluates its largest splits with every metric, saves and resumes a checkpoint; prints "
    "time, memory, checkpoint and cache size and the estimated cost per cell; exit 1 if a cell cannot run. Writes no rows."
)


@app.command(epilog="Examples:\n\n  dmlbench sweep --methods nivmf,ccp,diva --datasets embedded --preset smoke\n\n  dmlbench sweep --methods all --datasets all --data-root /data/dml --gpus-per-trial 0.5 --trials 40\n\n  dmlbench sweep --methods ccp --datasets cub200 --address head:6379 --storage s3://bucket/dml\n\n  dmlbench sweep ... --dry-run\n\n  dmlbench sweep ... --preflight   (or dmlbench preflight ...)")
@friendly
def sweep(
    ctx: typer.Context,
    *,
    methods: Annotated[str, typer.Option(help="comma list of methods, or 'all'")],
    datasets: Annotated[str, typer.Option(help="comma list; 'all' = cub200,cars196,sop,inshop; 'embedded' = synthetic,digits")],
    backbones: Annotated[str | None, typer.Option(help="comma list of backbones (timm names, 'bninception', 'tiny'); default: the protocol's (mlrc: bninception; paper: each recipe's)")] = None,
    protocol: Annotated[str | None, typer.Option(help="mlrc (default: fair search, fold models) or paper (each method's published recipe, no search); see docs/protocol.md")] = None,
    embedding_dims: Annotated[str | None, typer.Option(help="comma list of embedding sizes, a sweep axis (default: mlrc 128; paper: every size a method's paper published)")] = None,
    trials: Annotated[int | None, typer.Option(help="search trials per cell (default 20)")] = None,
    epochs: Annotated[int | None, typer.Option(help="cap on every recipe's epochs (default: none, each recipe its own); recorded as budget_capped")] = None,
    gpus_per_trial: Annotated[float | None, typer.Option(help="GPUs per trial; fractions share a GPU (default: 1 on a cluster with GPUs, else 0)")] = None,
    cpus_per_trial: Annotated[float | None, typer.Option(help="CPUs per trial; data-loader workers and threads follow it (default 1; 4-8 for a GPU trial)")] = None,
    allow_cpu: Annotated[bool, typer.Option("--allow-cpu", help="let trials on the benchmark datasets train on CPU (refused otherwise)")] = False,
    max_concurrent: Annotated[int | None, typer.Option(help="max trials running at once per cell (default: as resources allow)")] = None,
    sweep_max_concurrent: Annotated[int | None, typer.Option(help="max trials running at once in the whole sweep, all cells together, e.g. your share of a shared cluster (default: as resources allow)")] = None,
    search_space: Annotated[Path | None, typer.Option(help="YAML replacing the search space of the method it names")] = None,
    folds: Annotated[int | None, typer.Option(help="class-disjoint validation folds of the train classes (default 4)")] = None,
    search_folds: Annotated[int | None, typer.Option(help="fold models per search trial, scored by their mean (default: all folds; 1 = a hold-out, labelled holdout)")] = None,
    final_seeds: Annotated[int | None, typer.Option(help="seeds of the final retraining of each cell's best params (default 3)")] = None,
    seed: Annotated[int | None, typer.Option(help="sweep seed (samplers, splits, final seeds)")] = None,
    name: Annotated[str | None, typer.Option(help="sweep name (default sweep-<spec hash>)")] = None,
    output: Annotated[Path | None, typer.Option(help="results folder (default results/)")] = None,
    address: Annotated[str | None, typer.Option(help="join the Ray cluster at HEAD:6379 (run on a node of it; else use `dmlbench submit`); default: $RAY_ADDRESS if set, else a private local Ray")] = None,
    storage: Annotated[str | None, typer.Option(help="shared storage for multi-node: a path all nodes see, s3://..., gs://...")] = None,
    data_root: Annotated[Path | None, typer.Option(help="benchmark datasets root (default $DMLBENCH_DATA)")] = None,
    subset: Annotated[bool, typer.Option("--subset", help="accept partial benchmark datasets (full-size counts not asserted)")] = False,
    metric: Annotated[str | None, typer.Option(help="validation metric to maximise (default map_at_r)")] = None,
    grace_period: Annotated[int | None, typer.Option(help="ASHA: epochs before a trial can be pruned (default: what each method's recipe needs; a larger value wins)")] = None,
    reproducible: Annotated[bool, typer.Option("--reproducible", help="one search trial at a time per cell and deterministic kernels: the same command and seed give the same leaderboard on the same hardware")] = False,
    dashboard_host: Annotated[str | None, typer.Option(help="bind the local Ray dashboard here (default: no dashboard, localhost)")] = None,
    preset: Annotated[str | None, typer.Option(help="'smoke': tiny backbone and images, few epochs, for CPU")] = None,
    checkpoint_period: Annotated[float | None, typer.Option(help="seconds between a trial's checkpoints in --storage (default 600)")] = None,
    checkpoint_every_epochs: Annotated[int | None, typer.Option(help="also checkpoint every N epochs (default: by time only)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="resume a sweep (the newest one under --output without --name)")] = False,
    force: Annotated[bool, typer.Option("--force", help="continue a sweep whose spec changed")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print cells, trial counts and cost; start nothing (works without the datasets)")] = False,
    plan_format: Annotated[str, typer.Option("--format", help="with --dry-run: text or json (every cell's fully resolved trial config)")] = "text",
    preflight: Annotated[bool, typer.Option("--preflight", help="run the preflight instead of the sweep (see dmlbench preflight --help)")] = False,
    preflight_steps: Annotated[int, typer.Option(help="with --preflight: timed training steps per trial")] = 3,
    wide: Wide = False,
) -> None:
    """Sweep methods × datasets × backbones with Ray Tune + Optuna; rows go to OUTPUT/<sweep>/rows/."""
    from dmlbench.orchestrator import sweep as sw

    dims = None
    if embedding_dims is not None:
        try:
            dims = tuple(int(x) for x in embedding_dims.split(",") if x.strip())
        except ValueError:
            raise typer.BadParameter(f"--embedding-dims takes a comma list of integers, got {embedding_dims!r}") from None
    spec = sw.build_spec(
        methods=methods, datasets=datasets, preset=preset, backbones=backbones, trials=trials, epochs=epochs,
        protocol=protocol, embedding_dims=dims, search_folds=search_folds, reproducible=reproducible or None,
        gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, max_concurrent=max_concurrent,
        sweep_max_concurrent=sweep_max_concurrent,
        search_space=search_space, folds=folds, final_seeds=final_seeds, seed=seed, name=name, output=output,
        address=address, storage=storage, data_root=data_root, metric=metric, grace_period=grace_period,
        dashboard_host=dashboard_host, allow_cpu=allow_cpu or None, subset=subset or None,
        checkpoint_period_s=checkpoint_period, checkpoint_every_epochs=checkpoint_every_epochs,
    )  # fmt: skip
    if preflight or ctx.info_name == "preflight":
        if dry_run or resume:
            raise typer.BadParameter("the preflight runs no sweep: drop --dry-run and --resume.")
        _preflight(spec, preflight_steps, wide)
        return
    try:
        sw.run(spec, resume=resume, force=force, dry_run=dry_run, plan_format=plan_format, echo=lambda s: console.print(s, highlight=False, soft_wrap=True))
    except SweepInterrupted as err:
        raise SweepInterrupted(f"{err}\n  {_command_line()}") from None
    except KeyboardInterrupt:  # before the sweep's own Ctrl-C handling (validating, planning)
        raise SweepInterrupted("stopped by Ctrl-C before the sweep started; nothing was started.") from None


app.command("preflight", help=PREFLIGHT_HELP, epilog="Examples:\n\n  dmlbench preflight --methods nivmf,ccp,diva --datasets all --data-root /data/dml\n\n  dmlbench preflight --methods ccp --datasets sop --data-root /data/dml --preset smoke --allow-cpu")(sweep)


def _preflight(spec: object, steps: int, wide: bool) -> None:
    from dmlbench.orchestrator import preflight as pf

    def echo(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True, markup=False)

    t0 = time.perf_counter()
    result = pf.run_checked(spec, steps=steps, echo=echo)  # type: ignore[arg-type]
    cols = [
        Col("cell"), Col("status", wrap=True, wrap_width=48), Col("step s", 1, "right"), Col("eval s", 1, "right"),
        Col("host peak", 3, "right"), Col("device peak", 4, "right"), Col("checkpoint", 3, "right"),
        Col("cache", 2, "right"), Col("est. cost", 0, "right"),
    ]  # fmt: skip
    print_table(console, cols, pf.table_rows(result.reports), title=f"preflight of sweep {result.sweep_id}",
                caption=pf.table_caption(result, time.perf_counter() - t0), wide=wide)  # fmt: skip
    bad = pf.failures(result.reports)
    if bad:
        raise pf.PreflightFailed(
            f"{len(bad)} of {len(result.reports)} cell(s) cannot run ({', '.join(r.cell.key for r in bad)}); the table "
            "says why; fix them and run the preflight again before the sweep."
        )
    echo(f"all {len(result.reports)} cell(s) can run; start the sweep with the same options without --preflight "
         "(it reuses the image caches built here).")


def _command_line() -> str:
    """This command as the user would type it again (to resume an interrupted sweep)."""
    return shlex.join(["dmlbench", *sys.argv[1:]])


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Examples:\n\n  dmlbench submit --address http://head:8265 -- sweep --methods ccp --datasets cub200 --data-root /data/dml --output /mnt/nfs/dmlbench\n\n  dmlbench submit --wait --address http://head:8265 -- sweep --methods ccp --datasets cub200 --output ~/dmlbench-results",
)
@friendly
def submit(
    ctx: typer.Context,
    *,
    address: Annotated[str, typer.Option(help="Ray dashboard URL of the cluster, e.g. http://HEAD:8265")],
    wait: Annotated[bool, typer.Option("--wait", help="follow the job's log until it ends; exit non-zero if it fails")] = False,
) -> None:
    """Submit a sweep as a Ray Job: dmlbench submit --address http://HEAD:8265 -- sweep ... --output /abs/path

    --output (and --storage) must be absolute paths on the cluster (or a URI for --storage). A token
    for a cluster with token authentication is read from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token (see docs/cluster.md).
    """
    from dmlbench.orchestrator import jobs

    def echo(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True, markup=False)

    client, job_id = jobs.submit(address, list(ctx.args))
    echo(jobs.follow_hint(address, job_id, jobs.option_value(list(ctx.args), "--output")))
    if wait:
        try:
            status = jobs.follow(client, job_id, echo)
        except KeyboardInterrupt:
            echo(f"stopped following; job {job_id} keeps running on the cluster (see the commands above).")
            raise typer.Exit(130) from None
        echo(f"job {job_id} {status}")


@app.command(epilog="Examples:\n\n  dmlbench status results/")
@friendly
def status(
    results: Annotated[Path, typer.Argument(help="results folder or one sweep folder")] = Path("results"),
    *,
    wide: Wide = False,
) -> None:
    """Trials done / running / pending per cell of each sweep, and an ETA."""
    from dmlbench.orchestrator.status import format_eta, progress_of, sweep_eta

    progress = progress_of(results)
    cells = [c for p in progress for c in p.cells]
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
    done, total = sum(c.done for c in cells), sum(c.planned for c in cells)
    console.print(f"{done}/{total} trials done; ETA {format_eta(sweep_eta(progress))}")
