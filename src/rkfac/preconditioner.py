"""The K-FAC preconditioner: rewrites ``.grad`` of Linear and Conv2d layers in place.

Algorithm, at step k (``k = pre.steps``, counted from 0) of ``loss.backward(); pre.step()``::

    if k % factor_every(k) == 0:            # the hooks captured this step's statistics
        F_X ← S_X on the first update, else ρ F_X + (1 − ρ) S_X      for X in (A, G)
    if k % inverse_every(k) == 0 or a factor has no decomposition yet:
        (U_X, D_X) ← decomposition(F_X)     # sketch seeded by (seed, layer, factor, k)
    for every layer:                        # every step
        λ_A, λ_G ← damping_mode(δ(k), ...)
        V ← (U_G D_G U_Gᵀ + λ_G I)⁻¹ ∇W (U_A D_A U_Aᵀ + λ_A I)⁻¹
    scale the V's by ``clip``; write them into ``.grad``

Any torch optimizer then steps on the rewritten gradients. Parameters of other layers keep
their plain gradient; so does a preconditioned layer before its first statistics exist
(e.g. when the very first backward ran in eval mode), and one whose gradient is None.

Statistics are captured only on factor steps, in training mode, with grad enabled (see
:mod:`rkfac.capture` and, for the scaling, :mod:`rkfac.layers`).

Non-finite numbers (see :mod:`rkfac.health`). A NaN or Inf would stay in the running factors
for good, so each step checks, with one host sync, every captured statistic and every
gradient of a preconditioned layer:

- a layer whose S_A or S_G is not finite skips that factor update (F_A and F_G keep their
  previous values, as if the step had not been a factor step for that layer);
- a layer whose gradient is not finite is not preconditioned: its ``.grad`` is left as the
  backward wrote it, so the caller's own divergence check sees the NaN, and it takes no part
  in the "kl" clip of the other layers;
- a decomposition that raises ``torch.linalg.LinAlgError`` or returns a non-finite value is
  retried once in float64; if that fails too, the last good decomposition stays in use (a
  layer with none yet keeps its plain gradient and is decomposed again on the next step).

Each case is counted in :attr:`KFACPreconditioner.health`; the first one also issues a
``RuntimeWarning`` (once per preconditioner, so that a long run does not flood the log).

Data parallel (torch.distributed initialised before construction, any world size; the model
may be wrapped in DistributedDataParallel, which averages the gradients). On factor steps the
batch statistics of every layer are averaged across ranks in one all-reduce, so every rank
holds the global-batch factors. On inverse steps the decompositions are split across ranks
by :func:`rkfac.assignment.assign_longest_first` over the decomposition's cost model; each
owner decomposes (sketch keyed by seed, layer, factor and step, as in one process) and
broadcasts the low-rank pair, d·k + k numbers (:mod:`rkfac.communication`). Every rank then
preconditions every layer with the same numbers, so parameters stay identical. Without a
process group (or with one of size 1) none of this runs. Health counts of decompositions are
kept by the owning rank.
"""

from __future__ import annotations

import fnmatch
import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from rkfac import layers
from rkfac.assignment import assign_longest_first
from rkfac.brand import brand_update, reproject_subset
from rkfac.capture import StatisticsCapture, StatisticSums
from rkfac.clipping import CLIP_MODES, clip_directions
from rkfac.communication import Communicator, TrafficCounter
from rkfac.damping import DAMPING_MODES, factor_dampings
from rkfac.decompositions import BrandUpdate, Decomposition, SymmetricRandomizedEVD
from rkfac.health import Health, all_finite, decompose_with_retry
from rkfac.lowrank import Eigenpairs, kronecker_solve
from rkfac.mc_fisher import MC_LOSSES, sampled_loss
from rkfac.schedules import (
    FloatSchedule,
    IntSchedule,
    at_step_float,
    at_step_int,
    check_choice,
    check_float,
    float_schedule,
    int_schedule,
)
from rkfac.seeding import keyed_generator
from rkfac.timing import PhaseTimer, maybe_phase

FACTORS = ("A", "G")
FISHER_TYPES = ("empirical", "mc")
LOSS_REDUCTIONS = ("mean", "sum")

SkipRule = str | type[nn.Module]


@dataclass
class _Layer:
    """One preconditioned layer: its module and the state the preconditioner keeps for it."""

    name: str
    index: int
    module: layers.SupportedLayer
    factors: dict[str, Tensor] = field(default_factory=dict)
    eigen: dict[str, Eigenpairs] = field(default_factory=dict)
    # B-KFAC: whether each factor is updated online (Brand) rather than decomposed dense
    online: dict[str, bool] = field(default_factory=dict)


# Layers narrower than this on either side keep the working dtype under ``apply_dtype``.
LOW_PRECISION_MIN_DIM = 128


class KFACPreconditioner:
    """K-FAC with a pluggable decomposition of the Kronecker factors.

    Args:
        model: the module whose Linear and Conv2d (groups = 1) layers are preconditioned.
        decomposition: how factors are decomposed; default
            ``SymmetricRandomizedEVD(rank=220, oversample=10, power_iters=4)`` (the paper's).
        damping: δ > 0, a float or a callable of the step.
        damping_mode: "relative" or "pi" (see :mod:`rkfac.damping`).
        factor_decay: ρ in [0, 1) of the exponential average of the factors.
        factor_every: capture statistics and update factors every this many steps.
        inverse_every: recompute decompositions every this many steps.
        clip: "rms", "kl" or None; ``clip_value`` is κ (see :mod:`rkfac.clipping`).
        lr: the learning rate the "kl" clip assumes; :class:`rkfac.KFAC` keeps it in sync
            with its own. Unused by the other clip modes.
        fisher: "empirical" (statistics from the user's backward) or "mc" (G from a backward
            with sampled labels: call :meth:`sample_fisher` with the model outputs before the
            user's backward).
        mc_loss: the loss whose predictive distribution "mc" samples: "cross_entropy" or "mse".
        loss_reduction: "mean" or "sum": how the user's loss combines the samples; sets the
            scale of G (see :mod:`rkfac.layers`).
        skip: layers left alone: glob patterns on qualified module names, or module types.
        seed: seeds every sketch and every sampled label.
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss of the user's
            backward, if any: the G statistics are divided by its scale² so that factors are
            those of the unscaled loss (overflowed steps are skipped as non-finite). Call
            ``scaler.unscale_(optimizer)`` before ``pre.step()`` (``scaler.step`` does it for
            :class:`rkfac.KFAC`).
        process_group: the torch.distributed group to average statistics and share
            decompositions over (default: the world group when torch.distributed is
            initialised; nothing is communicated otherwise).
        timer: optional :class:`rkfac.timing.PhaseTimer` that accumulates the seconds spent in
            statistics, decomposition and preconditioning.
        apply_dtype: the dtype of the large products of the per-step solve (None: the factor
            dtype). ``torch.bfloat16`` roughly halves the step's largest phase on CPUs with
            AVX512-BF16, at 0.3–24% relative error in the direction (see
            :func:`rkfac.lowrank.kronecker_solve`); factors and decompositions keep their dtype,
            and layers narrower than ``LOW_PRECISION_MIN_DIM`` (128) on either side are solved
            in the working dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decomposition: Decomposition | None = None,
        damping: FloatSchedule = 0.1,
        damping_mode: str = "relative",
        factor_decay: float = 0.95,
        factor_every: IntSchedule = 10,
        inverse_every: IntSchedule = 50,
        clip: str | None = "rms",
        clip_value: float = 0.07,
        lr: FloatSchedule = 0.1,
        fisher: str = "empirical",
        mc_loss: str = "cross_entropy",
        loss_reduction: str = "mean",
        skip: Iterable[SkipRule] = (),
        seed: int = 0,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        timer: PhaseTimer | None = None,
        apply_dtype: torch.dtype | None = None,
    ) -> None:
        if decomposition is None:
            decomposition = SymmetricRandomizedEVD()
        if not isinstance(decomposition, Decomposition):
            raise ValueError(f"decomposition must be an rkfac Decomposition (e.g. rkfac.ExactEigh()), got {decomposition!r}")
        self.decomposition = decomposition
        self.damping = float_schedule(damping, "damping", low=0.0, low_inclusive=False)
        self.damping_mode = str(check_choice(damping_mode, "damping_mode", DAMPING_MODES))
        self.factor_decay = check_float(factor_decay, "factor_decay", low=0.0, high=1.0, high_inclusive=False)
        self.factor_every = int_schedule(factor_every, "factor_every", low=1)
        self.inverse_every = int_schedule(inverse_every, "inverse_every", low=1)
        self.clip: str | None = clip
        check_choice(clip, "clip", CLIP_MODES)
        self.clip_value = check_float(clip_value, "clip_value", low=0.0, low_inclusive=False)
        self.lr = float_schedule(lr, "lr", low=0.0)
        self.fisher = str(check_choice(fisher, "fisher", FISHER_TYPES))
        self.mc_loss = str(check_choice(mc_loss, "mc_loss", MC_LOSSES))
        self.loss_reduction = str(check_choice(loss_reduction, "loss_reduction", LOSS_REDUCTIONS))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.steps = 0
        self.timer = timer
        if apply_dtype is not None and not (isinstance(apply_dtype, torch.dtype) and apply_dtype.is_floating_point):
            raise ValueError(f"apply_dtype must be None or a floating torch.dtype such as torch.bfloat16, got {apply_dtype!r}")
        self.apply_dtype = apply_dtype

        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler, got {grad_scaler!r}")
        self.grad_scaler = grad_scaler
        self._comm = Communicator(process_group)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # layer names as in the unwrapped model, so checkpoints match
        skip_rules = _check_skip_rules(skip)
        selected: dict[str, layers.SupportedLayer] = {
            name: module
            for name, module in model.named_modules()
            if layers.is_supported(module) and not _skipped(name, module, skip_rules)
        }
        if not selected:
            raise ValueError(
                f"model {type(model).__name__} has no nn.Linear or nn.Conv2d (groups=1) layer to precondition"
                + (f" after skip={skip_rules!r}" if skip_rules else "")
            )
        self._layers = [_Layer(name, index, module) for index, (name, module) in enumerate(selected.items())]
        self._layer_by_name = {layer.name: layer for layer in self._layers}
        self.unsupported = _unsupported_layers(model, selected, skip_rules)
        if self.unsupported:
            listed = ", ".join(f"{name} ({kind})" for name, kind in self.unsupported)
            warnings.warn(
                f"rkfac preconditions nn.Linear and nn.Conv2d (groups=1) only; these layers keep their plain gradient: "
                f"{listed}. Pass them in skip= to silence this.",
                UserWarning,
                stacklevel=2,
            )
        self._capture = StatisticsCapture(selected, self._is_factor_step, timer, root=model)
        self._brand = decomposition if isinstance(decomposition, BrandUpdate) else None
        self._dense_method = decomposition.fallback if isinstance(decomposition, BrandUpdate) else decomposition
        if self._brand is not None:  # Linear layers may go online: keep their rows, not Gram products
            for layer in self._layers:
                self._capture.sums[layer.name].keep_rows = isinstance(layer.module, nn.Linear)
        self._capture.capture_output_grads = self.fisher == "empirical"
        self._mc_generator: torch.Generator | None = None
        self._health = Health()
        self._warned = False

    # ------------------------------------------------------------------ public API

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the preconditioned layers, in model order."""
        return [layer.name for layer in self._layers]

    @property
    def traffic(self) -> TrafficCounter:
        """Bytes this rank has put into collectives (zero in a single process)."""
        return self._comm.traffic

    @property
    def health(self) -> Health:
        """A snapshot of the counts of skipped statistics, gradients and decompositions."""
        return replace(self._health)

    def step(self) -> None:
        """Precondition the current gradients in place (see the module docstring)."""
        step = self.steps
        self._check_mc_statistics()
        with torch.no_grad():
            with maybe_phase(self.timer, "decomposition"):
                statistics = self._take_statistics()
                faults = self._find_non_finite(statistics, step)
                self._update_factors(statistics, faults)
                self._decompose(step)
            with maybe_phase(self.timer, "precondition"):
                self._precondition(step, faults)
        self.steps += 1

    def sample_fisher(self, outputs: Tensor) -> None:
        """For ``fisher="mc"``: capture G from a backward with labels sampled from ``outputs``.

        Call it after the forward and before ``loss.backward()``, on every step (it returns at
        once on steps that are not factor steps)::

            logits = model(x)
            pre.sample_fisher(logits)
            F.cross_entropy(logits, y).backward()
            pre.step(); optimizer.step()

        The sampled backward uses ``torch.autograd.grad``, so ``.grad`` is not touched, and it
        keeps the graph for the user's own backward.
        """
        if self.fisher != "mc":
            raise ValueError(f"sample_fisher is for fisher='mc'; this preconditioner has fisher={self.fisher!r}")
        if not self._is_factor_step() or not outputs.requires_grad:
            return
        if self._mc_generator is None or self._mc_generator.device != outputs.device:
            self._mc_generator = keyed_generator(outputs.device, self.seed, "mc-labels")
        loss = sampled_loss(outputs, self.mc_loss, self.loss_reduction, self._mc_generator)
        weights = [layer.module.weight for layer in self._layers if layer.module.weight.requires_grad]
        self._capture.capture_output_grads = True
        try:
            torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        finally:
            self._capture.capture_output_grads = False

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The averaged factors, ``{layer_name: (A, G)}``, of layers that keep both.

        B-KFAC keeps no dense average for its online factors; see :meth:`eigenpairs`.
        """
        return {
            layer.name: (layer.factors["A"], layer.factors["G"])
            for layer in self._layers
            if all(k in layer.factors for k in FACTORS)
        }

    def ranks(self) -> dict[str, tuple[int, int]]:
        """Eigenpairs kept per layer, ``{layer_name: (k_A, k_G)}`` (varies with ``adaptive_rank``)."""
        return {name: (a.rank, g.rank) for name, (a, g) in self.eigenpairs().items()}

    def eigenpairs(self) -> dict[str, tuple[Eigenpairs, Eigenpairs]]:
        """The decompositions in use, ``{layer_name: (A pairs, G pairs)}``."""
        return {layer.name: (layer.eigen["A"], layer.eigen["G"]) for layer in self._layers if _complete(layer.eigen)}

    def state_dict(self) -> dict[str, Any]:
        """The step, the factors, the current decompositions, the health counts (and the label sampler)."""
        return {
            "steps": self.steps,
            "layers": {
                layer.name: {
                    "factors": dict(layer.factors),
                    "eigen": {key: _pairs_to_dict(pairs) for key, pairs in layer.eigen.items()},
                    "online": dict(layer.online),
                }
                for layer in self._layers
            },
            "mc_generator": None if self._mc_generator is None else self._mc_generator.get_state(),
            "health": self._health.as_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; tensors move to each layer's device."""
        names = set(state.get("layers", {}))
        if names != set(self.layer_names):
            raise ValueError(f"state_dict layers {sorted(names)} do not match this preconditioner's {self.layer_names}")
        for layer in self._layers:
            saved = state["layers"][layer.name]
            device = layer.module.weight.device
            # copies: the running factors are updated in place, and must not alias the caller's state
            factors = {key: tensor.to(device, copy=True) for key, tensor in saved["factors"].items()}
            expected = dict(zip(FACTORS, layers.factor_dims(layer.module), strict=True))
            for key, tensor in factors.items():
                if tensor.shape != (expected[key], expected[key]):
                    raise ValueError(
                        f"factor {key} of layer {layer.name!r} has shape {tuple(tensor.shape)}, expected {expected[key]}²"
                    )
            layer.factors = factors
            layer.eigen = {key: _pairs_from_dict(pairs).to(device) for key, pairs in saved["eigen"].items()}
            layer.online = dict(saved.get("online", {}))
        self.steps = int(state["steps"])
        self._health = Health.from_dict(state.get("health"))  # absent from older state dicts
        self._capture.clear()
        generator_state = state.get("mc_generator")
        if generator_state is not None:
            self._mc_generator = torch.Generator()
            self._mc_generator.set_state(generator_state)

    def remove(self) -> None:
        """Take the hooks off the model; the preconditioner captures nothing afterwards."""
        self._capture.remove()

    # ------------------------------------------------------------------ the three phases

    def _is_factor_step(self) -> bool:
        step = self.steps
        return step % at_step_int(self.factor_every, step, "factor_every", low=1) == 0

    def _check_mc_statistics(self) -> None:
        if self.fisher != "mc":
            return
        sums = self._capture.sums.values()
        if any(s.has_inputs for s in sums) and not any(s.has_output_grads for s in sums):
            self._capture.clear()
            raise RuntimeError(
                "fisher='mc' captured layer inputs but no sampled-label gradients on this factor step: "
                "call pre.sample_fisher(outputs) after the forward and before loss.backward()"
            )

    def _take_statistics(self) -> dict[str, tuple[Tensor, Tensor]]:
        """This step's statistics of every layer that captured both; clears the sums.

        A statistic is S (d × d), or for a factor updated online (B-KFAC) its columns C
        (d × N, S = C Cᵀ). Unscaled from a GradScaler's loss scale and, in a process group,
        averaged over ranks (S by an all-reduce, C by gathering every rank's columns).
        """
        statistics: dict[str, tuple[Tensor, Tensor]] = {}
        for layer in self._layers:
            sums: StatisticSums = self._capture.sums[layer.name]
            if not (sums.has_inputs and sums.has_output_grads):
                continue
            if not sums.keep_rows:
                statistics[layer.name] = sums.averages(self.loss_reduction)
                continue
            columns = sums.columns(self.loss_reduction)
            for key, c in zip(FACTORS, columns, strict=True):
                if key not in layer.online:  # decided once, at the first statistic: batch narrower than the factor
                    layer.online[key] = c.shape[1] * self._comm.world_size < c.shape[0]
            a, g = (c if layer.online[key] else c @ c.T for key, c in zip(FACTORS, columns, strict=True))
            statistics[layer.name] = (a, g)
        self._capture.clear()
        scale = self._loss_scale()
        if scale != 1.0:
            statistics = {
                name: (a, g / (scale if self._is_online(name, "G") else scale**2)) for name, (a, g) in statistics.items()
            }
        if self._comm.active:
            dense = [
                (name, i) for name, pair in statistics.items() for i, key in enumerate(FACTORS) if not self._is_online(name, key)
            ]
            averaged = iter(self._comm.average_symmetric([statistics[name][i] for name, i in dense]))
            updated = {name: list(pair) for name, pair in statistics.items()}
            for name, i in dense:
                updated[name][i] = next(averaged)
            for name, pair in updated.items():
                for i, key in enumerate(FACTORS):
                    if self._is_online(name, key):  # mean of C_r C_rᵀ over ranks = [C_1 … C_w][…]ᵀ / w
                        pair[i] = self._comm.gather_rows(pair[i].T).T / self._comm.world_size**0.5
            statistics = {name: (pair[0], pair[1]) for name, pair in updated.items()}
        return statistics

    def _is_online(self, name: str, key: str) -> bool:
        return self._layer_by_name[name].online.get(key, False)

    def _find_non_finite(self, statistics: dict[str, tuple[Tensor, Tensor]], step: int) -> dict[str, list[str]]:
        """``{layer name: [what was not finite]}`` over this step's statistics and gradients.

        One ``isfinite(t).all()`` per tensor, all read back together: one host sync per step.
        """
        checks: list[tuple[str, str, Tensor]] = []
        for name, (s_a, s_g) in statistics.items():
            checks += [(name, "A statistic", s_a), (name, "G statistic", s_g)]
        for layer in self._layers:
            for param in (layer.module.weight, layer.module.bias):
                if param is not None and param.grad is not None:
                    checks.append((layer.name, "gradient", param.grad))
        faults: dict[str, list[str]] = {}
        for (name, what, _), finite in zip(checks, all_finite([tensor for _, _, tensor in checks]), strict=True):
            if not finite and what not in faults.get(name, []):
                faults.setdefault(name, []).append(what)
        for whats in faults.values():
            self._health.skipped_statistics += int(_has_bad_statistic(whats))
            self._health.skipped_gradients += int("gradient" in whats)
        if faults:
            name, whats = next(iter(faults.items()))
            others = f" (and in {len(faults) - 1} more layers)" if len(faults) > 1 else ""
            consequences = ["its factor update is skipped"] if _has_bad_statistic(whats) else []
            consequences += ["its gradient is left unpreconditioned"] if "gradient" in whats else []
            what = " and ".join(whats)
            self._warn_once(f"non-finite {what} in layer {name!r} at step {step}{others}: {', '.join(consequences)}")
        return faults

    def _update_factors(self, statistics: dict[str, tuple[Tensor, Tensor]], faults: dict[str, list[str]]) -> None:
        """Fold the finite statistics into the exponential averages (online factors: Brand's update)."""
        decay = self.factor_decay
        for layer in self._layers:
            if layer.name not in statistics or _has_bad_statistic(faults.get(layer.name, [])):
                continue
            for key, statistic in zip(FACTORS, statistics[layer.name], strict=True):
                if layer.online.get(key, False):
                    assert self._brand is not None
                    layer.eigen[key] = brand_update(layer.eigen.get(key), statistic, decay, self._brand.rank)
                    if not self._brand.keeps_factor:
                        continue
                    statistic = statistic @ statistic.T
                if key in layer.factors:
                    layer.factors[key].mul_(decay).add_(statistic, alpha=1.0 - decay)
                else:
                    layer.factors[key] = statistic

    def _loss_scale(self) -> float:
        """The GradScaler's scale in the user's backward (1 without one, or with the MC Fisher)."""
        if self.grad_scaler is None or not self.grad_scaler.is_enabled() or self.fisher != "empirical":
            return 1.0
        return float(self.grad_scaler.get_scale())

    def describe(self) -> str:
        """The preconditioned layers, one line each: name, type, d_A × d_G."""
        lines = []
        for layer in self._layers:
            d_a, d_g = layers.factor_dims(layer.module)
            lines.append(f"{layer.name or '(model)'}: {type(layer.module).__name__}, A {d_a} × {d_a}, G {d_g} × {d_g}")
        skipped = [f"{name} ({kind})" for name, kind in self.unsupported]
        return "\n".join(lines + ([f"not preconditioned: {', '.join(skipped)}"] if skipped else []))

    def _decompose(self, step: int) -> None:
        """Decompose on scheduled steps, and any factor that has no decomposition yet.

        In a process group each factor is decomposed by its owner only and shared.
        """
        scheduled = step % at_step_int(self.inverse_every, step, "inverse_every", low=1) == 0
        brand = self._brand
        refresh = brand is not None and brand.refresh_every is not None and step > 0 and step % brand.refresh_every == 0
        jobs = [
            (layer, factor_index, key)
            for layer in self._layers
            for factor_index, key in enumerate(FACTORS)
            if key in layer.factors and (refresh if layer.online.get(key, False) else (key not in layer.eigen or scheduled))
        ]
        if brand is not None and brand.reproject_every is not None and step > 0 and step % brand.reproject_every == 0:
            self._reproject(step)
        if not jobs:
            return
        dims = [layer.factors[key].shape[0] for layer, _, key in jobs]
        owners = [0] * len(jobs)
        if self._comm.active:
            costs = [self._dense_method.cost(dim, step) for dim in dims]
            owners = assign_longest_first(costs, self._comm.world_size)
        owned = {
            job: self._decompose_factor(layer, factor_index, key, step)
            for job, (layer, factor_index, key) in enumerate(jobs)
            if owners[job] == self._comm.rank
        }
        if self._comm.active:
            # An owner whose decomposition failed sends the last good pair, or an empty one.
            for job, (layer, _, key) in enumerate(jobs):
                if job in owned and owned[job] is None:
                    owned[job] = layer.eigen.get(key, _empty_pairs(layer.factors[key]))
            factor = jobs[0][0].factors[jobs[0][2]]
            shared = self._comm.share_eigenpairs(owned, owners, dims, factor.dtype, factor.device)  # type: ignore[arg-type]
            owned = {job: pairs if pairs.rank > 0 else None for job, pairs in enumerate(shared)}
        for job, (layer, _, key) in enumerate(jobs):
            pairs = owned[job]
            if pairs is not None:
                layer.eigen[key] = pairs

    def _reproject(self, step: int) -> None:
        """B-KFAC-c: a Rayleigh–Ritz correction of a few random eigenvectors of each online factor."""
        assert self._brand is not None
        for layer in self._layers:
            for factor_index, key in enumerate(FACTORS):
                if layer.online.get(key, False) and key in layer.factors and key in layer.eigen:
                    generator = keyed_generator(
                        layer.factors[key].device, self.seed, "reproject", layer.index, factor_index, step
                    )
                    layer.eigen[key] = reproject_subset(
                        layer.eigen[key], layer.factors[key], self._brand.reproject_count, generator
                    )

    def _decompose_factor(self, layer: _Layer, factor_index: int, key: str, step: int) -> Eigenpairs | None:
        """One factor's decomposition (retried in float64 if it fails), or None, counted."""
        factor = layer.factors[key]
        generator = functools.partial(keyed_generator, factor.device, self.seed, "sketch", layer.index, factor_index, step)
        pairs, retried = decompose_with_retry(self._dense_method, factor, generator, step, layer.eigen.get(key))
        self._health.float64_retries += int(retried)
        if pairs is None:
            self._health.failed_decompositions += 1
            kept = "the last good one stays in use" if key in layer.eigen else "the layer keeps its plain gradient"
            self._warn_once(f"decomposition of factor {key} of layer {layer.name!r} failed at step {step}: {kept}")
        return pairs

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{message}. Later faults are only counted, in KFACPreconditioner.health.", RuntimeWarning, stacklevel=4
            )

    def _precondition(self, step: int, faults: dict[str, list[str]]) -> None:
        damping = at_step_float(self.damping, step, "damping", low=0.0, low_inclusive=False)
        updated: list[tuple[_Layer, Tensor]] = []
        grads: list[Tensor] = []
        for layer in self._layers:
            if not _complete(layer.eigen) or "gradient" in faults.get(layer.name, []):
                continue
            grad = layers.grad_matrix(layer.module)
            if grad is None:
                continue
            a_pairs, g_pairs = layer.eigen["A"], layer.eigen["G"]
            grad = grad.to(a_pairs.values.dtype)
            a_damping, g_damping = factor_dampings(self.damping_mode, damping, a_pairs, g_pairs)
            updated.append((layer, kronecker_solve(grad, g_pairs, g_damping, a_pairs, a_damping, self._apply_dtype_for(grad))))
            grads.append(grad)
        directions = [direction for _, direction in updated]
        lr = at_step_float(self.lr, step, "lr", low=0.0) if self.clip == "kl" else 0.0
        clip_directions(self.clip, self.clip_value, directions, grads, lr)
        for layer, direction in updated:
            layers.set_grad_matrix(layer.module, direction)

    def _apply_dtype_for(self, grad: Tensor) -> torch.dtype | None:
        """``apply_dtype`` for layers with both sides ≥ LOW_PRECISION_MIN_DIM, else None: small
        layers gain no time from it and lose the most accuracy (an output layer's G has a few
        dominant modes, where bfloat16's rounding is amplified most)."""
        return self.apply_dtype if min(grad.shape) >= LOW_PRECISION_MIN_DIM else None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(decomposition={self.decomposition!r}, damping_mode={self.damping_mode!r}, "
            f"factor_decay={self.factor_decay}, clip={self.clip!r}, fisher={self.fisher!r}, layers={self.layer_names})"
        )


def _check_skip_rules(skip: Iterable[SkipRule]) -> list[SkipRule]:
    if isinstance(skip, (str, type)):
        skip = [skip]
    rules = list(skip)
    for rule in rules:
        if not (isinstance(rule, str) or (isinstance(rule, type) and issubclass(rule, nn.Module))):
            raise ValueError(f"skip entries must be name patterns (str) or nn.Module types, got {rule!r}")
    return rules


def _skipped(name: str, module: nn.Module, rules: list[SkipRule]) -> bool:
    for rule in rules:
        if isinstance(rule, str) and fnmatch.fnmatchcase(name, rule):
            return True
        if isinstance(rule, type) and isinstance(module, rule):
            return True
    return False


_NORMALIZATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _unsupported_layers(
    model: nn.Module, selected: dict[str, layers.SupportedLayer], skip_rules: list[SkipRule]
) -> list[tuple[str, str]]:
    """(name, type) of layers with trainable weights that K-FAC cannot precondition.

    Normalisation layers are left out (their plain gradient is the standard choice), as are
    layers the user skipped on purpose.
    """
    found = []
    for name, module in model.named_modules():
        if name in selected or isinstance(module, _NORMALIZATION) or _skipped(name, module, skip_rules):
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            kind = type(module).__name__
            if isinstance(module, nn.Conv2d):
                kind += f" groups={module.groups}"
            found.append((name, kind))
    return found


def _empty_pairs(factor: Tensor) -> Eigenpairs:
    """No eigenpairs: what an owner shares when a decomposition failed and none was good yet."""
    nan = float("nan")
    return Eigenpairs(factor.new_zeros(factor.shape[0], 0), factor.new_zeros(0), nan, nan)


def _complete(eigen: dict[str, Eigenpairs]) -> bool:
    return all(key in eigen for key in FACTORS)


def _has_bad_statistic(whats: list[str]) -> bool:
    return any(what != "gradient" for what in whats)


def _pairs_to_dict(pairs: Eigenpairs) -> dict[str, Any]:
    return {"vectors": pairs.vectors, "values": pairs.values, "trace": pairs.trace, "top": pairs.top}


def _pairs_from_dict(saved: dict[str, Any]) -> Eigenpairs:
    return Eigenpairs(saved["vectors"], saved["values"], float(saved["trace"]), float(saved["top"]))


__all__ = ["KFACPreconditioner"]
