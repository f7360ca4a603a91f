"""DiVA (Milbich et al., ECCV 2020): importing this package registers the ``diva`` method."""

from dmlbench.methods.diva.method import DiVA, DivaParams, check_diva_config

__all__ = ["DiVA", "DivaParams", "check_diva_config"]
