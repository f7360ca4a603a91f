"""The ``dmlbench`` command line (Typer).

Commands are thin: parse options, call one library function, print. Each command module in this
package registers its commands on :data:`app` when imported; :func:`main` imports them all.
Errors the user can fix (:class:`dmlbench.errors.DmlbenchError`) print one sentence to stderr and
exit without a traceback, with the error's ``exit_code``: 2 for bad input, 130 for a sweep stopped
by Ctrl-C, 1 for a sweep with cells that produced no complete trial or a submitted job that failed
(and 3, from the driver's watchdog, for a Ray cluster lost under a running sweep).

Start-up must stay fast (``dmlbench --help`` well under a second): command modules import only
typer, rich and light dmlbench modules at the top; torch, ray, optuna, pandas and matplotlib are
imported inside the command that needs them (``tests/test_cli_fast.py`` checks this).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from dmlbench.errors import DmlbenchError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="dmlbench",
    help="Benchmark and sweep deep metric learning methods (nivMF, DiVA, CCP, baselines) on Ray Tune + Optuna.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
methods_app = typer.Typer(help="Registered methods.", no_args_is_help=True)
datasets_app = typer.Typer(help="Registered datasets and their status on disk.", no_args_is_help=True)
app.add_typer(methods_app, name="methods")
app.add_typer(datasets_app, name="datasets")

console = Console()
err_console = Console(stderr=True)

EXIT_USER_ERROR = 2

#: the ``--wide`` option of every command that prints a table (see :mod:`dmlbench.cli._tables`)
Wide = Annotated[
    bool, typer.Option("--wide", help="show every column, even when the table is wider than the terminal")
]


def friendly(fn: F) -> F:
    """Decorator for commands: a :class:`DmlbenchError` becomes one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DmlbenchError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper  # type: ignore[return-value]


def load_commands() -> None:
    """Import every command module of this package (each registers its commands)."""
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def main() -> None:
    load_commands()
    try:
        app()
    except DmlbenchError as err:  # raised outside a @friendly command
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)


load_commands()
