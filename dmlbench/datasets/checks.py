"""Check datasets before a long sweep (``dmlbench datasets check``, and the sweep's pre-flight).

``check_datasets`` resolves ``all`` to the four benchmarks, builds each source with the data root
and options, and returns one :class:`~dmlbench.datasets.base.DatasetCheck` per dataset without
raising; ``require_usable`` raises one :class:`~dmlbench.errors.DatasetError` naming every
unusable dataset (what the sweep calls before Ray starts); ``image_problems`` decodes the images of
one split (or a seeded sample of them) and returns each missing, empty, truncated or corrupt file
with one sentence naming it (what the preflight calls).
"""

from __future__ import annotations

from collections.abc import Sequence

from dmlbench.datasets._common import DEFAULT_OPTIONS, BenchmarkSource, ImageProblem
from dmlbench.datasets.base import DATASETS, DatasetCheck, DatasetSource
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
        source: DatasetSource
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


def image_problems(
    name: str,
    root: str | None = None,
    part: str | None = None,
    sample: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> list[ImageProblem]:
    """The unusable images of dataset ``name``'s split ``part`` (None: all; "train", "test",
    "query", "gallery"), of a seeded random ``sample`` of them when given.

    ``root`` is the ``--data-root`` text. Raises :class:`DatasetError` when the dataset itself cannot
    be found or its list files are malformed; embedded datasets have no files and return ``[]``.

    Example:
        >>> [p.message for p in image_problems("cub200", "/data/dml", part="train", sample=500)]  # doctest: +SKIP
        ['the image /data/dml/CUB_200_2011/images/001.Black_footed_Albatross/x.jpg of cub200 is truncated (...); ...']
    """
    cls = DATASETS.get(name)
    if not issubclass(cls, BenchmarkSource):
        return []
    return cls(root, expect_full=False).image_problems(part, sample=sample, seed=seed, workers=workers)
