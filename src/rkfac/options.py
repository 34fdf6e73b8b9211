"""The library's options, each declared once with its default, bounds and help.

- :class:`KFACOptions`: everything :class:`rkfac.KFACPreconditioner` computes with;
- :class:`SENGOptions`: the same for :class:`rkfac.SENGPreconditioner`;
- :class:`SOAPOptions`: the Adam moments of :class:`rkfac.LowRankSOAP` (Adam in K-FAC's eigenbasis);
- :class:`UpdateOptions`: the SGD step that :class:`rkfac.KFAC` and :class:`rkfac.SENG` take
  after preconditioning (lr, momentum, weight decay).

The constructors accept these fields as keyword arguments (``rkfac.KFAC(model, lr=0.1,
damping=0.05)``) or a ready object (``options=KFACOptions(...)``); the experiment code builds
its run configuration and command-line flags from the same fields (see :mod:`rkfac.schema`).
Objects that are not settings (the model, a GradScaler, a process group, a timer) stay plain
constructor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rkfac.clipping import CLIP_MODES
from rkfac.damping import DAMPING_MODES, DAMPING_SCALES
from rkfac.decompositions import Decomposition, SymmetricRandomizedEVD
from rkfac.mc_fisher import MC_LOSSES
from rkfac.schedules import FloatSchedule, IntSchedule
from rkfac.schema import option, validate

FISHER_TYPES = ("empirical", "mc")
LOSS_REDUCTIONS = ("mean", "sum")
KFAC_APPROX = ("expand", "reduce")

SkipRule = str | type[nn.Module]


@dataclass(frozen=True)
class KFACOptions:
    """How K-FAC builds, decomposes and applies the Kronecker factors (spec sections 1–3)."""

    decomposition: Decomposition = option(
        SymmetricRandomizedEVD(), "how factors are decomposed (default: the paper's SRE, r = 220)", kind="any"
    )
    damping: FloatSchedule = option(
        0.1, "damping δ > 0 (number or callable of the step)", low=0.0, low_inclusive=False, schedule=True
    )
    damping_mode: str = option("relative", "relative: λ = δ·λ_max per factor; pi: factored Tikhonov", choices=DAMPING_MODES)
    damping_scale: str = option(
        "factor", "factor: δ as damping_mode says; tikhonov: δ is λ of A⊗G + λI, split so λ_A λ_G = λ", choices=DAMPING_SCALES
    )
    damping_floor: float = option(0.0, "tikhonov scale: each factor's damping is at least this fraction of its λ_max", low=0.0)
    factor_decay: float = option(0.95, "ρ of the factors' exponential average", low=0.0, high=1.0, high_inclusive=False)
    factor_every: IntSchedule = option(10, "steps between factor updates", kind="int", low=1, schedule=True)
    inverse_every: IntSchedule = option(50, "steps between decompositions", kind="int", low=1, schedule=True)
    clip: str | None = option("rms", "scaling of the directions: rms, kl or none (None)", choices=(*CLIP_MODES, "none"))
    clip_value: float = option(0.07, "κ of the clip", low=0.0, low_inclusive=False)
    lr: FloatSchedule = option(0.1, "the learning rate the kl clip assumes (rkfac.KFAC keeps it in sync)", low=0.0, schedule=True)
    fisher: str = option("empirical", "empirical (the user's backward) or mc (sampled labels)", choices=FISHER_TYPES)
    mc_loss: str = option("cross_entropy", "the loss whose predictive distribution mc samples", choices=MC_LOSSES)
    loss_reduction: str = option("mean", "how the user's loss combines samples (sets the scale of G)", choices=LOSS_REDUCTIONS)
    skip: tuple[SkipRule, ...] = option((), "layers left alone: name patterns or module types", kind="any")
    seed: int = option(0, "seeds every sketch and sampled label", kind="int", low=-(2**63))
    batch_dim: int = option(0, "where the samples are in inputs with shared dims (1: sequence-first)", kind="int", low=0)
    kfac_approx: str = option("expand", "shared rows (tokens, positions) as samples, or reduced per sample", choices=KFAC_APPROX)
    statistics_samples: int | None = option(
        None, "factor statistics from the first n samples of each layer call (None: all)", kind="int", low=1
    )
    apply_dtype: torch.dtype | None = option(
        None, "dtype of the per-step solve's large products (None: the factors')", kind="any"
    )

    def __post_init__(self) -> None:
        if self.decomposition is None:  # None asks for the default, as it always has
            object.__setattr__(self, "decomposition", SymmetricRandomizedEVD())
        validate(self)
        if not isinstance(self.decomposition, Decomposition):
            raise ValueError(f"decomposition must be an rkfac Decomposition (e.g. rkfac.ExactEigh()), got {self.decomposition!r}")
        if self.clip == "none":  # the command line's spelling of None, accepted everywhere
            object.__setattr__(self, "clip", None)
        skip = (self.skip,) if isinstance(self.skip, (str, type)) else tuple(self.skip)
        for rule in skip:
            if not (isinstance(rule, str) or (isinstance(rule, type) and issubclass(rule, nn.Module))):
                raise ValueError(f"skip entries must be name patterns (str) or nn.Module types, got {rule!r}")
        object.__setattr__(self, "skip", skip)
        dtype = self.apply_dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"apply_dtype must be None or a floating torch.dtype such as torch.bfloat16, got {dtype!r}")


@dataclass(frozen=True)
class SENGOptions:
    """SENG's curvature (spec section 5); the reference settings are the defaults."""

    damping: FloatSchedule = option(2.0, "λ, read at each rebuild", low=0.0, low_inclusive=False, schedule=True)
    update_freq: int = option(200, "steps between curvature rebuilds", kind="int", low=1)
    col_sample_size: int = option(128, "rows sampled per side of large layers", kind="int", low=1)
    sketch_threshold: float = option(7e5, "sketch layers with more weights than this", low=0.0)
    sketch_rank: int = option(16, "rank of compressed conv output-gradient maps", kind="int", low=1)
    loss_reduction: str = option("mean", "how the user's loss combines samples", choices=LOSS_REDUCTIONS)
    batch_dim: int = option(0, "where the samples are in inputs with shared dims (1: sequence-first)", kind="int", low=0)
    seed: int = option(0, "seeds the column samples", kind="int", low=0)

    def __post_init__(self) -> None:
        validate(self)


SOAP_CARRY = ("rotate", "keep", "reset")


@dataclass(frozen=True)
class SOAPOptions:
    """Adam in the low-rank Kronecker eigenbasis (:mod:`rkfac.kfac.eigenbasis_adam`); the
    defaults are SOAP's (Vyas et al. 2024: β₁ = β₂ = 0.95, ε = 1e-8)."""

    beta1: float = option(0.95, "β₁ of the first moment", low=0.0, high=1.0, high_inclusive=False)
    beta2: float = option(0.95, "β₂ of the second moments", low=0.0, high=1.0, high_inclusive=False)
    eps: float = option(1e-8, "Adam's ε, added to the root of each second moment", low=0.0, low_inclusive=False)
    carry: str = option("keep", "what a new basis does to the second moments: keep, rotate or reset", choices=SOAP_CARRY)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class UpdateOptions:
    """The SGD step after preconditioning: d ← grad + wd·p (from ``weight_decay_start``);
    b ← μ b + d; p ← p − lr·b. ``lr``, ``momentum`` and ``weight_decay`` may be callables
    of the (0-based) step."""

    lr: FloatSchedule = option(0.1, "learning rate", low=0.0, schedule=True)
    momentum: FloatSchedule = option(0.0, "momentum μ", low=0.0, high=1.0, high_inclusive=False, schedule=True)
    weight_decay: FloatSchedule = option(0.0, "weight decay, added after preconditioning", low=0.0, schedule=True)
    weight_decay_start: int = option(0, "first step with weight decay", kind="int", low=0)

    def __post_init__(self) -> None:
        validate(self)


def split_options(given: dict[str, Any], *kinds: type[Any]) -> list[dict[str, Any]]:
    """``given`` split by which of ``kinds`` (option dataclasses) declares each name; names
    that none declares are refused with a ValueError listing the known ones."""
    from dataclasses import fields

    parts: list[dict[str, Any]] = [{} for _ in kinds]
    for name, value in given.items():
        for part, kind in zip(parts, kinds, strict=True):
            if name in {f.name for f in fields(kind)}:
                part[name] = value
                break
        else:
            known = sorted({f.name for kind in kinds for f in fields(kind)})
            raise ValueError(f"unknown option {name!r}; the options are {known}")
    return parts
