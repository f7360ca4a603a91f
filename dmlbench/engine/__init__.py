"""Method-agnostic training (no Ray import anywhere in the engine).

``train`` and ``TrainResult`` are loaded on first use, so that light helpers such as
``dmlbench.engine.runtime.loader_settings`` can be imported (e.g. to print a sweep's plan) without
importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dmlbench.engine.trainer import TrainResult, train

__all__ = ["TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dmlbench.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'dmlbench.engine' has no attribute {name!r}")
