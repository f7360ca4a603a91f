"""Tables that fit the terminal: low-priority columns are dropped (and named) until the table fits.

Every command prints its tables through :func:`print_table`. A column has a priority: 0 is always
shown; higher numbers are dropped first when the table is wider than the terminal, and a dim line
under the table names what was hidden and that ``--wide`` shows everything. Columns of running text
(messages, row ids) wrap instead of being dropped. ``--wide`` prints the table at its natural width
(for a pager or a file), squeezing nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

Justify = Literal["left", "right", "center"]


@dataclass(frozen=True)
class Col:
    """One column: header, drop priority (0 = never dropped), alignment, and whether it may wrap.

    ``wrap`` columns hold running text: they may wrap down to ``wrap_width`` characters instead of
    being dropped; other columns never wrap (a number or a name split over lines is unreadable).
    """

    header: str
    priority: int = 0
    justify: Justify = "left"
    wrap: bool = False
    wrap_width: int = 28


def _build(
    title: str | None, cols: Sequence[Col], rows: Sequence[Sequence[str]], caption: str | None, *, measure: bool
) -> Table:
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left", header_style="bold")
    for c in cols:
        table.add_column(
            c.header,
            justify=c.justify,
            no_wrap=not c.wrap,
            overflow="fold",
            max_width=c.wrap_width if (c.wrap and measure) else None,
        )
    for r in rows:
        table.add_row(*r)
    return table


def natural_width(console: Console, table: Table) -> int:
    """Width the table needs without squeezing any column."""
    return Measurement.get(console, console.options.update(width=100_000), table).maximum


def fit_columns(
    console: Console, cols: Sequence[Col], rows: Sequence[Sequence[str]], width: int
) -> tuple[list[int], list[str]]:
    """Indices of the columns to show within ``width`` and the headers of the ones dropped.

    Columns are dropped by decreasing priority (the last-listed first among equals) while the table,
    with its wrapping columns at their ``wrap_width``, is wider than ``width``.
    """
    keep = list(range(len(cols)))
    dropped: list[str] = []
    droppable = sorted((i for i, c in enumerate(cols) if c.priority > 0), key=lambda i: (cols[i].priority, i))
    while True:
        table = _build(None, [cols[i] for i in keep], [[r[i] for i in keep] for r in rows], None, measure=True)
        if natural_width(console, table) <= width or not droppable:
            return keep, dropped
        i = droppable.pop()
        keep.remove(i)
        dropped.append(cols[i].header)


def print_table(
    console: Console,
    cols: Sequence[Col],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    caption: str | None = None,
    wide: bool = False,
) -> list[str]:
    """Print the table fitted to the console width (or whole with ``wide``); returns the hidden headers."""
    if wide:
        table = _build(title, cols, rows, caption, measure=False)
        need = natural_width(console, table)
        out = console if need <= console.width else Console(
            file=console.file or sys.stdout, width=need, force_terminal=console.is_terminal
        )
        out.print(table)
        return []
    keep, dropped = fit_columns(console, cols, rows, console.width)
    table = _build(title, [cols[i] for i in keep], [[r[i] for i in keep] for r in rows], caption, measure=False)
    console.print(table)
    if dropped:
        console.print(f"[dim]hidden to fit {console.width} columns: {', '.join(dropped)} (--wide shows all)[/]")
    return dropped
