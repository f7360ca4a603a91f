"""CCP: Deep Metric Learning with Chance Constraints (spec ``shared/specs/ccp.md``).

Importing this subpackage registers the method ``ccp`` (:class:`~dmlbench.methods.ccp.method.CCP`).
"""

from dmlbench.methods.ccp.method import CCP
from dmlbench.methods.ccp.params import CCPParams

__all__ = ["CCP", "CCPParams"]
