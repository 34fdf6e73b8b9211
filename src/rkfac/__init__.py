"""rkfac: K-FAC with randomized eigendecompositions of the Kronecker factors.

    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.SymmetricRandomizedEVD(rank=220))
    loss.backward(); pre.step(); optimizer.step()      # pre.step() rewrites .grad in place

or the ready optimizer ``rkfac.KFAC(model, lr=0.1, **preconditioner_options)``; the comparison
method is ``rkfac.SENG(model, lr=0.05)``.
"""

from rkfac.decompositions import BrandUpdate, Decomposition, ExactEigh, RandomizedSVD, SymmetricRandomizedEVD
from rkfac.lowrank import Eigenpairs
from rkfac.optimizer import KFAC
from rkfac.preconditioner import KFACPreconditioner
from rkfac.seng import SENGPreconditioner
from rkfac.seng_optimizer import SENG

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "SENG",
    "BrandUpdate",
    "Decomposition",
    "Eigenpairs",
    "ExactEigh",
    "KFACPreconditioner",
    "RandomizedSVD",
    "SENGPreconditioner",
    "SymmetricRandomizedEVD",
    "__version__",
]
