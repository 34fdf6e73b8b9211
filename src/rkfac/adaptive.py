"""Adaptive step control for K-FAC: learning rate and momentum from the quadratic model, and
Levenberg–Marquardt damping (Martens & Grosse 2015, sections 6–7; spec section 8).

Each step, with g the batch gradient (plus η θ, η the weight decay), Δ = −(F̂⁻¹ g + η θ) the
preconditioned direction (F̂ K-FAC's damped Kronecker curvature) and δ₀ the previous update::

    (α, μ) ← argmin M(αΔ + μδ₀), 0 ≤ μ ≤ max_momentum   (rkfac.quadratic_model; μ = 0 on the first step)
    δ = s (αΔ + μδ₀);  θ ← θ + δ

M's curvature is the exact GGN of the batch, plus (λ + η)I. s ∈ (0, 1] is ``step_scale`` (1: the
model's minimiser): the param group's lr, so a torch LR scheduler, or a callable of the step, can
decay the step late in training, where M measured on one batch keeps proposing steps whose
noise the loss no longer absorbs (an lr decay lifted every optimizer's final accuracy in
BENCHMARKS.md). ρ and the next step's δ₀ are those of the shortened step; the next M chooses μ
for that δ₀. μ is kept in [0, ``max_momentum``]
(0.95): measured on a subset of the batch, the 2 × 2 model is noisy, and on the quick MLP its free
minimum swung μ between −8 and 4·10³ within ten steps and blew the run up (BENCHMARKS.md). Every ``damping_every`` (T) steps
the reduction ratio (the same samples and dropout draws for both losses)

    ρ = (h(θ + δ) − h(θ)) / (M(δ) − M(0))

adjusts λ: λ ← ω λ if ρ > 3/4, λ ← λ / ω if ρ < 1/4, ω = ``damping_decay``^T, clamped to
[``min_damping``, ``max_damping``]. h includes the weight-decay term η/2 ‖θ‖², so that the
actual and the predicted change measure the same objective. M includes the damping, as the
spec states (kfac-jax leaves it out of ρ by default; with it in, the predicted decrease is
smaller, so λ shrinks a little more readily).

The factor damping follows λ: the preconditioner runs with ``damping_scale="tikhonov"`` and
δ = λ + η, split so that λ_A λ_G = λ + η in both damping modes (:mod:`rkfac.damping`), so F̂
approximates the model's C + (λ + η)I; each factor's damping is then raised to at least
``min_relative_damping`` · λ_max (10⁻³). The floor guards the discarded modes of a truncated
decomposition, which see only the damping: λ alone keeps shrinking while the model predicts
well, and without the floor the direction became those modes amplified by 1/λ (measured in
BENCHMARKS.md, issue 20). With the floor, F̂ is more damped than M when λ is small, which only
shortens the direction; α is still M's minimiser along it.

Subsampling (:mod:`rkfac.curvature_samples`): C and both losses of ρ are measured on
``curvature_samples`` (m) samples of the batch; g is the whole batch's. For cross-entropy, by
default m = 64 draws with probability ∝ each sample's trace of H (1 − Σ p², from the training's
own forward pass, caught by a forward hook on the model), weighted to stay unbiased
(``curvature_sampling="importance"``); for the squared error, whose H = 2I weighs every sample
alike, the batch's first 32 (``"first"``); a model with BatchNorm takes the first 128 by
default too (drawn samples, repeats included, would skew its batch statistics; asked for
importance, a BatchNorm in training mode makes the step take the first ones, saying so once).
Each is an unbiased estimate of its whole-batch value: the predicted change uses the samples'
curvature, the measured one the same samples' losses. Cross-entropy positions whose target is
``ignore_index`` (−100, F.cross_entropy's default: a sequence's padding) are left out of both,
as the loss leaves them out. h(θ) is the primal of the first forward-mode pass, so ρ costs one
extra forward of the samples every T steps.

Every ``model_every`` (K) steps the curvature is measured: on steps 0, K, 2K, ... as above. The
K − 1 steps between measure nothing on the model (no forward pass): they keep the last
measurement's curvature per unit direction, Ĉᵢⱼ = vᵢᵀCvⱼ / (‖vᵢ‖‖vⱼ‖), and solve M again with
their own Δ and δ₀: Qᵢⱼ = Ĉᵢⱼ ‖vᵢ‖‖vⱼ‖ + (λ + η)⟨vᵢ, vⱼ⟩, b = (⟨g, Δ⟩, ⟨g, δ₀⟩) exact (inner
products only). Reusing α and μ themselves was measured first and failed: on
fashion-autoencoder K = 2 and K = 4 diverged in epoch 2 (μ = 0.95 applied to a δ₀ it was not
chosen for compounds the momentum), where K = 1 ends at 11.2 (BENCHMARKS.md, issue 20). λ only
moves on a measuring step (ρ needs M's measured decrease): on the step s whose window
(s − K, s] holds a multiple of T, so λ still adjusts once per T steps (every K steps when K > T).

Costs per step, measured in BENCHMARKS.md: one forward-mode pass per tangent (two after the
first step) on the subset, about a forward and backward of that many samples each; a few
passes over the parameters (inner products, the update). In a process
group the curvature terms and both losses are averaged across ranks, so every rank takes the
same step (the gradient terms are already equal: DDP averaged the gradients).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rkfac.curvature_samples import SAMPLINGS, CurvatureSample, first_samples, importance_samples
from rkfac.distributed import Communicator
from rkfac.quadratic_model import IGNORE_INDEX, LOSS_KINDS, QuadraticModel, forward, ggn_inner, loss_value, output_tangents
from rkfac.schedules import FloatSchedule
from rkfac.schema import option, validate
from rkfac.seeding import derived_seed

#: Samples the curvature products and ρ use by default, per loss kind and sampling. Cross-entropy
#: needs more: a confidently classified sample adds almost nothing to the GGN (H = diag(p) − ppᵀ
#: ≈ 0), so few of 32 first samples carry it; on the quick MLP 32 samples ended at 82.2% test
#: accuracy with loss spikes, 128 at 89.5% (SGD 87.2%). Drawn by importance, 64 estimate the
#: curvature about as well as 128 first ones (rkfac.curvature_samples). For the squared error
#: every sample counts (H = 2I): on fashion-autoencoder 32 samples lost nothing against the whole
#: batch (BENCHMARKS.md, issue 20).
CURVATURE_SAMPLES = {("cross_entropy", "first"): 128, ("cross_entropy", "importance"): 64, ("mse", "first"): 32}
#: The sampling each loss kind gets by default.
DEFAULT_SAMPLING = {"cross_entropy": "importance", "mse": "first"}


@dataclass(frozen=True)
class AdaptiveOptions:
    """The adaptive step's settings; ``loss`` given turns it on (see :class:`rkfac.KFAC`)."""

    loss: str | None = option(None, "the loss trained on; given, lr, momentum and damping adapt", choices=(*LOSS_KINDS, None))
    initial_damping: float = option(1.0, "λ at the first step", low=0.0, low_inclusive=False)
    min_damping: float = option(1e-8, "the smallest λ", low=0.0, low_inclusive=False)
    min_relative_damping: float = option(
        1e-3, "each factor's damping is at least this fraction of its λ_max (the discarded modes' guard)", low=0.0
    )
    max_damping: float = option(1e4, "the largest λ", low=0.0, low_inclusive=False)
    damping_every: int = option(5, "steps between damping adjustments (T)", kind="int", low=1)
    damping_decay: float = option(0.95, "ω per step: λ moves by ω^T per adjustment", low=0.0, high=1.0, low_inclusive=False)
    adapt_momentum: bool = option(True, "choose μ too (else μ = 0)", kind="bool")
    max_momentum: float = option(0.95, "μ is kept in [0, max_momentum]", low=0.0, high=1.0, high_inclusive=False)
    curvature_samples: int | None = option(
        None,
        "samples of the batch the curvature products and ρ use (None: 64 draws for cross_entropy, the first 32 for mse)",
        kind="int",
        low=1,
    )
    curvature_sampling: str | None = option(
        None,
        "how the curvature samples are chosen: the batch's first ones, or drawn by their GGN weight "
        "(None: importance for cross_entropy, first for mse or a model with BatchNorm)",
        choices=(*SAMPLINGS, None),
    )
    model_every: int = option(
        1, "steps between curvature measurements (K); between, M keeps the last curvature per unit direction", kind="int", low=1
    )
    ignore_index: int = option(
        IGNORE_INDEX, "cross_entropy targets equal to it are left out of the model, as F.cross_entropy's ignore_index", kind="int"
    )
    step_scale: FloatSchedule = option(
        1.0,
        "s in (0, 1]: the update is s times M's minimiser (a number, or a callable of the step: a decay); "
        "it is the param group's lr, so torch LR schedulers set it too",
        low=0.0,
        high=1.0,
        low_inclusive=False,
        schedule=True,
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.min_damping > self.max_damping:
            raise ValueError(f"min_damping {self.min_damping} exceeds max_damping {self.max_damping}")
        if self.loss == "mse" and self.curvature_sampling == "importance":
            raise ValueError(
                "curvature_sampling='importance' needs cross_entropy: for mse every sample's H is 2I, "
                "so the draws would be uniform; use 'first'"
            )
        if not self.min_damping <= self.initial_damping <= self.max_damping:
            raise ValueError(
                f"initial_damping {self.initial_damping} is outside [min_damping, max_damping] = "
                f"[{self.min_damping}, {self.max_damping}]"
            )


@dataclass
class StepRecord:
    """What the last adaptive step chose: α, μ (as applied: the step scale s included, and s
    itself), the λ it used, the model's predicted change of the applied step and, on adjustment
    steps, ρ (None otherwise). ``skipped`` when M had no minimum (a non-finite or non-positive
    curvature term): the parameters were left alone."""

    alpha: float = math.nan
    momentum: float = 0.0
    damping: float = math.nan
    predicted: float = math.nan
    rho: float | None = None
    skipped: bool = False
    scale: float = 1.0

    def as_dict(self) -> dict[str, float | bool | None]:
        return {
            "alpha": self.alpha,
            "mu": self.momentum,
            "lambda": self.damping,
            "rho": self.rho,
            "skipped": self.skipped,
            "scale": self.scale,
        }


class AdaptiveStep:
    """The update of :mod:`rkfac.adaptive` (module docstring) for ``params`` of ``model``."""

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        options: AdaptiveOptions,
        *,
        loss_reduction: str = "mean",
        batch_dim: int = 0,
        seed: int = 0,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        if options.loss is None:
            raise ValueError("AdaptiveStep needs options.loss")
        self.model, self.options = model, options
        self.loss_reduction, self.batch_dim, self.seed = loss_reduction, batch_dim, seed
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.params = list(params)
        missing = [p for p in self.params if id(p) not in self.names]
        if missing:
            raise ValueError(f"{len(missing)} parameter(s) to step are not parameters of the model")
        self.damping = options.initial_damping
        self.steps = 0
        self.previous: dict[int, Tensor] = {}  # id(param) -> the last update δ₀
        self.last = StepRecord()
        self._unit_curvature: Tensor | None = None  # Ĉ of the last measuring step (model_every > 1)
        self._loss_before = torch.zeros(1)  # h(θ) on the curvature samples, from this step's first pass
        self._comm = Communicator(process_group)
        self._batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        default = "first" if self._batch_norms else DEFAULT_SAMPLING[options.loss]  # repeats would skew batch statistics
        self.sampling = options.curvature_sampling or default
        self.sample_count = options.curvature_samples or CURVATURE_SAMPLES[(options.loss, self.sampling)]
        self._outputs: Tensor | None = None  # the last training forward's outputs (importance sampling)
        self._fell_back = False  # warned once that importance sampling took the first samples
        if self.sampling == "importance":
            self._watch_outputs(model)

    def _watch_outputs(self, model: nn.Module) -> None:
        """A forward hook keeping the outputs of the model's last forward with gradients on (the
        training's; the passes here run under no_grad), detached, for the importance weights.
        It holds this object weakly and is removed when this object goes."""
        this = weakref.ref(self)

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            step = this()
            if step is not None and torch.is_grad_enabled() and isinstance(output, Tensor):
                step._outputs = output.detach()

        weakref.finalize(self, model.register_forward_hook(keep).remove)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(
        self,
        raw_grads: Sequence[Tensor | None],
        weight_decay: float,
        inputs: Sequence[Tensor],
        targets: Tensor,
        scale: float = 1.0,
    ) -> StepRecord:
        """Update the parameters in place. ``raw_grads`` are the gradients before preconditioning
        (one per parameter, None where absent); the parameters' ``.grad`` hold the preconditioned
        ones; ``scale`` (s, in (0, 1]) shortens the update to s times M's minimiser. Returns (and
        keeps as ``last``) what it chose."""
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"the adaptive step's scale (the param group's lr) must be in (0, 1], got {scale}")
        pairs = [(p, g) for p, g in zip(self.params, raw_grads, strict=True) if g is not None and p.grad is not None]
        params = [p for p, _ in pairs]
        directions = [-(p.grad + weight_decay * p) if weight_decay else -p.grad for p in params]  # type: ignore[operator]
        previous = [self.previous.get(id(p)) for p in params]
        use_momentum = self.options.adapt_momentum and all(d is not None for d in previous) and bool(previous)
        record = StepRecord(damping=self.damping, scale=scale)
        measure = self.steps % self.options.model_every == 0 or self._unit_curvature is None
        adjust = measure and self._adjusts_now()
        if not measure and use_momentum and self._unit_curvature.shape[0] < 2:  # type: ignore[union-attr]
            use_momentum = False  # measured before there was a δ₀: Δ alone until the next measurement
        grads = [g + weight_decay * p if weight_decay else g for p, g in pairs]
        tangents = [directions, previous] if use_momentum else [directions]
        sample = self._curvature_sample(inputs, targets) if measure else None
        model = self._quadratic_model(params, grads, tangents, self.damping + weight_decay, sample)  # type: ignore[arg-type]
        coefficients = model.minimiser(second_range=(0.0, self.options.max_momentum))
        if coefficients is None:
            record.skipped = True
            self.last, self.steps = record, self.steps + 1
            return record
        if adjust:
            before = float(self._comm.average_flat([self._loss_before])[0][0])
        coefficients = coefficients * scale
        alpha, mu = float(coefficients[0]), float(coefficients[1]) if use_momentum else 0.0
        for index, p in enumerate(params):
            update = directions[index].mul(alpha)
            if use_momentum:
                update.add_(previous[index], alpha=mu)  # type: ignore[arg-type]
            p.add_(update)
            self.previous[id(p)] = update
        record.alpha, record.momentum = alpha, mu
        if measure:
            record.predicted = model.change(coefficients)
        if adjust:
            assert sample is not None
            updates = [self.previous[id(p)] for p in params]
            actual = self._loss_at(sample) - before + _decay_change(params, updates, weight_decay)
            record.rho = self._adjust(actual, record.predicted)
        self.last, self.steps = record, self.steps + 1
        return record

    def _adjusts_now(self) -> bool:
        """Whether this measuring step adjusts λ: a multiple of T lies in (steps − K, steps]."""
        every, window = self.options.damping_every, self.options.model_every
        return self.steps // every != (self.steps - window) // every if self.steps >= window else True

    def _quadratic_model(
        self,
        params: Sequence[Tensor],
        grads: list[Tensor],
        tangents: list[list[Tensor]],
        shift: float,
        sample: CurvatureSample | None,
    ) -> QuadraticModel:
        """Q and b of M over the coefficients of ``tangents`` (Δ, and δ₀ when given). ``sample``
        given: the curvature from forward-mode passes on it (keeping Ĉ, and the objective at θ on
        it, the first pass's primal, for ρ); None: from the last Ĉ."""
        k = len(tangents)
        gram = _gram([*tangents, grads], rows=k)  # ⟨Δ, δ₀⟩ among themselves, then ⟨g, Δ⟩, ⟨g, δ₀⟩
        norms = gram[:k].diagonal().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        if sample is not None:
            curvature = self._measured_curvature(tangents, params, sample)
            if self.options.model_every > 1:
                self._unit_curvature = curvature / torch.outer(norms, norms)
        else:
            assert self._unit_curvature is not None
            curvature = self._unit_curvature[:k, :k] * torch.outer(norms, norms)
        return QuadraticModel(curvature + shift * gram[:k], gram[k].clone())

    def _measured_curvature(self, tangents: list[list[Tensor]], params: Sequence[Tensor], sample: CurvatureSample) -> Tensor:
        """vᵢᵀ C vⱼ for the tangents, C the GGN on the curvature samples (averaged over ranks)."""
        primals, derivatives = self._primals(), []
        for tangent in tangents:  # one pass each, every pass with the same dropout draws
            named = {self.names[id(p)]: t for p, t in zip(params, tangent, strict=True)}
            with self._dropout_draws():
                outputs, (derivative,) = output_tangents(self.model, primals, sample.inputs, [named])
            derivatives.append(derivative)
        loss = loss_value(self._loss, outputs, sample.targets, self.loss_reduction, sample.weights).double()
        self._loss_before = loss.reshape(1) * sample.scale
        k = len(tangents)
        reduction, weights = self.loss_reduction, sample.weights
        curvature = torch.stack(
            [
                ggn_inner(self._loss, outputs, derivatives[i], derivatives[j], reduction, weights, sample.targets)
                for i in range(k)
                for j in range(k)
            ]
        ).double()
        return self._comm.average_flat([curvature * sample.scale])[0].reshape(k, k).cpu()

    def _loss_at(self, sample: CurvatureSample) -> float:
        """h at the current parameters on the curvature samples, averaged over ranks, with this
        step's dropout draws (the weight decay's part is :func:`_decay_change`)."""
        with self._dropout_draws():
            outputs = forward(self.model, self._primals(), sample.inputs)
        loss = loss_value(self._loss, outputs, sample.targets, self.loss_reduction, sample.weights).double() * sample.scale
        return float(self._comm.average_flat([loss.reshape(1)])[0][0])

    def _adjust(self, actual: float, predicted: float) -> float | None:
        """ρ from the actual and predicted changes, and λ moved by the Levenberg–Marquardt rule."""
        if not math.isfinite(actual):  # the step blew the loss up: damp harder
            self.damping = min(self.damping / self._omega, self.options.max_damping)
            return math.inf
        if not predicted < 0:  # no decrease predicted (M's minimum is at 0): nothing to compare
            return math.nan
        rho = actual / predicted
        if rho > 0.75:
            self.damping = max(self.damping * self._omega, self.options.min_damping)
        elif rho < 0.25:
            self.damping = min(self.damping / self._omega, self.options.max_damping)
        return rho

    @property
    def _omega(self) -> float:
        return float(self.options.damping_decay**self.options.damping_every)

    @property
    def _loss(self) -> str:
        assert self.options.loss is not None
        return self.options.loss

    def _primals(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def _curvature_sample(self, inputs: Sequence[Tensor], targets: Tensor) -> CurvatureSample:
        """This step's curvature samples (:mod:`rkfac.curvature_samples`), positions marked
        ``ignore_index`` left out. Samples whose every position is left out (all padding) would
        measure no curvature at all, so M would be the damping alone and its α far too long: the
        whole batch is measured instead."""
        if self._loss != "cross_entropy":
            return self._chosen_samples(inputs, targets)
        targets = self._marked_ignored(targets)
        sample = self._chosen_samples(inputs, targets)
        if sample.targets is not targets and not bool((sample.targets != IGNORE_INDEX).any()):
            return CurvatureSample(list(inputs), targets)
        return sample

    def _chosen_samples(self, inputs: Sequence[Tensor], targets: Tensor) -> CurvatureSample:
        """The samples by ``sampling``. Importance sampling needs the training forward's outputs
        for this batch, samples first (``batch_dim`` 0); without them it takes the batch's first
        samples, and says so once."""
        n = inputs[0].shape[self.batch_dim]
        if self.sampling == "first" or self.sample_count >= n:
            return first_samples(inputs, targets, self.sample_count, self.batch_dim, self.loss_reduction)
        outputs = self._outputs
        if any(m.training for m in self._batch_norms):
            why = "a BatchNorm in training mode would normalise over the drawn samples, repeats included"
        elif self.batch_dim != 0 or outputs is None or outputs.dim() == 0 or outputs.shape[0] != n:
            seen = "no training forward seen" if outputs is None else f"the last training forward gave {tuple(outputs.shape)}"
            why = f"it needs the model's outputs for the batch of {n} samples along dimension 0 "
            why += f"(batch_dim={self.batch_dim}; {seen})"
        else:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, "curvature-samples", self.steps))
            return importance_samples(inputs, targets, outputs, self.sample_count, self.loss_reduction, generator)
        self._fall_back_once(why)
        return first_samples(inputs, targets, self._first_count, self.batch_dim, self.loss_reduction)

    def _marked_ignored(self, targets: Tensor) -> Tensor:
        """Class indices with the positions to leave out (``ignore_index``) marked as the quadratic
        model marks them (``IGNORE_INDEX``); any other negative index is refused by value."""
        ignore = self.options.ignore_index
        left_out = targets == ignore
        invalid = (targets < 0) & ~left_out
        if bool(invalid.any()):
            raise ValueError(
                f"the adaptive step got a negative class index ({int(targets[invalid][0])}) in targets; "
                f"only ignore_index={ignore} marks a position to leave out (set ignore_index= to the loss's own)"
            )
        return targets if ignore == IGNORE_INDEX else targets.masked_fill(left_out, IGNORE_INDEX)

    @property
    def _first_count(self) -> int:
        """The samples taken when importance sampling cannot run: the first ones, as many as by default."""
        return self.options.curvature_samples or CURVATURE_SAMPLES[(self._loss, "first")]

    def _fall_back_once(self, why: str) -> None:
        if not self._fell_back:
            warnings.warn(
                f"curvature_sampling='importance' took the batch's first {self._first_count} samples instead: {why}",
                stacklevel=4,
            )
            self._fell_back = True

    @contextlib.contextmanager
    def _dropout_draws(self) -> Iterator[None]:
        """Global random numbers keyed by (seed, step), restored afterwards: the passes here see
        the same dropout draws as each other and do not move the training's own stream."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derived_seed(self.seed, "quadratic-model", self.steps))
            yield

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """λ, the step count and the previous update of each parameter (by position)."""
        return {
            "damping": self.damping,
            "steps": self.steps,
            "previous": [self.previous.get(id(p)) for p in self.params],
            "unit_curvature": self._unit_curvature,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.damping = float(state["damping"])
        self.steps = int(state["steps"])
        self._unit_curvature = state.get("unit_curvature")  # absent from a state saved before model_every
        previous = state["previous"]
        if len(previous) != len(self.params):
            raise ValueError(f"adaptive state has {len(previous)} parameters; this optimizer steps {len(self.params)}")
        self.previous = {id(p): t.to(p.device) for p, t in zip(self.params, previous, strict=True) if t is not None}


def _decay_change(params: Sequence[Tensor], updates: Sequence[Tensor], weight_decay: float) -> float:
    """The change of the weight decay's part of the objective, η/2 ‖θ‖², over the update δ just
    applied: η/2 (‖θ + δ‖² − ‖θ‖²) = η (⟨θ + δ, δ⟩ − ½‖δ‖²), from the parameters after it. Two
    inner products per parameter and one read-back, where the difference of the two norms would
    need a float64 copy of θ twice and cancel two large numbers."""
    if not weight_decay:
        return 0.0
    flat = [(p.reshape(-1), d.reshape(-1)) for p, d in zip(params, updates, strict=True)]
    terms = [torch.dot(p, d).double() - 0.5 * torch.dot(d, d).double() for p, d in flat]
    return weight_decay * float(torch.stack(terms).sum())


def _gram(vectors: Sequence[Sequence[Tensor]], rows: int) -> Tensor:
    """The float64 inner products ⟨vectors[i], vectors[j]⟩ for i < ``rows``, j ≤ i (and j ≥ rows:
    every vector against the first ``rows``), each vector a list of per-parameter tensors. One
    ``torch.dot`` per parameter and pair, summed in float64 across parameters, one read-back."""
    k = len(vectors)
    flat = [[piece.reshape(-1) for piece in vector] for vector in vectors]
    pairs = [(i, j) for i in range(k) for j in range(min(i, rows - 1) + 1)]
    entries = torch.stack(
        [torch.stack([torch.dot(a, b) for a, b in zip(flat[i], flat[j], strict=True)]).double().sum() for i, j in pairs]
    ).cpu()
    gram = torch.zeros(k, rows, dtype=torch.float64)
    for (i, j), value in zip(pairs, entries, strict=True):
        gram[i, j] = value
        if i < rows:
            gram[j, i] = value
    return gram


__all__ = ["AdaptiveOptions", "AdaptiveStep", "StepRecord"]
