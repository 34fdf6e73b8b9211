"""Forward hooks that collect K-FAC statistics, kept apart from the math in :mod:`rkfac.layers`.

A forward hook on each preconditioned layer adds ``aᵀa`` of the layer input to a running sum
and registers a hook on the output tensor that adds ``gᵀg`` of its gradient when the backward
pass reaches it. Sums (not averages) are kept so that several forward/backward passes before
one optimizer step (gradient accumulation, or a layer called twice) combine into the
statistics of the concatenated batch.

Why a hook on the output tensor rather than ``register_full_backward_hook``: the full backward
hook wraps the output in a custom autograd function, which breaks a following in-place
activation (``nn.ReLU(inplace=True)``). A tensor hook registered before the in-place change
receives the gradient of the tensor as the layer produced it, which is what K-FAC needs.

Statistics are summed in float32 (float64 for a float64 layer), whatever the activation
dtype, so autocast does not degrade them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rkfac import layers
from rkfac.layers import SupportedLayer
from rkfac.timing import PhaseTimer, maybe_phase


def statistics_dtype(module: SupportedLayer) -> torch.dtype:
    return torch.float64 if module.weight.dtype == torch.float64 else torch.float32


def _gram(rows: Tensor) -> Tensor:
    """``rowsᵀ rows`` in the dtype of ``rows``: hooks run inside the user's autocast region,
    which would otherwise compute it in bf16/fp16."""
    with torch.autocast(rows.device.type, enabled=False):
        return rows.T @ rows


class StatisticSums:
    """Running sums of one layer's statistics since the last factor update."""

    input_sum: Tensor | None
    input_rows: int
    grad_sum: Tensor | None
    grad_samples: int

    def __init__(self) -> None:
        self.clear()

    def add_inputs(self, rows: Tensor) -> None:
        gram = _gram(rows)
        self.input_sum = gram if self.input_sum is None else self.input_sum.add_(gram)
        self.input_rows += rows.shape[0]

    def add_output_grads(self, rows: Tensor, samples: int) -> None:
        gram = _gram(rows)
        self.grad_sum = gram if self.grad_sum is None else self.grad_sum.add_(gram)
        self.grad_samples += samples

    @property
    def has_inputs(self) -> bool:
        return self.input_sum is not None

    @property
    def has_output_grads(self) -> bool:
        return self.grad_sum is not None

    def averages(self, loss_reduction: str) -> tuple[Tensor, Tensor]:
        """(S_A, S_G) with the scaling documented in :mod:`rkfac.layers`."""
        assert self.input_sum is not None and self.grad_sum is not None
        s_a = self.input_sum / self.input_rows
        n = self.grad_samples
        s_g = self.grad_sum * n if loss_reduction == "mean" else self.grad_sum / n
        return s_a, s_g

    def clear(self) -> None:
        self.input_sum, self.input_rows = None, 0
        self.grad_sum, self.grad_samples = None, 0


class StatisticsCapture:
    """Installs and owns the hooks; decides nothing about when to capture.

    ``should_capture()`` is asked at every forward of a layer in training mode with grad
    enabled. ``capture_output_grads`` is read when the backward reaches a layer: the
    preconditioner clears it in "mc" mode so that the user's own backward adds nothing to G.
    """

    def __init__(
        self, modules: dict[str, SupportedLayer], should_capture: Callable[[], bool], timer: PhaseTimer | None = None
    ) -> None:
        self.sums = {name: StatisticSums() for name in modules}
        self.timer = timer
        self.should_capture = should_capture
        self.capture_output_grads = True
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._forward_hook(name)) for name, module in modules.items()
        ]

    def _forward_hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        sums = self.sums[name]

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not (module.training and torch.is_grad_enabled() and self.should_capture()):
                return
            layer: SupportedLayer = module  # type: ignore[assignment]
            dtype = statistics_dtype(layer)
            x = inputs[0].detach()
            samples = layers.sample_count(x)
            with torch.no_grad(), maybe_phase(self.timer, "statistics"):
                sums.add_inputs(layers.input_rows(layer, x).to(dtype))
            if output.requires_grad:
                output.register_hook(self._output_grad_hook(layer, sums, samples, dtype))

        return hook

    def _output_grad_hook(
        self, layer: SupportedLayer, sums: StatisticSums, samples: int, dtype: torch.dtype
    ) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self.capture_output_grads:
                with torch.no_grad(), maybe_phase(self.timer, "statistics"):
                    sums.add_output_grads(layers.output_grad_rows(layer, grad.detach()).to(dtype), samples)

        return hook

    def clear(self) -> None:
        for sums in self.sums.values():
            sums.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
