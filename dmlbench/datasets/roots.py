"""Where the benchmarks live: the ``--data-root`` text (and ``$DMLBENCH_DATA``) parsed once.

The text is a comma-separated list of entries. A plain entry is a data root, searched for every
benchmark; a ``name=path`` entry gives one dataset its own location (its folder in any accepted
layout, or a folder that holds it)::

    /data/dml                                   one root for all four benchmarks
    /data/dml,cars196=/mnt/cars                 CARS196 from /mnt/cars, the others from /data/dml
    cub200=/a/CUB_200_2011,sop=/b               two explicit datasets, no shared root

``TrialConfig.data_root`` and ``SweepSpec.data_root`` carry this same text as a plain string, so
a sweep passes it to every trial unchanged; each dataset resolves it with :func:`data_roots`.
Names are the registry names (``cub200``, ``cars196``, ``sop``, ``inshop``) or any folder name the
dataset is found under (``CUB_200_2011``, ``cars``, ``Stanford_Online_Products``, ``In-shop``...),
compared case-insensitively without punctuation (:func:`folder_key`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dmlbench.errors import ConfigError, close_matches

DATA_ENV = "DMLBENCH_DATA"
#: a ``name=`` prefix: letters, digits, ``_``, ``-``, spaces and dots, no path separator
_NAME_ENTRY = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9_. -]*)=(.*)$")


def folder_key(name: str) -> str:
    """A folder or dataset name reduced for case- and punctuation-insensitive comparison.

    Example:
        >>> folder_key("In-shop Clothes Retrieval Benchmark"), folder_key("CUB_200_2011")
        ('inshopclothesretrievalbenchmark', 'cub2002011')
    """
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class DataRoots:
    """A parsed ``--data-root``: shared roots (searched in order) and per-dataset paths.

    Attributes:
        roots: plain entries, searched for every dataset without an explicit path.
        explicit: registry name -> path given as ``name=path``.
        text: the text it was parsed from (for messages).
    """

    roots: tuple[Path, ...] = ()
    explicit: Mapping[str, Path] = field(default_factory=dict)
    text: str = ""

    def for_dataset(self, name: str) -> tuple[Path, ...]:
        """The folders to search for dataset ``name``: its explicit path only, else every root."""
        if name in self.explicit:
            return (self.explicit[name],)
        return self.roots

    def describe(self, name: str) -> str:
        """How the locations of ``name`` were given, for messages (``cars196=/mnt/cars`` or the roots)."""
        if name in self.explicit:
            return f"{name}={self.explicit[name]}"
        return ", ".join(str(r) for r in self.roots)

    def with_defaults(self, other: DataRoots) -> DataRoots:
        """These entries, completed by ``other``'s: its roots when this has none, its explicit
        paths for the datasets this does not name."""
        return DataRoots(
            self.roots or other.roots,
            {**other.explicit, **self.explicit},
            self.text or other.text,
        )


def _aliases() -> dict[str, str]:
    """``folder_key(alias) -> registry name`` for every on-disk dataset (name and folder names)."""
    from dmlbench.datasets.base import DATASETS

    out: dict[str, str] = {}
    for name in DATASETS.names():
        cls = DATASETS.get(name)
        if cls.embedded:
            continue
        for alias in (name, cls.folder, *cls.folder_names):
            out.setdefault(folder_key(alias), name)
    return out


def parse_data_root(text: str | os.PathLike[str] | None) -> DataRoots:
    """Parse ``--data-root`` text (see the module docstring); bad entries raise :class:`ConfigError`.

    Pure: reads neither the environment nor the disk (paths are only ``expanduser``-ed).

    Example:
        >>> r = parse_data_root("/data/dml, CARS=/mnt/cars")
        >>> [str(p) for p in r.roots], {k: str(v) for k, v in r.explicit.items()}
        (['/data/dml'], {'cars196': '/mnt/cars'})
    """
    raw = "" if text is None else os.fspath(text)
    roots: list[Path] = []
    explicit: dict[str, Path] = {}
    aliases: dict[str, str] | None = None
    for entry in raw.split(","):
        entry = entry.strip()
        if not entry:
            continue
        m = _NAME_ENTRY.match(entry)
        if m is None:  # a plain path (may itself contain '=' after a '/')
            roots.append(Path(entry).expanduser())
            continue
        key, value = m.group(1).strip(), m.group(2).strip()
        if aliases is None:
            aliases = _aliases()
        name = aliases.get(folder_key(key))
        if name is None:
            valid = sorted(set(aliases.values()))
            hint = sorted({aliases[k] for k in close_matches(folder_key(key), sorted(aliases))})
            did = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise ConfigError(
                f"--data-root entry {entry!r} names no dataset{did}; use name=path with one of "
                f"{', '.join(valid)}, or a plain folder."
            )
        if not value:
            raise ConfigError(f"--data-root entry {entry!r} has no path after '='; write {name}=/path/to/{name}.")
        if name in explicit:
            raise ConfigError(
                f"--data-root gives {name} twice ({explicit[name]} and {value}); keep one {name}=path entry."
            )
        explicit[name] = Path(value).expanduser()
    return DataRoots(tuple(roots), explicit, raw.strip())


def data_roots(text: str | os.PathLike[str] | None) -> DataRoots:
    """:func:`parse_data_root` of ``text`` completed by ``$DMLBENCH_DATA`` (same syntax).

    ``$DMLBENCH_DATA``'s roots are searched only when ``text`` has no plain root, and its
    ``name=path`` entries apply to the datasets ``text`` does not name.
    """
    given = parse_data_root(text)
    env = os.environ.get(DATA_ENV, "")
    if not env:
        return given
    return given.with_defaults(parse_data_root(env))
