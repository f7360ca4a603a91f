"""Registered datasets. Every module here (other than helpers starting with ``_`` and the
infrastructure modules) registers its datasets with ``@DATASETS.register`` when imported."""

import importlib
import os
import pkgutil
from typing import Any

from dmlbench.datasets.base import DATASETS, DatasetCheck, DatasetSource, SampleTable
from dmlbench.datasets.roots import DATA_ENV

_INFRA = {"base", "splits", "transforms", "torchdata", "cache", "roots"}
for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _mod.name not in _INFRA and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")


def data_root(cfg: Any) -> str | None:
    """A trial config's (or sweep spec's) ``--data-root`` text, else ``$DMLBENCH_DATA`` (:mod:`.roots`
    parses it)."""
    return cfg.data_root or os.environ.get(DATA_ENV)


def trial_source(cfg: Any) -> DatasetSource:
    """The dataset a trial config names, where its data root says (lists only; decodes nothing)."""
    return DATASETS.get(cfg.dataset)(data_root(cfg), **cfg.dataset_kwargs)


def trial_split_hash(cfg: Any) -> str:
    """The fold manifest hash a trial of ``cfg`` uses (reads the dataset's lists, decodes nothing).
    Light to import: the sweep driver computes it once per cell without loading the training engine."""
    from dmlbench.datasets.splits import make_manifest

    return make_manifest(trial_source(cfg).table(), cfg.dataset, cfg.num_folds, cfg.split_seed).hash


__all__ = ["DATASETS", "DatasetCheck", "DatasetSource", "SampleTable", "data_root", "trial_source", "trial_split_hash"]
