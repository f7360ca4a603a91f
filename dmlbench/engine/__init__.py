"""Method-agnostic training (no Ray import anywhere in the engine)."""

from dmlbench.engine.trainer import TrainResult, train

__all__ = ["TrainResult", "train"]
