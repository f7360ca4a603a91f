"""Check datasets before a long sweep (``dmlbench datasets check``, and the sweep's pre-flight).

``check_datasets`` resolves ``all`` to the four benchmarks, builds each source with the data root
and options, and returns one :class:`~dmlbench.datasets.base.DatasetCheck` per dataset without
raising; ``require_usable`` raises one :class:`~dmlbench.errors.DatasetError` naming every
unusable dataset (what the sweep calls before Ray starts), worded by ``unusable_message`` (one or
two sentences, the fix said once however many datasets are affected); ``image_problems`` decodes the images of
one split (or a seeded sample of them) and returns each missing, empty, truncated or corrupt file
with one sentence naming it (what the preflight calls).
"""

from __future__ import annotations

from collections.abc import Sequence

from dmlbench.datasets._common import DEFAULT_OPTIONS, BenchmarkSource, ImageProblem
from dmlbench.datasets.base import DATASETS, DatasetCheck, DatasetSource
from dmlbench.datasets.roots import DATA_ENV, data_roots
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


def _and(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def unusable_message(checks: Sequence[DatasetCheck], root: str | None = None) -> str | None:
    """One or two sentences for the datasets in ``checks`` that cannot be used (None if all can).

    One unusable dataset gets its own check message (it names the path and the fix). Several get
    one sentence naming them, with the fix said once: where to point ``--data-root`` when there is
    no data root at all (or it does not exist), else the ``dmlbench datasets check`` command that
    details each one. ``tests/test_cli_ux.py`` shows the wordings.
    """
    bad = [c for c in checks if not c.usable]
    if not bad:
        return None
    if len(bad) == 1:
        return bad[0].message
    names = [c.name for c in bad]
    roots = data_roots(root)
    folders = ", ".join(f"{DATASETS.get(n).folder}/" for n in names)
    if not roots.roots and not all(n in roots.explicit for n in names):
        return (
            f"no data root for {_and(names)}: pass --data-root DIR or set ${DATA_ENV} to the folder that holds "
            f"{folders} (docs/datasets.md says where to get each)."
        )
    absent = [str(r) for r in roots.roots if not r.is_dir()]
    if absent and len(absent) == len(roots.roots):
        return (
            f"the data root {_and(absent)} does not exist; pass --data-root DIR or set ${DATA_ENV} to the folder "
            f"that holds {folders}."
        )
    parts = []
    for status in ("missing", "malformed"):
        these = [c.name for c in bad if c.status == status]
        if these:
            parts.append(f"{_and(these)} {'is' if len(these) == 1 else 'are'} {status}")
    where = roots.text or ", ".join(str(r) for r in roots.roots)
    option = f" --data-root {where}" if root else ""
    return (
        f"{' and '.join(parts)} under the data root {where}; `dmlbench datasets check {' '.join(names)}{option}` "
        "says what is wrong with each and how to fix it."
    )


def require_usable(
    names: Sequence[str] | None, root: str | None = None, **options: bool
) -> list[DatasetCheck]:
    """:func:`check_datasets`, raising one :class:`DatasetError` (:func:`unusable_message`) if any dataset is unusable."""
    checks = check_datasets(names, root, **options)
    message = unusable_message(checks, root)
    if message is not None:
        raise DatasetError(message)
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
