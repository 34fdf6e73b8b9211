"""K-FAC: the preconditioner's loop (:mod:`.preconditioner`), its statistics, factor trackers,
non-finite guards and state."""

from rkfac.kfac.preconditioner import LOW_PRECISION_MIN_DIM, KFACPreconditioner
from rkfac.kfac.state import FactorView, LayerView
from rkfac.kfac.trackers import BrandTracker, DenseTracker, FactorTracker

__all__ = [
    "LOW_PRECISION_MIN_DIM",
    "BrandTracker",
    "DenseTracker",
    "FactorTracker",
    "FactorView",
    "KFACPreconditioner",
    "LayerView",
]
