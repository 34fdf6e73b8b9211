"""``rkfac.LowRankSOAP``: Adam in K-FAC's low-rank Kronecker eigenbasis (randomized SOAP, issue 21).

Per step::

    pre.step()      the K-FAC factors and their decompositions on the usual schedule; each
                    layer's .grad becomes Adam's direction in the kept eigenbasis, with one
                    Adam scale on the complement (:mod:`rkfac.kfac.eigenbasis_adam`)
    p ← p − lr · (direction + weight_decay · p)      decoupled weight decay, as AdamW
    the other parameters (norms, biases of layers rkfac does not handle): torch.optim.AdamW
    with the same lr, betas, ε and weight decay, unless ``fallback=`` says otherwise

Dense SOAP (Vyas et al. 2024) rotates every gradient with d × d bases of Shampoo's factors,
O(d³) per decomposition and O(d²·d) per step; here the bases are the r kept eigenvectors of
K-FAC's A and G from any rkfac decomposition (SRE by default), O(d² r) per step. With r ≥ d it
is dense SOAP on K-FAC's factors.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from rkfac.decompositions import SymmetricRandomizedEVD
from rkfac.kfac import KFACPreconditioner
from rkfac.kfac.eigenbasis_adam import EigenbasisAdam
from rkfac.optim import PreconditionedSGD
from rkfac.options import KFACOptions, SOAPOptions
from rkfac.protocol import Preconditioner

# K-FAC settings that the eigenbasis Adam does not read: refused rather than silently unused.
_UNUSED = ("momentum", "damping", "damping_mode", "damping_scale", "damping_floor", "clip_value")


class LowRankSOAP(PreconditionedSGD):
    """SOAP in K-FAC's randomized low-rank eigenbasis.

    Options: :class:`rkfac.options.SOAPOptions` (beta1, beta2, eps, carry), the update's lr
    (default 3e-3, SOAP's), weight_decay (default 0.01, SOAP's and AdamW's, decoupled) and
    weight_decay_start, and :class:`rkfac.options.KFACOptions`' fields that build the basis
    (decomposition, default ``SymmetricRandomizedEVD(rank=64, warm_start=True)``; factor_every,
    default 3; inverse_every, default 10; factor_decay, fisher, skip, seed, ...).
    The damping and the clip are K-FAC's step and are refused, and so is momentum (β₁ is it).

    Example::

        opt = rkfac.LowRankSOAP(model, lr=3e-3)
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    method_options = KFACOptions
    update_defaults: ClassVar[dict[str, Any]] = {"lr": 3e-3, "weight_decay": 0.01}
    # Bases every 10 steps (SOAP's precondition_frequency) from warm-started SRE at rank 64,
    # factors every 3 steps (BENCHMARKS.md, issue 21, session 11). fashion-autoencoder, 3 seeds,
    # loss at equal time (40 / 80 / 120 s): 9.01 / 7.99 / 7.65 against 9.66 / 7.95 / 7.54 at
    # r = 128 with factors every step (which wins after ~100 s) and 10.31 / 8.12 / 7.55 at SOAP's
    # schedule with r = 220 (seed 0); the step costs 0.11-0.42x SOAP's and 0.75-1.39x
    # SRE-KFAC's on the autoencoder, mlp-wide and CNN presets, where factors every step at
    # r = 220 cost 1.5-2.3x SRE-KFAC's (a convolution's statistics dominate it). Tuned, 3 seeds,
    # 8 epochs: SOAP's final loss (7.14) in 0.40x SOAP's time, 30 s/epoch against SOAP's 115.
    basis_defaults: ClassVar[dict[str, Any]] = {"factor_every": 3, "inverse_every": 10}
    default_rank: ClassVar[int] = 64

    def __init__(
        self,
        model: nn.Module,
        *,
        fallback: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        **options: Any,
    ) -> None:
        soap_fields = {field.name for field in dataclasses.fields(SOAPOptions)}
        self.soap_options = SOAPOptions(**{k: options.pop(k) for k in list(options) if k in soap_fields})
        given = {name: options[name] for name in _UNUSED if name in options}
        for name in ("clip", "apply_dtype"):  # None is theirs to give: it means "not used"
            if options.get(name) is not None:
                given[name] = options[name]
        options.pop("clip", None)
        options.pop("apply_dtype", None)
        if given:
            raise ValueError(
                f"rkfac.LowRankSOAP scales each mode by Adam's second moments; it does not use {given} "
                "(beta1 is its momentum; drop them, or use rkfac.KFAC for the damped step)"
            )
        self._rule = EigenbasisAdam(self.soap_options)
        self._default_fallback = fallback is None
        if fallback is None:
            given_update: dict[str, Any] = {k: options[k] for k in ("lr", "weight_decay") if k in options}
            update = {**self.update_defaults, **given_update}
            lr = update["lr"]
            fallback = functools.partial(
                torch.optim.AdamW,
                lr=lr(0) if callable(lr) else lr,
                betas=(self.soap_options.beta1, self.soap_options.beta2),
                eps=self.soap_options.eps,
                weight_decay=update["weight_decay"](0) if callable(update["weight_decay"]) else update["weight_decay"],
            )
        options = {**self.basis_defaults, **options}
        options.setdefault("decomposition", SymmetricRandomizedEVD(rank=self.default_rank, warm_start=True))
        super().__init__(model, fallback=fallback, clip=None, **options)

    def _preconditioner(self, model: nn.Module, options: dict[str, Any], objects: dict[str, Any]) -> Preconditioner:
        return KFACPreconditioner(model, direction=self._rule, **objects, **options)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if self._default_fallback and self.fallback is not None:  # the other parameters follow lr and decay
            step = self.preconditioner.steps
            group = self.param_groups[0]
            for name in ("lr", "weight_decay"):
                value = self._value(name, step) if callable(getattr(self.update, name)) else group[name]
                decay_off = name == "weight_decay" and step < self.update.weight_decay_start
                for other in self.fallback.param_groups:
                    other[name] = 0.0 if decay_off else value
        return super().step(closure)


__all__ = ["LowRankSOAP"]
