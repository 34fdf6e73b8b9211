"""``rkfac.KFAC`` and ``rkfac.SENG``: a preconditioner followed by SGD, one wrapper for both.

Per step, for every parameter p with gradient::

    d ← preconditioned gradient                      (preconditioner.step(), rewrites .grad)
    d ← d + weight_decay · p     once steps ≥ weight_decay_start
    b ← momentum · b + d;  d ← b                      (if momentum > 0)
    p ← p − lr · d

Weight decay is added after preconditioning (and K-FAC's clipping), as in both papers' code
(the K-FAC paper also starts it at step 200: ``weight_decay_start=200``). ``lr``, ``momentum``
and ``weight_decay`` live in the param group, so torch LR schedulers work; each may also be a
callable of the (0-based) step, e.g. SENG's reference
``lr=lambda step: 0.05 * (1 - step / (75 * steps_per_epoch)) ** 6``, which is then written into
the param group at every step. Every option is keyword-only; the preconditioner is
``opt.preconditioner`` (a :class:`rkfac.protocol.Preconditioner`).

Every parameter that requires grad is in exactly one group, which :meth:`PreconditionedSGD.groups`
lists by name and :meth:`PreconditionedSGD.describe` prints: the preconditioned layers' parameters,
stepped by the SGD above; the others, stepped by the same SGD on their plain gradient (today's
default, the papers' choice) or, with ``fallback=torch.optim.AdamW`` (any optimizer class, or a
callable of the parameter list such as ``functools.partial(torch.optim.AdamW, lr=3e-4)``), by that
optimizer on their plain gradient. (``fallback`` is K-FAC's: SENG's method damps every other
gradient by 1/(1 + λ) itself.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rkfac.adaptive import AdaptiveOptions, AdaptiveStep
from rkfac.kfac import KFACPreconditioner
from rkfac.layers.selection import check_model, unwrap
from rkfac.options import KFACOptions, SENGOptions, UpdateOptions, split_options
from rkfac.protocol import Preconditioner
from rkfac.quadratic_model import LOSS_KINDS
from rkfac.schedules import at_step_float
from rkfac.seng import SENGPreconditioner
from rkfac.sgd import sgd_update
from rkfac.timing import PhaseTimer, maybe_phase

_SCHEDULED = ("lr", "momentum", "weight_decay")


class PreconditionedSGD(torch.optim.Optimizer):
    """A preconditioner on ``model``, then SGD on all its parameters that require grad.

    Subclasses say which preconditioner (``_preconditioner``), which options it takes
    (``method_options``) and any defaults of the SGD step that differ (``update_defaults``).
    """

    method_options: ClassVar[type[Any]]
    update_defaults: ClassVar[dict[str, Any]] = {}
    accepts_fallback: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        timer: PhaseTimer | None = None,
        fallback: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        **options: Any,
    ) -> None:
        check_model(model, f"rkfac.{type(self).__name__}")
        if fallback is not None and not self.accepts_fallback:
            raise ValueError(f"rkfac.{type(self).__name__} takes no fallback: its method damps every other gradient itself")
        update_given, method_given = split_options(options, UpdateOptions, self.method_options)
        self.update = UpdateOptions(**{**self.update_defaults, **update_given})
        objects = {"grad_scaler": grad_scaler, "process_group": process_group, "timer": timer}
        self._grad_scaler = grad_scaler
        self.preconditioner: Preconditioner = self._preconditioner(model, method_given, objects)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        covered = {id(p) for p in self.preconditioner.parameters()}
        self._names = {id(p): name for name, p in named}
        others = [p for _, p in named if id(p) not in covered]
        params = [p for _, p in named if fallback is None or id(p) in covered]
        super().__init__(params, {name: self._value(name, 0) for name in _SCHEDULED})
        self.fallback = fallback(others) if fallback is not None and others else None
        self._covered = covered

    def groups(self) -> dict[str, list[str]]:
        """Every trainable parameter by name, in exactly one group: ``"preconditioned"``, ``"plain
        SGD"`` (no preconditioner block, same SGD step) or ``"fallback <Optimizer>"``."""
        found: dict[str, list[str]] = {}
        for p in self.param_groups[0]["params"]:
            found.setdefault("preconditioned" if id(p) in self._covered else "plain SGD", []).append(self._names[id(p)])
        if self.fallback is not None:
            found[f"fallback {type(self.fallback).__name__}"] = [
                self._names[id(p)] for group in self.fallback.param_groups for p in group["params"]
            ]
        return found

    def describe(self) -> str:
        """The preconditioner's layers, then every parameter group (see :meth:`groups`)."""
        lines = [self.preconditioner.describe()]
        lines += [f"{group}: {', '.join(names)}" for group, names in self.groups().items()]
        return "\n".join(lines)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.fallback is not None:
            self.fallback.zero_grad(set_to_none)

    def _preconditioner(self, model: nn.Module, options: dict[str, Any], objects: dict[str, Any]) -> Preconditioner:
        """The method's preconditioner on ``model`` with its ``options`` and the ``objects``
        (grad_scaler, process_group, timer)."""
        raise NotImplementedError

    def _value(self, name: str, step: int) -> float:
        bounds: dict[str, Any] = {"low": 0.0}
        if name == "momentum":
            bounds.update(high=1.0, high_inclusive=False)
        return at_step_float(getattr(self.update, name), step, name, **bounds)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step = self.preconditioner.steps
        for name in _SCHEDULED:
            if callable(getattr(self.update, name)):
                value = self._value(name, step)
                for group in self.param_groups:
                    group[name] = value
        if not self._fallback_gradients_finite():
            return loss
        decay_on = step >= self.update.weight_decay_start
        self.preconditioner.step()
        sgd_update(self.param_groups, self.state, decay_on)
        if self.fallback is not None:
            self.fallback.step()
        return loss

    def _fallback_gradients_finite(self) -> bool:
        """With a GradScaler and a fallback optimizer: unscale the fallback's gradients too (the
        scaler's ``step(opt)`` unscales only this optimizer's parameters) and say whether they are
        finite. If not, the whole step is skipped, as the scaler skips it for an overflow in the
        preconditioned ones, and the scaler's ``update()`` backs off (it has recorded the inf)."""
        scaler = self._grad_scaler
        if self.fallback is None or scaler is None or not scaler.is_enabled():
            return True
        scaler.unscale_(self.fallback)
        grads = [p.grad for group in self.fallback.param_groups for p in group["params"] if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(grad).all() for grad in grads]).all())  # one sync

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["preconditioner"] = self.preconditioner.state_dict()
        if self.fallback is not None:
            state["fallback"] = self.fallback.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        preconditioner_state = state_dict.pop("preconditioner", None)
        if preconditioner_state is None:
            raise ValueError(f"state_dict has no 'preconditioner' entry: it was not saved by rkfac.{type(self).__name__}")
        fallback_state = state_dict.pop("fallback", None)
        if (fallback_state is None) != (self.fallback is None):
            raise ValueError("state_dict and optimizer disagree on a fallback optimizer: build both with the same fallback=")
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(preconditioner_state)
        if self.fallback is not None:
            self.fallback.load_state_dict(fallback_state)


class KFAC(PreconditionedSGD):
    """K-FAC + SGD: the paper's optimizer. Options: those of :class:`rkfac.options.UpdateOptions`
        (lr 0.1, momentum 0, weight_decay 0, weight_decay_start 0) and of
        :class:`rkfac.options.KFACOptions`. The preconditioner's "kl" clip follows the group's lr.
        With ``fisher="mc"`` call ``opt.preconditioner.sample_fisher(logits)`` before the backward.

        **Adaptive step** (:mod:`rkfac.adaptive`): state the loss, ``rkfac.KFAC(model,
        loss="cross_entropy")`` (or ``"mse"``), and the learning rate, momentum and damping are
        chosen every step from the exact quadratic model of the batch, which the step then needs::

            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step(inputs=x, targets=y)

        The loss must be the one :func:`rkfac.quadratic_model.loss_value` computes for that kind
        (with ``loss_reduction``). Its options are :class:`rkfac.adaptive.AdaptiveOptions`; lr,
        momentum, damping, damping_scale and a "kl" clip are the adaptation's and are refused, and
        so are a fallback optimizer and a GradScaler. The param group's ``lr`` is the step scale s
        (``step_scale``, 1: M's minimiser; a number in (0, 1] or a callable of the step), so a torch
        LR scheduler on this optimizer shortens the chosen step. The clip defaults to none (α sets the length)
    and the damping mode to "pi" (Martens & Grosse's; on fashion-autoencoder it reached loss 11.1
    after one epoch where "relative" reached 12.7).
        ``opt.adaptive.last`` holds the step's α, μ, λ and ρ.
    """

    method_options = KFACOptions

    def __init__(self, model: nn.Module, **options: Any) -> None:
        """``options``: PreconditionedSGD's objects (grad_scaler, process_group, timer, fallback)
        and settings, plus :class:`rkfac.adaptive.AdaptiveOptions`' fields."""
        adaptive_fields = {field.name for field in dataclasses.fields(AdaptiveOptions)}
        adaptive_given = {k: options.pop(k) for k in list(options) if k in adaptive_fields}
        if adaptive_given.get("loss") is None and set(adaptive_given) - {"loss"}:
            raise ValueError(
                f"{sorted(set(adaptive_given) - {'loss'})} are the adaptive step's options: give loss= "
                f"(one of {list(LOSS_KINDS)}) to turn it on, or drop them for the fixed step"
            )
        self.adaptive_options = AdaptiveOptions(**adaptive_given)
        self.adaptive: AdaptiveStep | None = None
        self._decay_now = 0.0
        loss = self.adaptive_options.loss
        if loss is not None:
            _refuse_with_adaptive(options, loss)
            floor = self.adaptive_options.min_relative_damping
            options = {"clip": None, "damping_mode": "pi", **options, "damping_scale": "tikhonov", "damping_floor": floor}
            options["lr"] = self.adaptive_options.step_scale  # the group's lr is the step scale s
            options["damping"] = lambda _step: self._adaptive_damping()
        super().__init__(model, **options)
        if loss is not None:
            pre_options = self.preconditioner.options  # type: ignore[attr-defined]
            self.adaptive = AdaptiveStep(
                unwrap(model),
                self.param_groups[0]["params"],
                self.adaptive_options,
                loss_reduction=pre_options.loss_reduction,
                batch_dim=pre_options.batch_dim,
                seed=pre_options.seed,
                process_group=options.get("process_group"),
            )

    def _preconditioner(self, model: nn.Module, options: dict[str, Any], objects: dict[str, Any]) -> Preconditioner:
        return KFACPreconditioner(model, lr=lambda _step: self.param_groups[0]["lr"], **objects, **options)

    def _adaptive_damping(self) -> float:
        assert self.adaptive is not None
        return self.adaptive.damping + self._decay_now

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], float] | None = None,
        *,
        inputs: Tensor | Sequence[Tensor] | None = None,
        targets: Tensor | None = None,
    ) -> float | None:
        """One step. The adaptive step needs the batch the gradient came from: ``inputs`` (the
        model's input, or a tuple of its positional inputs) and ``targets``."""
        if self.adaptive is None:
            if inputs is not None or targets is not None:
                raise ValueError("inputs= and targets= are for the adaptive step: build rkfac.KFAC with loss=...")
            return super().step(closure)
        if inputs is None or targets is None:
            raise ValueError(
                "the adaptive step (loss=...) needs the batch: opt.step(inputs=x, targets=y), "
                f"got inputs={'None' if inputs is None else 'given'}, targets={'None' if targets is None else 'given'}"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step = self.preconditioner.steps
        group = self.param_groups[0]
        for name in ("lr", "weight_decay"):  # lr: the step scale s (AdaptiveOptions.step_scale)
            if callable(getattr(self.update, name)):
                group[name] = self._value(name, step)
        self._decay_now = group["weight_decay"] if step >= self.update.weight_decay_start else 0.0
        timer = self.preconditioner.timer  # type: ignore[attr-defined]
        with maybe_phase(timer, "adaptive"):
            raw = [None if p.grad is None else p.grad.clone() for p in group["params"]]
        self.preconditioner.step()
        batch = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        with maybe_phase(timer, "adaptive"):
            self.adaptive.step(raw, self._decay_now, batch, targets, scale=group["lr"])
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.adaptive is not None:
            state["adaptive"] = self.adaptive.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        adaptive = state_dict.pop("adaptive", None)
        if (adaptive is None) != (self.adaptive is None):
            raise ValueError("state_dict and optimizer disagree on the adaptive step: build both with the same loss=")
        super().load_state_dict(state_dict)
        if self.adaptive is not None:
            self.adaptive.load_state_dict(adaptive)


_ADAPTED = ("lr", "momentum", "damping", "damping_scale", "damping_floor")


def _refuse_with_adaptive(options: dict[str, Any], loss: str) -> None:
    """Settings the adaptive step chooses itself, or cannot honour yet, named in a ValueError."""
    given = {name: options[name] for name in _ADAPTED if name in options}
    if given:
        raise ValueError(
            f"with loss={loss!r} the step adapts lr, momentum and damping itself; drop {given} "
            "(initial_damping= sets the first λ; step_scale=, or an LR scheduler, shortens the chosen step), "
            "or drop loss= for the fixed step"
        )
    if options.get("clip") == "kl":
        raise ValueError("clip='kl' needs a learning rate; the adaptive step (loss=...) chooses the step length itself")
    if options.get("grad_scaler") is not None:
        raise ValueError("the adaptive step (loss=...) does not support a GradScaler yet: its losses are unscaled")
    if options.get("fallback") is not None:
        raise ValueError("the adaptive step (loss=...) chooses one step for all parameters; it takes no fallback optimizer")


class SENG(PreconditionedSGD):
    """SENG + SGD (spec section 5) on all parameters that require grad. Options: those of
    :class:`rkfac.options.UpdateOptions`, with SENG's reference momentum 0.9 and weight decay
    1e-2 as defaults, and of :class:`rkfac.options.SENGOptions`. ``damping`` may be a callable
    of the step; it is read at each curvature rebuild (every ``update_freq`` steps)."""

    method_options = SENGOptions
    update_defaults: ClassVar[dict[str, Any]] = {"momentum": 0.9, "weight_decay": 1e-2}
    accepts_fallback = False

    def _preconditioner(self, model: nn.Module, options: dict[str, Any], objects: dict[str, Any]) -> Preconditioner:
        return SENGPreconditioner(model, **objects, **options)
