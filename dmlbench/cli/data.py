"""``dmlbench datasets check``: is every requested dataset present and well-formed?"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from dmlbench.cli import EXIT_USER_ERROR, Wide, console, datasets_app, friendly
from dmlbench.cli._tables import Col, print_table


@datasets_app.command(
    "check",
    epilog="Examples:\n\n  dmlbench datasets check all --data-root /data/dml\n\n"
    "  dmlbench datasets check all --data-root /data/dml,cars196=/mnt/cars\n\n"
    "  dmlbench datasets check cub200 sop --verify",
)
@friendly
def check(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            help="datasets to check (comma or space separated); 'all' = cub200, cars196, sop, inshop"
        ),
    ] = None,
    *,
    data_root: Annotated[
        str | None,
        typer.Option(
            "--data-root",
            help="folder holding the datasets, and/or name=path entries, comma separated "
            "(e.g. /data/dml,cars196=/mnt/cars; default $DMLBENCH_DATA)",
        ),
    ] = None,
    skip_corrupt: Annotated[
        bool, typer.Option("--skip-corrupt", help="decode every image; count and skip the ones that fail")
    ] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="decode every image and fail on the first corrupt one")
    ] = False,
    subset: Annotated[
        bool, typer.Option("--subset", help="accept partial datasets: do not assert the full-size counts")
    ] = False,
    wide: Wide = False,
) -> None:
    """Per dataset: found / missing / malformed, image and class counts, split hash, and where it was found.

    Exits with status 2 if any requested dataset is unusable.
    """
    from dmlbench.datasets.checks import check_datasets

    results = check_datasets(
        names, data_root, expect_full=not subset, skip_corrupt=skip_corrupt, verify_images=verify
    )
    cols = [
        Col("dataset"),
        Col("status"),
        Col("images", 2, "right"),
        Col("classes", 3, "right"),
        Col("train / test images", 4, "right"),
        Col("split hash", 1),
        Col("message", wrap=True, wrap_width=30),
    ]
    colours = {"found": "green", "missing": "yellow", "malformed": "red"}
    rows = []
    for r in results:
        c = r.counts
        rows.append([
            r.name,
            f"[{colours[r.status]}]{r.status}[/]",
            f"{c['images']:,}" if "images" in c else "-",
            f"{c['classes']:,}" if "classes" in c else "-",
            f"{c['train_images']:,} / {c['test_images']:,}" if "train_images" in c else "-",
            r.split_hash or "-",
            escape(r.message),
        ])  # fmt: skip
    print_table(console, cols, rows, title="datasets", wide=wide)
    for r in results:
        if r.path:
            console.print(f"{r.name}: {escape(str(r.path))} (layout {r.layout})", highlight=False)
    if not all(r.usable for r in results):
        raise typer.Exit(EXIT_USER_ERROR)
