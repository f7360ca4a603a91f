"""dmlbench: distributed benchmark and sweep orchestrator for deep metric learning."""

__version__ = "0.1.0"
