"""nivMF / EL-nivMF: non-isotropic von Mises-Fisher class proxies (Kirchhof, Roth et al., ECCV 2022).

Importing this subpackage registers the method ``"nivmf"`` (see :mod:`.method`); the maths is in
:mod:`.vmf` (sampler, log normaliser) and :mod:`.functional` (log-likelihood, logits, losses).
"""

from dmlbench.methods.nivmf.method import Nivmf, NivmfParams

__all__ = ["Nivmf", "NivmfParams"]
