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
    (decomposition, default ``SymmetricRandomizedEVD(warm_start=True)``; factor_every, default 1;
    inverse_every, default 10; factor_decay, fisher, skip, seed, ...).
    The damping and the clip are K-FAC's step and are refused, and so is momentum (β₁ is it).

    Example::

        opt = rkfac.LowRankSOAP(model, lr=3e-3)
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    method_options = KFACOptions
    update_defaults: ClassVar[dict[str, Any]] = {"lr": 3e-3, "weight_decay": 0.01}
    # SOAP's schedule (factors every step, bases every 10) on warm-started SRE bases: on
    # fashion-autoencoder, factors every step reached 7.75 after 2 epochs against 8.30 every 10
    # (8.04 against 8.30 at equal time, 98 s), and the warm start halved the decomposition time
    basis_defaults: ClassVar[dict[str, Any]] = {"factor_every": 1, "inverse_every": 10}

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
        options.setdefault("decomposition", SymmetricRandomizedEVD(warm_start=True))
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
