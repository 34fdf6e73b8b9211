"""SENG (Yang et al. 2021), the comparison method: empirical natural gradient by Woodbury.

Per Linear/Conv2d layer, with U the n × D matrix of per-sample gradients of the true-label
loss divided by √n (D = d_G·d_A, bias as the last column), the direction for the layer's
gradient g is

    (λI + UᵀU)⁻¹ g = (g − Uᵀ (λI + UUᵀ)⁻¹ U g) / λ

an n × n solve instead of D × D. U and the inverse K⁻¹ = (λI + UUᵀ)⁻¹ are rebuilt every
``update_freq`` steps from that step's batch and reused in between: only U g, a batched
n × n product and Uᵀ w are paid per step. Every other parameter gets g / (1 + λ).

How U is held (:mod:`rkfac.seng.gradients`):

- layers with d_G·d_A ≤ ``sketch_threshold``: exactly — factored (g aᵀ per sample) for
  Linear layers on matrix inputs, explicit rows for convolutions;
- larger layers: sketched — each convolution's per-sample output-gradient map compressed to
  its top ``sketch_rank`` singular directions, and ``col_sample_size`` of the output rows and
  of the input rows sampled (col_sample_size² coordinates) for UUᵀ and U g.

Per-sample gradients come from the shared hooks of :mod:`rkfac.layers.capture` (the layer input
in a forward hook, the output gradient in a hook on the output tensor, so in-place activations
after the layer work), only on the steps that rebuild, and are compressed as soon as the output
gradient arrives so the unfolded convolution inputs are never all alive at once. A layer called
several times in one forward (weight sharing) is handled as K-FAC handles it: the calls of one
model forward are positions of the same samples, so sample i's gradient is the sum over the
calls (factored pieces are concatenated along their positions, explicit rows are summed), and
its n samples count once.

Decisions (the issue is silent on them):

- A rebuild uses whatever batch that step saw: a smaller last batch gives a smaller n (the
  reference code skips such batches). Several forward/backward passes before one ``step()``
  are concatenated into one U.
- With a ``grad_scaler`` (torch.amp.GradScaler) the captured output gradients are divided by
  its scale, so U holds per-sample gradients of the unscaled loss.
- λ is read at each rebuild and used until the next one, for K⁻¹ and for the division.
- With ``loss_reduction="mean"`` the per-sample gradient is n_pass × (the sample's share of the
  batch gradient), n_pass = that forward's batch size; with "sum" it is the share itself.
- Data parallel (torch.distributed initialised; the model may be wrapped in
  DistributedDataParallel, which averages the gradients): on rebuilds every rank gathers the
  per-sample gradients of all ranks, so U, the column samples (keyed by seed, layer, step)
  and K⁻¹ are those of the global batch and identical everywhere.
- The n × n systems are stacked over layers and factorised together (Cholesky, float64), and
  the per-step product with K⁻¹ is one batched matmul.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rkfac.distributed import Communicator, TrafficCounter
from rkfac.health import Health
from rkfac.kfac.positions import check_mask
from rkfac.layers import Call, LayerCapture, LayerKind
from rkfac.layers.selection import check_model, display_name, select_layers, unwrap
from rkfac.options import SENGOptions
from rkfac.schedules import at_step_float
from rkfac.schema import check_instance, options_from
from rkfac.seeding import keyed_generator
from rkfac.seng import per_sample
from rkfac.seng.gradients import ExplicitGradients, FactoredGradients, PerSampleGradients, from_tensors, sample_rows
from rkfac.timing import PhaseTimer, maybe_phase


@dataclass
class _Piece:
    """Per-sample gradients of one layer call: explicit rows or a factored pair, and its sample group."""

    group: int
    rows: Tensor | None = None
    grad_columns: Tensor | None = None
    input_columns: Tensor | None = None

    def explicit_rows(self) -> Tensor:
        if self.rows is not None:
            return self.rows
        assert self.grad_columns is not None and self.input_columns is not None
        return per_sample.explicit(self.grad_columns, self.input_columns)


def _merge_calls(pieces: list[_Piece]) -> list[_Piece]:
    """One piece per sample group: the calls of one model forward are positions of the same samples."""
    by_group: dict[int, list[_Piece]] = {}
    for piece in pieces:
        by_group.setdefault(piece.group, []).append(piece)
    merged = []
    for group, calls in by_group.items():
        if len(calls) == 1:
            merged.append(calls[0])
        elif all(call.rows is None for call in calls):
            grad_columns = torch.cat([call.grad_columns for call in calls], dim=2)  # type: ignore[misc]
            input_columns = torch.cat([call.input_columns for call in calls], dim=2)  # type: ignore[misc]
            merged.append(_Piece(group, grad_columns=grad_columns, input_columns=input_columns))
        else:
            merged.append(_Piece(group, rows=torch.stack([call.explicit_rows() for call in calls]).sum(0)))
    return merged


@dataclass
class _SENGLayer:
    name: str
    index: int  # the module's position in model.named_modules(): keys its column samples
    kind: LayerKind
    sketched: bool
    pieces: list[_Piece] = field(default_factory=list)
    gradients: PerSampleGradients | None = None


class SENGPreconditioner:
    """Rewrites ``.grad`` of ``model``'s parameters into SENG directions on ``step()``.

    Call ``step()`` after ``loss.backward()`` and before the optimizer step; the model's
    forward on a rebuild step must run in training mode with grad enabled. Options: a
    :class:`rkfac.options.SENGOptions` or its fields as keywords (``damping``, ``update_freq``,
    ``col_sample_size``, ``sketch_threshold``, ``sketch_rank``, ``loss_reduction``, ``seed``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        options: SENGOptions | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        timer: PhaseTimer | None = None,
        **given: Any,
    ) -> None:
        self.options = options_from(SENGOptions, options, given, "SENGPreconditioner")
        self.grad_scaler = check_instance(grad_scaler, torch.amp.GradScaler, "grad_scaler")
        self.timer = timer
        self.steps = 0
        self._built_damping: float | None = None
        self._inverses: Tensor | None = None  # (L, n, n): K⁻¹ for the layers in self._built
        self._built: list[_SENGLayer] = []
        self._comm = Communicator(process_group)
        model = unwrap(check_model(model, "SENGPreconditioner"))
        selected = {name: kind for name, kind in select_layers(model, []).items() if kind.per_sample}
        if not selected:
            raise ValueError("model has no Linear or Conv2d layer with trainable weights for SENG to precondition")
        positions = {name: index for index, (name, _) in enumerate(model.named_modules())}
        for name in selected:  # attention projections are not modules of the model: numbered after them
            positions.setdefault(name, len(positions))
        threshold = self.options.sketch_threshold
        self._layers = [
            _SENGLayer(name, positions[name], kind, sketched=kind.factor_dims[0] * kind.factor_dims[1] > threshold)
            for name, kind in selected.items()
        ]
        covered = {id(p) for layer in self._layers for p in layer.kind.parameters()}
        self._other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
        self._by_name = {layer.name: layer for layer in self._layers}
        self._capture = LayerCapture(selected, self, root=model, batch_dim=self.options.batch_dim)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    @property
    def traffic(self) -> TrafficCounter:
        """Bytes this rank has put into collectives (zero in a single process)."""
        return self._comm.traffic

    def parameters(self) -> list[Tensor]:
        """The trainable parameters of the layers it keeps per-sample gradients of."""
        unique = {id(p): p for layer in self._layers for p in layer.kind.parameters() if p.requires_grad}
        return list(unique.values())

    @property
    def health(self) -> Health:
        """SENG skips nothing (a non-finite gradient flows through to the caller): all counts 0."""
        return Health()

    def ranks(self) -> dict[str, tuple[int, int]]:
        """SENG keeps no Kronecker decompositions: empty."""
        return {}

    def describe(self) -> str:
        lines = []
        for layer in self._layers:
            d_a, d_g = layer.kind.factor_dims
            form = "sketched" if layer.sketched else "exact"
            lines.append(f"{display_name(layer.name)}: {layer.kind.label}, {d_g} × {d_a} per-sample gradients ({form})")
        return "\n".join(
            lines + ([f"divided by (1 + λ): {len(self._other_params)} other parameters"] if self._other_params else [])
        )

    def sample_fisher(self, outputs: Tensor, targets: Tensor | None = None, ignore_index: int = -100) -> None:
        raise ValueError("SENG uses the empirical Fisher of the user's backward; it has no fisher='mc'")

    @contextlib.contextmanager
    def positions(self, kept: Tensor) -> Iterator[None]:
        """Checks ``kept`` as K-FAC's does and changes nothing: a per-sample gradient
        Σ_t g_t a_tᵀ already has no part from a padded position, whose output gradient g_t the
        loss makes zero."""
        check_mask(kept)
        yield

    @property
    def rebuilds_now(self) -> bool:
        """Whether the coming ``step()`` rebuilds U and K⁻¹ (and so the hooks capture)."""
        return self.steps % self.options.update_freq == 0

    # -- capture (the sink of rkfac.layers.LayerCapture) ----------------------------------------

    def capturing(self) -> bool:
        return self.rebuilds_now

    def on_input(self, name: str, layer: LayerKind, inputs: Tensor) -> Tensor:
        return inputs  # kept until the output gradient arrives

    def on_output_grad(self, name: str, layer: LayerKind, grad: Tensor, call: Call) -> None:
        self._add_piece(self._by_name[name], call.context, grad, call)

    def _add_piece(self, layer: _SENGLayer, inputs: Tensor, grad_output: Tensor, call: Call) -> None:
        dtype = layer.kind.statistics_dtype
        scale = float(call.samples) if self.options.loss_reduction == "mean" else 1.0
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            scale /= float(self.grad_scaler.get_scale())  # per-sample gradients of the unscaled loss
        with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False), maybe_phase(self.timer, "statistics"):
            batch_dim = self.options.batch_dim
            inputs, grad_output = (layer.kind.batch_first(t.to(dtype), batch_dim) for t in (inputs, grad_output))
            grad_columns, input_columns = per_sample.per_sample_factors(layer.kind, inputs, grad_output, scale)
            if layer.sketched:
                grad_columns, input_columns = per_sample.truncate(grad_columns, input_columns, self.options.sketch_rank)
                layer.pieces.append(_Piece(call.group, grad_columns=grad_columns, input_columns=input_columns))
            elif grad_columns.shape[2] == 1:
                layer.pieces.append(_Piece(call.group, grad_columns=grad_columns, input_columns=input_columns))
            else:
                layer.pieces.append(_Piece(call.group, rows=per_sample.explicit(grad_columns, input_columns)))

    # -- rebuild --------------------------------------------------------------------------

    def _gradients_of(self, layer: _SENGLayer) -> PerSampleGradients:
        """U for one layer from its captured pieces, rows scaled by 1/√n."""
        d_a, d_g = layer.kind.factor_dims
        pieces = _merge_calls(layer.pieces)
        if any(piece.rows is not None for piece in pieces):
            all_rows = self._comm.gather_rows(torch.cat([piece.explicit_rows() for piece in pieces]))
            return ExplicitGradients(all_rows / math.sqrt(all_rows.shape[0]), (d_g, d_a))
        grad_columns = self._comm.gather_rows(torch.cat([piece.grad_columns for piece in pieces]))  # type: ignore[misc]
        input_columns = self._comm.gather_rows(torch.cat([piece.input_columns for piece in pieces]))  # type: ignore[misc]
        grad_columns /= math.sqrt(grad_columns.shape[0])
        if not layer.sketched:
            return FactoredGradients(grad_columns, input_columns)
        generator = keyed_generator(torch.device("cpu"), self.options.seed, "seng-columns", layer.index, self.steps)
        device = grad_columns.device
        size = self.options.col_sample_size
        grad_index = sample_rows(d_g, size, generator, device)
        input_index = sample_rows(d_a, size, generator, device)
        return FactoredGradients(grad_columns, input_columns, grad_index, input_index)

    def _rebuild(self) -> None:
        captured = [layer for layer in self._layers if layer.pieces]
        if not captured:
            raise RuntimeError(
                f"SENG step {self.steps} rebuilds the curvature but no layer captured per-sample gradients: "
                "run the forward in training mode with grad enabled, then backward, before step()"
            )
        damping = at_step_float(self.options.damping, self.steps, "damping", low=0.0, low_inclusive=False)
        with maybe_phase(self.timer, "decomposition"):
            for layer in self._layers:
                layer.gradients = self._gradients_of(layer) if layer.pieces else None
                layer.pieces = []
            built = [layer for layer in self._layers if layer.gradients is not None]
            sizes = {layer.gradients.samples for layer in built}  # type: ignore[union-attr]
            if len(sizes) != 1:
                raise RuntimeError(f"SENG layers captured different numbers of samples {sorted(sizes)} in one step")
            grams = [layer.gradients.gram() for layer in built]  # type: ignore[union-attr]
            systems = torch.stack(grams).double()
            systems.diagonal(dim1=1, dim2=2).add_(damping)
            self._inverses = torch.cholesky_inverse(torch.linalg.cholesky(systems)).to(grams[0].dtype)
        self._built, self._built_damping = built, damping

    # -- step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Replace every gradient by its SENG direction (rebuilding U and K⁻¹ when due)."""
        if self.rebuilds_now:
            self._rebuild()
        assert self._inverses is not None and self._built_damping is not None
        damping = self._built_damping
        with maybe_phase(self.timer, "precondition"):
            active = [(slot, layer) for slot, layer in enumerate(self._built) if layer.kind.grad_matrix() is not None]
            grads = {layer.name: layer.kind.grad_matrix() for _, layer in active}
            if active:
                projections = torch.zeros(self._inverses.shape[:2], dtype=self._inverses.dtype, device=self._inverses.device)
                for slot, layer in active:
                    projections[slot] = layer.gradients.project(grads[layer.name].to(projections.dtype))  # type: ignore[union-attr]
                weights = torch.bmm(self._inverses, projections.unsqueeze(2)).squeeze(2)
                for slot, layer in active:
                    grad = grads[layer.name]
                    assert grad is not None and layer.gradients is not None
                    correction = layer.gradients.combine(weights[slot]).to(grad.dtype)
                    layer.kind.set_grad_matrix((grad - correction) / damping)
            built_names = {layer.name for layer in self._built}
            for layer in self._layers:
                if layer.name not in built_names:
                    layer.kind.divide_grad(1.0 + damping)
            self._divide(self._other_params, damping)
        self._capture.forget_awaiting()  # a compiled model's calls whose gradient did not come (layers.capture)
        self.steps += 1

    @staticmethod
    def _divide(params: Any, damping: float) -> None:
        for param in params:
            if param.grad is not None:
                param.grad.div_(1.0 + damping)

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "built_damping": self._built_damping,
            "inverses": self._inverses,
            "built": [layer.name for layer in self._built],
            "gradients": {layer.name: layer.gradients.tensors() for layer in self._built if layer.gradients is not None},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`, tensors moved to each layer's device."""
        by_name = self._by_name
        unknown = [name for name in state["built"] if name not in by_name]
        if unknown:
            raise ValueError(f"SENG state has layers {unknown} that this model does not have")
        self.steps = int(state["steps"])
        self._built_damping = state["built_damping"]
        self._built = [by_name[name] for name in state["built"]]
        for layer in self._layers:
            layer.gradients, layer.pieces = None, []
        for layer in self._built:
            device = layer.kind.weight.device
            tensors = {key: None if value is None else value.to(device) for key, value in state["gradients"][layer.name].items()}
            d_a, d_g = layer.kind.factor_dims
            layer.gradients = from_tensors(tensors, (d_g, d_a))
        inverses = state["inverses"]
        self._inverses = None if inverses is None else inverses.to(self._layers[0].kind.weight.device)

    def remove(self) -> None:
        """Remove the hooks; the model is left as it was before construction."""
        self._capture.remove()
