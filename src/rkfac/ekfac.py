"""``rkfac.LowRankEKFAC``: eigenvalue-corrected K-FAC in the low-rank Kronecker eigenbasis (issue 21).

Per step, as :class:`rkfac.KFAC`, with one change in the direction::

    pre.step()      the K-FAC factors and their decompositions on the usual schedule, and on factor
                    steps the per-row second moments of the gradient in the kept eigenbasis; each
                    layer's .grad becomes the gradient divided, mode pair by mode pair, by those
                    moments plus K-FAC's damping terms (:mod:`rkfac.kfac.eigenvalue_correction`)
    then K-FAC's clip, weight decay, momentum and lr (or the adaptive step with ``loss=``)

EKFAC (George et al. 2018) decomposes dense factors; here the basis is any rkfac decomposition's
(SRE by default), so the step costs O(d² r) per layer as SRE-KFAC's, and the complement of the
kept modes gets one scale per row, per column and one for the rest.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rkfac.kfac import KFACPreconditioner
from rkfac.kfac.eigenvalue_correction import EigenvalueCorrection
from rkfac.optim import KFAC
from rkfac.protocol import Preconditioner


class LowRankEKFAC(KFAC):
    """K-FAC whose per-mode scales are measured from the per-sample gradients (EKFAC) in the
    kept low-rank eigenbasis. Options: :class:`rkfac.KFAC`'s (every one: decomposition, damping,
    clip, lr, momentum, the adaptive step's ``loss=``), plus ``carry`` ("keep", the default;
    "rotate"; "reset"): what measured scales become when a decomposition replaces the basis.
    Embeddings (a diagonal A), B-KFAC's online factors and DDP are handled; ``apply_dtype`` (the
    damped solve's) is refused by name.

    Example::

        opt = rkfac.LowRankEKFAC(model, lr=0.03, momentum=0.9)
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    def __init__(self, model: nn.Module, *, carry: str = "keep", **options: Any) -> None:
        if options.get("apply_dtype") is not None:
            raise ValueError(
                f"apply_dtype={options['apply_dtype']} is the damped Kronecker solve's; rkfac.LowRankEKFAC scales "
                "the rotated gradient in the factors' dtype: drop it"
            )
        self._rule = EigenvalueCorrection(carry)
        super().__init__(model, **options)

    def _preconditioner(self, model: nn.Module, options: dict[str, Any], objects: dict[str, Any]) -> Preconditioner:
        return KFACPreconditioner(model, lr=lambda _step: self.param_groups[0]["lr"], direction=self._rule, **objects, **options)


__all__ = ["LowRankEKFAC"]
