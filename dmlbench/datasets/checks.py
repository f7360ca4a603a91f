"""Check datasets before a long sweep (``dmlbench datasets check``, and the sweep's pre-flight).

``check_datasets`` resolves ``all`` to the four benchmarks, builds each source with the data root
and options, and returns one :class:`~dmlbench.datasets.base.DatasetCheck` per dataset without
raising; ``require_usable`` raises one :class:`~dmlbench.errors.DatasetError` naming every
unusable dataset (what the sweep calls before Ray starts).
"""

from __future__ import annotations

from collections.abc import Sequence

from dmlbench.datasets._common import DEFAULT_OPTIONS, BenchmarkSource
from dmlbench.datasets.base import DATASETS, DatasetCheck
from dmlbench.errors import DatasetError, DmlbenchError

#: what ``all`` means: the four standard DML benchmarks
BENCHMARKS: tuple[str, ...] = ("cub200", "cars196", "sop", "inshop")


def expand_names(names: Sequence[str] | None) -> list[str]:
    """Dataset names with ``all`` (or nothing) meaning the four benchmarks; unknown names raise.

    Example:
        >>> expand_names(["all"])
        ['cub200', 'cars196', 'sop', 'inshop']
        >>> expand_names(["sop,cub200"])
        ['sop', 'cub200']
    """
    raw = [n.strip() for item in (names or ["all"]) for n in item.split(",") if n.strip()]
    out: list[str] = []
    for n in raw:
        for name in BENCHMARKS if n == "all" else (n,):
            if name not in DATASETS:
                DATASETS.get(name)  # raises UnknownNameError listing the valid names
            if name not in out:
                out.append(name)
    return out


def check_datasets(
    names: Sequence[str] | None,
    root: str | None = None,
    **options: bool,
) -> list[DatasetCheck]:
    """One check per dataset (``all``/None: the four benchmarks); never raises for a bad dataset.

    ``options`` (``expect_full``, ``skip_corrupt``, ``verify_images``) go to the on-disk
    benchmarks; embedded datasets ignore them.
    """
    results: list[DatasetCheck] = []
    for name in expand_names(names):
        cls = DATASETS.get(name)
        try:
            if issubclass(cls, BenchmarkSource):
                source = cls(root, **{k: v for k, v in options.items() if k in DEFAULT_OPTIONS})
            else:
                source = cls(root)
            results.append(source.check())
        except DmlbenchError as err:
            results.append(DatasetCheck(name, "malformed", str(err)))
    return results


def require_usable(
    names: Sequence[str] | None, root: str | None = None, **options: bool
) -> list[DatasetCheck]:
    """:func:`check_datasets`, raising one :class:`DatasetError` if any dataset is unusable."""
    checks = check_datasets(names, root, **options)
    bad = [c for c in checks if not c.usable]
    if bad:
        detail = " ".join(f"{c.name} is {c.status}: {c.message}" for c in bad)
        raise DatasetError(f"{len(bad)} of {len(checks)} dataset(s) cannot be used. {detail}")
    return checks
