"""rkfac: K-FAC with randomized eigendecompositions of the Kronecker factors.

    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.SymmetricRandomizedEVD(rank=220))
    loss.backward(); pre.step(); optimizer.step()      # pre.step() rewrites .grad in place

or the ready optimizer ``rkfac.KFAC(model, lr=0.1, **preconditioner_options)``; the comparison
method is ``rkfac.SENG(model, lr=0.05)``; Adam in K-FAC's low-rank eigenbasis (randomized SOAP) is
``rkfac.LowRankSOAP(model, lr=3e-3)``; eigenvalue-corrected K-FAC (randomized EKFAC) is
``rkfac.LowRankEKFAC(model, lr=0.03, momentum=0.9)``.
"""

from rkfac.decompositions import BrandUpdate, Decomposition, ExactEigh, RandomizedSVD, SymmetricRandomizedEVD
from rkfac.ekfac import LowRankEKFAC
from rkfac.kfac import KFACPreconditioner
from rkfac.lowrank import Eigenpairs
from rkfac.optim import KFAC, SENG
from rkfac.options import KFACOptions, SENGOptions, SOAPOptions, UpdateOptions
from rkfac.protocol import Preconditioner
from rkfac.seng import SENGPreconditioner
from rkfac.soap import LowRankSOAP

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "SENG",
    "BrandUpdate",
    "Decomposition",
    "Eigenpairs",
    "ExactEigh",
    "KFACOptions",
    "KFACPreconditioner",
    "LowRankEKFAC",
    "LowRankSOAP",
    "Preconditioner",
    "RandomizedSVD",
    "SENGOptions",
    "SENGPreconditioner",
    "SOAPOptions",
    "SymmetricRandomizedEVD",
    "UpdateOptions",
    "__version__",
]
