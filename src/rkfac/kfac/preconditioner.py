"""The K-FAC preconditioner: rewrites ``.grad`` of the supported layers in place.

Algorithm, at step k (``k = pre.steps``, counted from 0) of ``loss.backward(); pre.step()``::

    if k % factor_every(k) == 0:            # the hooks captured this step's statistics
        S_A, S_G ← this step's statistics   (averaged over ranks in a process group)
        skip the layers whose S_A or S_G is not finite               (guards)
        each factor's tracker folds S in: F ← S first, then ρ F + (1 − ρ) S
    for every tracker that is due (an inverse step, or no decomposition yet):
        (U, D) ← decomposition(F)           # sketch seeded by (seed, layer, factor, k)
    for every layer with both decompositions and a finite gradient:
        λ_A, λ_G ← damping_mode(δ(k), ...)
        V ← (U_G D_G U_Gᵀ + λ_G I)⁻¹ ∇W (U_A D_A U_Aᵀ + λ_A I)⁻¹
    scale the V's by ``clip``; write them into ``.grad``

Any torch optimizer then steps on the rewritten gradients. Parameters of other layers keep
their plain gradient; so does a preconditioned layer before its first statistics exist (e.g.
when the very first backward ran in eval mode), and one whose gradient is None.

The rooms: layer types and their rows in :mod:`rkfac.layers` (captured by one set of hooks),
the statistics in :mod:`rkfac.kfac.statistics`, what each factor keeps in
:mod:`rkfac.kfac.trackers` (dense average + decomposition, or B-KFAC's online pairs), the
non-finite guards in :mod:`rkfac.kfac.guards`, data parallelism in :mod:`rkfac.distributed`.
Statistics are captured only on factor steps, in training mode, with grad enabled.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from rkfac.clipping import clip_directions
from rkfac.damping import factor_dampings, tikhonov_dampings
from rkfac.decompositions import Pairs
from rkfac.distributed import Communicator, TrafficCounter
from rkfac.distributed.sharded import average_statistics, decompose_across_ranks, refuse_block_layers
from rkfac.health import Health, decompose_with_retry
from rkfac.kfac.guards import Fault, Faults, Guard
from rkfac.kfac.positions import check_mask
from rkfac.kfac.sampled_fisher import LabelSampler
from rkfac.kfac.state import STATE_VERSION, Factor, LayerState, LayerView, layers_state_dict, load_layers, view
from rkfac.kfac.statistics import RowObserver, Statistic, StatisticsCollector
from rkfac.kfac.trackers import DiagonalTracker
from rkfac.layers import SUPPORTED_TEXT, LayerCapture
from rkfac.layers.selection import (
    check_model,
    display_name,
    frozen_layers,
    select_layers,
    skip_rules,
    unmatched_rules,
    unsupported_layers,
    unwrap,
)
from rkfac.lowrank import Damping, DampingsOf, FactorInverse, kronecker_solve
from rkfac.options import KFACOptions
from rkfac.schedules import at_step_float, at_step_int
from rkfac.schema import check_instance, options_from
from rkfac.seeding import keyed_generator
from rkfac.timing import PhaseTimer, maybe_phase

# Layers narrower than this on either side keep the working dtype under ``apply_dtype``.
LOW_PRECISION_MIN_DIM = 128


class DirectionRule(Protocol):
    """What replaces the damped Kronecker solve when given (``direction=``): a rule that keeps
    its own per-layer state and turns a layer's gradient matrix and decompositions (None before
    the first, unless ``needs_pairs``: then such a layer keeps its plain gradient) into its
    direction, e.g. :class:`rkfac.kfac.eigenbasis_adam.EigenbasisAdam`. ``dampings`` gives the
    step's factor dampings (λ_A, λ_G) of a layer's pairs, for a rule that damps as K-FAC does."""

    needs_pairs: bool

    def direction(
        self, name: str, grad: Tensor, pairs: tuple[FactorInverse, FactorInverse] | None, dampings: DampingsOf | None = None
    ) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], devices: dict[str, torch.device]) -> None: ...


@runtime_checkable
class MeasuredRule(DirectionRule, RowObserver, Protocol):
    """A direction rule with a statistic of its own, measured from the rows in the hooks
    (:class:`rkfac.kfac.statistics.RowObserver`), e.g. the eigenvalue correction of
    :mod:`rkfac.kfac.eigenvalue_correction`. At a factor step the preconditioner hands it each
    layer's G scale (``take_batch``), has it averaged over data-parallel ranks with the K-FAC
    statistics (``average_batch``), folds it where the guards passed the statistics (``fold``,
    with ``factor_decay``) and drops the rest (``clear_batch``)."""

    def take_batch(self, name: str, grad_scale: float, dims: tuple[int, int]) -> None: ...

    def average_batch(self, average: Callable[[list[Tensor]], list[Tensor]]) -> None: ...

    def fold(self, name: str, decay: float) -> bool: ...

    def clear_batch(self) -> None: ...


class KFACPreconditioner:
    """K-FAC with a pluggable decomposition of the Kronecker factors.

    Args:
        model: the module whose supported layers (see :data:`rkfac.layers.KINDS`: nn.Linear,
            nn.Conv1d / nn.Conv2d, grouped ones included, nn.Embedding) are preconditioned; a
            DistributedDataParallel wrapper is looked through.
        options: a :class:`rkfac.options.KFACOptions`, or its fields as keyword arguments
            (``decomposition``, ``damping``, ``damping_mode``, ``factor_decay``, ``factor_every``,
            ``inverse_every``, ``clip``, ``clip_value``, ``lr``, ``fisher``, ``mc_loss``,
            ``loss_reduction``, ``skip``, ``seed``, ``apply_dtype``; see that class).
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss of the user's backward,
            if any: the G statistics are divided by its scale² so that factors are those of the
            unscaled loss (overflowed steps are skipped as non-finite). Call
            ``scaler.unscale_(optimizer)`` before ``pre.step()`` (``scaler.step`` does it for
            :class:`rkfac.KFAC`).
        process_group: the torch.distributed group to average statistics and share
            decompositions over (default: the world group when torch.distributed is initialised).
        timer: optional :class:`rkfac.timing.PhaseTimer` accumulating the seconds spent in
            statistics, decomposition and preconditioning.
        direction: a :class:`DirectionRule` that turns each layer's gradient and decompositions
            into its direction instead of the damped solve (damping, damping_mode and the clip's
            lr are then unused); :class:`rkfac.LowRankSOAP` passes its eigenbasis Adam here.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        options: KFACOptions | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        timer: PhaseTimer | None = None,
        direction: DirectionRule | None = None,
        **given: Any,
    ) -> None:
        self.options = options_from(KFACOptions, options, given, "KFACPreconditioner")
        self.direction = direction
        self.grad_scaler = check_instance(grad_scaler, torch.amp.GradScaler, "grad_scaler")
        self.timer = timer
        self.steps = 0
        self._comm = Communicator(process_group)
        model = unwrap(check_model(model, "KFACPreconditioner"))
        rules = skip_rules(self.options.skip)
        unmatched = unmatched_rules(model, rules)
        if unmatched:
            warnings.warn(f"skip rules {unmatched!r} match no module of the model", UserWarning, stacklevel=2)
        selected = select_layers(model, rules)
        self.frozen = frozen_layers(model, rules)
        if not selected:
            raise ValueError(
                f"model {type(model).__name__} has no trainable layer to precondition (rkfac handles {SUPPORTED_TEXT})"
                + (f" after skip={rules!r}" if rules else "")
            )
        method = self.options.decomposition
        self._layers = [
            LayerState(
                name,
                index,
                kind,
                (
                    DiagonalTracker(method) if kind.diagonal_input else method.tracker(kind.online_updates),
                    method.tracker(kind.online_updates),
                ),
            )
            for index, (name, kind) in enumerate(selected.items())
        ]
        refuse_block_layers(self._comm, [display_name(name) for name, kind in selected.items() if kind.block_shape])
        self.unsupported = unsupported_layers(model, selected, rules)
        if self.unsupported:
            listed = ", ".join(f"{name} ({kind})" for name, kind in self.unsupported)
            warnings.warn(
                f"rkfac preconditions {SUPPORTED_TEXT} only; these layers keep their plain gradient: "
                f"{listed}. Pass them in skip= to silence this.",
                UserWarning,
                stacklevel=2,
            )
        self._collector = StatisticsCollector(
            list(selected),
            self._is_factor_step,
            timer,
            self.options.kfac_approx == "reduce",
            self.options.batch_dim,
            self.options.statistics_samples,
        )
        for layer in self._layers:  # B-KFAC's online factors take the rows, not their Gram products
            self._collector.sums[layer.name].keep_rows = any(t.takes_columns for t in layer.trackers)
        self._collector.capture_output_grads = self.options.fisher == "empirical"
        self._measured = direction if isinstance(direction, MeasuredRule) else None
        if self._measured is not None:
            self._collector.observer = self._measured
        self._capture = LayerCapture(selected, self._collector, root=model, batch_dim=self.options.batch_dim)
        self._sampler = LabelSampler(self.options.mc_loss, self.options.loss_reduction, self.options.seed, self._collector)
        self._guard = Guard()

    # ------------------------------------------------------------------ what the user sees

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the preconditioned layers, in model order."""
        return [layer.name for layer in self._layers]

    @property
    def layers(self) -> list[LayerView]:
        """A read-only view of every preconditioned layer: module, kind, factors, decompositions."""
        return [view(layer) for layer in self._layers]

    @property
    def traffic(self) -> TrafficCounter:
        """Bytes this rank has put into collectives (zero in a single process)."""
        return self._comm.traffic

    @property
    def health(self) -> Health:
        """A snapshot of the counts of skipped statistics, gradients and decompositions."""
        return Health(**self._guard.health.as_dict())

    def parameters(self) -> list[Tensor]:
        """The trainable weights and biases of the preconditioned layers."""
        unique = {id(p): p for layer in self._layers for p in layer.kind.parameters() if p.requires_grad}
        return list(unique.values())

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The averaged factors, ``{layer_name: (A, G)}``, of layers that keep both (B-KFAC's
        online factors keep none; see :meth:`eigenpairs`). An embedding's A is its diagonal, a
        vector of width num_embeddings."""
        dense = {layer.name: tuple(t.factor for t in layer.trackers) for layer in self._layers}
        return {name: (a, g) for name, (a, g) in dense.items() if a is not None and g is not None}

    def eigenpairs(self) -> dict[str, tuple[FactorInverse, FactorInverse]]:
        """The decompositions in use, ``{layer_name: (A pairs, G pairs)}`` (an embedding's A is a
        :class:`rkfac.lowrank.DiagonalFactor`)."""
        return {layer.name: pairs for layer in self._layers if (pairs := layer.pairs()) is not None}

    def ranks(self) -> dict[str, tuple[int, int]]:
        """Eigenpairs kept per layer, ``{layer_name: (k_A, k_G)}`` (varies with ``adaptive_rank``)."""
        return {name: (a.rank, g.rank) for name, (a, g) in self.eigenpairs().items()}

    def describe(self) -> str:
        """The preconditioned layers, one line each: name, type, d_A × d_G (of each block); then those left out."""
        lines = []
        for layer in self._layers:
            d_a, d_g = layer.kind.factor_dims
            a_shape = f"{d_a} (diagonal)" if layer.kind.diagonal_input else f"{d_a} × {d_a}"
            each = "".join(f"{blocks} blocks of " for blocks in layer.kind.block_shape)  # grouped convolutions
            lines.append(f"{display_name(layer.name)}: {layer.kind.label}, A {each}{a_shape}, G {each}{d_g} × {d_g}")
        skipped = [f"{name} ({kind})" for name, kind in self.unsupported]
        lines += [f"not preconditioned: {', '.join(skipped)}"] if skipped else []
        lines += [f"frozen, left out: {', '.join(map(display_name, self.frozen))}"] if self.frozen else []
        return "\n".join(lines)

    # ------------------------------------------------------------------ the step

    def step(self) -> None:
        """Precondition the current gradients in place (see the module docstring)."""
        step = self.steps
        if self.options.fisher == "mc":
            self._sampler.check()
        with torch.no_grad():
            with maybe_phase(self.timer, "decomposition"):
                statistics = self._take_statistics()
                if statistics:
                    self._note_missing(statistics, step)
                faults = self._guard.check(statistics, self._gradients(), step)
                self._update_factors(statistics, faults, step)
                self._decompose(step)
            with maybe_phase(self.timer, "precondition"):
                self._precondition(step, faults)
        self._capture.forget_awaiting()  # a compiled model's calls whose gradient did not come (layers.capture)
        self.steps += 1

    def _is_factor_step(self) -> bool:
        step = self.steps
        return step % at_step_int(self.options.factor_every, step, "factor_every", low=1) == 0

    def _take_statistics(self) -> dict[str, tuple[Statistic, Statistic]]:
        """This step's statistics of every layer that captured both sides; clears the sums.

        Unscaled from a GradScaler's loss scale and, in a process group, averaged over ranks.
        """
        reduction = self.options.loss_reduction
        scale = self._loss_scale()
        statistics: dict[str, tuple[Statistic, Statistic]] = {}
        for layer in self._layers:
            sums = self._collector.sums[layer.name]
            if not (sums.has_inputs and sums.has_output_grads):
                continue
            if self._measured is not None:
                d_a, d_g = layer.kind.factor_dims
                self._measured.take_batch(layer.name, sums.grad_scale(reduction) / scale**2, (d_g, d_a))
            if not sums.keep_rows:
                a, g = sums.averages(reduction)
                statistics[layer.name] = (Statistic(a), Statistic(g))
                continue
            a_columns, g_columns = sums.columns(reduction)
            a_tracker, g_tracker = layer.trackers
            world = self._comm.world_size
            statistics[layer.name] = (a_tracker.from_columns(a_columns, world), g_tracker.from_columns(g_columns, world))
        self._collector.clear()
        if self._measured is not None and self._comm.active:
            self._measured.average_batch(self._comm.average_flat)
        if scale != 1.0:
            statistics = {
                name: (a, Statistic(g.value / (scale if g.columns else scale**2), g.columns))
                for name, (a, g) in statistics.items()
            }
        return average_statistics(self._comm, statistics)

    def _note_missing(self, statistics: dict[str, tuple[Statistic, Statistic]], step: int) -> None:
        """Layers that have never had statistics although others have them at this factor step."""
        missing = [
            layer.name
            for layer in self._layers
            if layer.name not in statistics and all(t.factor is None and t.pairs is None for t in layer.trackers)
        ]
        if missing:
            self._guard.missing_statistics(missing, step)

    def _gradients(self) -> list[tuple[str, Tensor]]:
        return [(layer.name, grad) for layer in self._layers for grad in layer.kind.gradients()]

    def _update_factors(self, statistics: dict[str, tuple[Statistic, Statistic]], faults: Faults, step: int) -> None:
        for layer in self._layers:
            if layer.name in statistics and not Fault.bad_statistic(faults.get(layer.name, [])):
                for tracker, statistic in zip(layer.trackers, statistics[layer.name], strict=True):
                    tracker.update(statistic, self.options.factor_decay)
                if self._measured is not None and not self._measured.fold(layer.name, self.options.factor_decay):
                    self._guard.skipped_measurement(layer.name, step)
        if self._measured is not None:
            self._measured.clear_batch()

    def _decompose(self, step: int) -> None:
        """Decompose every due factor (in a process group, by its owner only, then shared)."""
        scheduled = step % at_step_int(self.options.inverse_every, step, "inverse_every", low=1) == 0
        jobs = [(layer, f) for layer in self._layers for f in Factor if layer.trackers[f.value].due(step, scheduled)]
        seed = self.options.seed
        for layer in self._layers:
            for f in Factor:
                keys = (seed, "reproject", layer.index, f.value, step)
                layer.trackers[f.value].maintain(step, functools.partial(_keyed, keys))

        def decompose(job: int) -> Pairs | None:
            layer, f = jobs[job]
            tracker = layer.trackers[f.value]
            factor = tracker.factor
            assert factor is not None
            generator = functools.partial(keyed_generator, factor.device, seed, "sketch", layer.index, f.value, step)
            pairs, retried = decompose_with_retry(tracker.method, factor, generator, step, tracker.eigenpairs)
            self._guard.decomposition(retried, pairs is None, layer.name, f.name, step, tracker.pairs is not None)
            return pairs

        results = decompose_across_ranks(self._comm, [layer.trackers[f.value] for layer, f in jobs], step, decompose)
        for (layer, f), pairs in zip(jobs, results, strict=True):
            if pairs is not None:
                layer.trackers[f.value].pairs = pairs

    def _precondition(self, step: int, faults: Faults) -> None:
        damping = at_step_float(self.options.damping, step, "damping", low=0.0, low_inclusive=False)
        updated: list[tuple[LayerState, Tensor]] = []
        grads: list[Tensor] = []
        for layer in self._layers:
            pairs = layer.pairs()
            needs_pairs = self.direction is None or self.direction.needs_pairs
            if (pairs is None and needs_pairs) or Fault.GRADIENT in faults.get(layer.name, []):
                continue
            grad = layer.kind.grad_matrix()
            if grad is None:
                continue
            if self.direction is not None:
                # the factors' dtype (float32, float64 for a float64 model), also before the first pairs
                working = torch.promote_types(grad.dtype, torch.float32) if pairs is None else pairs[0].values.dtype
                grad = grad.to(working)
                dampings = functools.partial(self._factor_dampings, damping)
                updated.append((layer, self.direction.direction(layer.name, grad, pairs, dampings)))
                grads.append(grad)
                continue
            assert pairs is not None
            a_pairs, g_pairs = pairs
            grad = grad.to(a_pairs.values.dtype)
            a_damping, g_damping = self._factor_dampings(damping, a_pairs, g_pairs)
            dtype = self._solve_dtype(grad, pairs)
            updated.append((layer, kronecker_solve(grad, g_pairs, g_damping, a_pairs, a_damping, dtype)))
            grads.append(grad)
        options = self.options
        lr = at_step_float(options.lr, step, "lr", low=0.0) if options.clip == "kl" else 0.0
        clip_directions(options.clip, options.clip_value, [direction for _, direction in updated], grads, lr)
        for layer, direction in updated:
            layer.kind.set_grad_matrix(direction)

    def _factor_dampings(self, damping: float, a_pairs: FactorInverse, g_pairs: FactorInverse) -> tuple[Damping, Damping]:
        """(λ_A, λ_G) from δ = ``damping`` as ``damping_mode`` and ``damping_scale`` say (:mod:`rkfac.damping`)."""
        options = self.options
        if options.damping_scale == "tikhonov":
            return tikhonov_dampings(options.damping_mode, damping, a_pairs, g_pairs, floor=options.damping_floor)
        return factor_dampings(options.damping_mode, damping, a_pairs, g_pairs)

    def _apply_dtype_for(self, grad: Tensor) -> torch.dtype | None:
        """``apply_dtype`` for layers with both sides ≥ LOW_PRECISION_MIN_DIM, else None: small
        layers gain no time from it and lose the most accuracy (an output layer's G has a few
        dominant modes, where bfloat16's rounding is amplified most)."""
        return self.options.apply_dtype if min(grad.shape) >= LOW_PRECISION_MIN_DIM else None

    def _solve_dtype(self, grad: Tensor, pairs: tuple[FactorInverse, FactorInverse]) -> torch.dtype | None:
        """:meth:`_apply_dtype_for`, and None where a factor is diagonal (a scaling has no large product)."""
        return self._apply_dtype_for(grad) if all(p.low_precision for p in pairs) else None

    def _loss_scale(self) -> float:
        """The GradScaler's scale in the user's backward (1 without one, or with the MC Fisher)."""
        if self.grad_scaler is None or not self.grad_scaler.is_enabled() or self.options.fisher != "empirical":
            return 1.0
        return float(self.grad_scaler.get_scale())

    # ------------------------------------------------------------------ padded positions

    @contextlib.contextmanager
    def positions(self, kept: Tensor) -> Iterator[None]:
        """Leave the positions where ``kept`` is False (a sequence batch's padding) out of the
        statistics of the forwards run inside (:mod:`rkfac.kfac.positions`)::

            with pre.positions(tokens != pad_id):     # (batch, positions), samples first
                logits = model(tokens)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).backward()

        ``kept`` is a bool tensor shaped like the batch's positions, samples first whatever
        ``batch_dim`` says. Layers whose rows are those positions (Linear, attention
        projections, Embedding) drop the left-out rows from A and G; a layer with one row per
        sample keeps its rows; a layer whose positions have another shape is refused by name.
        Refused with ``kfac_approx="reduce"``.
        """
        if self.options.kfac_approx == "reduce":
            raise ValueError(
                "positions() needs kfac_approx='expand': 'reduce' averages each sample's rows before the "
                "products, and a position mask there is not implemented"
            )
        mask, previous = self._collector.positions, self._collector.positions.kept
        mask.kept = check_mask(kept)
        try:
            yield
        finally:
            mask.kept = previous

    # ------------------------------------------------------------------ the MC Fisher

    def sample_fisher(self, outputs: Tensor, targets: Tensor | None = None, ignore_index: int = -100) -> None:
        """For ``fisher="mc"``: capture G from a backward with labels sampled from ``outputs``.

        Call it after the forward and before ``loss.backward()``, on every step (it returns at
        once on steps that are not factor steps)::

            logits = model(x)
            pre.sample_fisher(logits)                 # pre.sample_fisher(logits, targets=y) with padding
            F.cross_entropy(logits, y).backward()
            pre.step(); optimizer.step()

        ``targets`` (cross-entropy, class indices shaped like ``outputs`` without its last
        dimension): the positions whose target is ``ignore_index`` (a sequence's padding, left
        out of your loss) are left out of the sampled loss too, which then divides a mean by
        the positions kept, as yours does. Without it every position gets a sampled label.

        The sampled backward uses ``torch.autograd.grad``, so ``.grad`` is not touched, and it
        keeps the graph for the user's own backward.
        """
        options = self.options
        if options.fisher != "mc":
            raise ValueError(f"sample_fisher is for fisher='mc'; this preconditioner has fisher={options.fisher!r}")
        kept = None
        if targets is not None:
            if options.mc_loss != "cross_entropy":
                raise ValueError(f"sample_fisher's targets= are for cross_entropy's padding; mc_loss is {options.mc_loss!r}")
            if targets.shape != outputs.shape[:-1]:
                raise ValueError(
                    f"sample_fisher's targets have shape {tuple(targets.shape)}; the outputs {tuple(outputs.shape)} "
                    f"need {tuple(outputs.shape[:-1])} (a class index per position)"
                )
            kept = targets != ignore_index
        if self._is_factor_step() and outputs.requires_grad:
            weights: list[Tensor] = list({id(p): p for layer in self._layers for p in layer.kind.parameters()}.values())
            self._sampler.backward(outputs, weights, kept)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The step, every factor tracker, the health counts and the label sampler (see :mod:`rkfac.kfac.state`)."""
        state = {
            "version": STATE_VERSION,
            "steps": self.steps,
            "layers": layers_state_dict(self._layers),
            "mc_generator": self._sampler.state(),
            "health": self._guard.health.as_dict(),
        }
        if self.direction is not None:
            state["direction"] = self.direction.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (or an older version's); tensors move to each layer's device."""
        load_layers(self._layers, state)
        self.steps = int(state["steps"])
        self._guard.health = Health.from_dict(state.get("health"))  # absent from older state dicts
        self._collector.clear()
        self._sampler.load(state.get("mc_generator"))
        if (self.direction is None) != ("direction" not in state):
            raise ValueError(
                "state_dict and preconditioner disagree on the direction rule (the eigenbasis Adam of "
                "rkfac.LowRankSOAP, or the damped solve): load it into the optimizer that saved it"
            )
        if self.direction is not None:
            devices = {layer.name: layer.kind.parameters()[0].device for layer in self._layers}
            self.direction.load_state_dict(state["direction"], devices)

    def remove(self) -> None:
        """Take the hooks off the model; the preconditioner captures nothing afterwards."""
        self._capture.remove()

    def __repr__(self) -> str:
        options = self.options
        return (
            f"{type(self).__name__}(decomposition={options.decomposition!r}, damping_mode={options.damping_mode!r}, "
            f"factor_decay={options.factor_decay}, clip={options.clip!r}, fisher={options.fisher!r}, layers={self.layer_names})"
        )


def _keyed(keys: tuple[int | str, ...], device: torch.device) -> torch.Generator:
    return keyed_generator(device, *keys)


__all__ = ["LOW_PRECISION_MIN_DIM", "DirectionRule", "KFACPreconditioner", "MeasuredRule"]
