"""Registered methods.

Every module or subpackage of ``dmlbench.methods`` (other than ``base``) is imported here, and that
import registers its methods with ``@METHODS.register`` — no central table to edit (timm style).
"""

import importlib
import pkgutil

from dmlbench.methods.base import METHODS, Batch, LossOutput, Method, MethodParams, TrainContext

for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Batch", "LossOutput", "Method", "MethodParams", "TrainContext"]
