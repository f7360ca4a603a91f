"""Registered datasets. Every module here (other than helpers starting with ``_`` and the
infrastructure modules) registers its datasets with ``@DATASETS.register`` when imported."""

import importlib
import pkgutil

from dmlbench.datasets.base import DATASETS, DatasetCheck, DatasetSource, SampleTable

_INFRA = {"base", "splits", "transforms", "torchdata", "cache", "roots"}
for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _mod.name not in _INFRA and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["DATASETS", "DatasetCheck", "DatasetSource", "SampleTable"]
