"""Forward hooks that collect K-FAC statistics, kept apart from the math in :mod:`rkfac.layers`.

A forward hook on each preconditioned layer adds ``aᵀa`` of the layer input to a running sum
and registers a hook on the output tensor that adds ``gᵀg`` of its gradient when the backward
pass reaches it. Sums (not averages) are kept so that several forward/backward passes before
one optimizer step (gradient accumulation) combine into the statistics of the concatenated
batch.

A layer called several times in one forward (weight sharing, e.g. ``y = fc(fc(x))``) adds
the rows of every call to both sums, and its samples n count once: the calls are treated
like the positions of a convolution (KFC), or the time steps of K-FAC for RNNs (Martens,
Ba & Ando 2018, uses assumed independent), which is "K-FAC-expand" of Eschenhagen et al.
(2023). With the scaling of :mod:`rkfac.layers`, for T calls on n samples (N rows a call),

    S_A = Σ_{calls, rows} a aᵀ / (T N),    S_G = n Σ_{calls, rows} g gᵀ   (mean loss),

exactly the statistics of one call on the n samples with the T uses as extra positions.
Counting the n samples once per call instead (as for micro-batches) would make S_G T times
larger with a mean loss and T times smaller with a sum loss, so the two reductions would no
longer agree. Calls "in one forward" are the layer calls made while the model given as
``root`` runs its forward: a forward pre-hook on the model starts a new sample group, and
every layer call inside it belongs to that group. Each micro-batch of gradient accumulation
is its own model call, so its samples add up as before; a layer called directly, outside
the model (or with no ``root``), is a group of its own.

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
    """Running sums of one layer's statistics since the last factor update.

    With ``keep_rows`` (B-KFAC's online factors) the rows themselves are kept instead of their
    Gram products, so that :meth:`columns` can hand the low-rank statistic S = C Cᵀ to
    Brand's update without a d × d product; :meth:`averages` still works from them.
    """

    input_sum: Tensor | None
    input_rows: int
    grad_sum: Tensor | None
    _samples_by_group: dict[int, int]

    def __init__(self, keep_rows: bool = False) -> None:
        self.keep_rows = keep_rows
        self.clear()

    def add_inputs(self, rows: Tensor) -> None:
        if self.keep_rows:
            self._input_parts.append(rows)
        else:
            gram = _gram(rows)
            self.input_sum = gram if self.input_sum is None else self.input_sum.add_(gram)
        self.input_rows += rows.shape[0]

    def add_output_grads(self, rows: Tensor, samples: int, group: int) -> None:
        """Add the rows of one call; ``samples`` count once per sample ``group`` (one model call)."""
        if self.keep_rows:
            self._grad_parts.append(rows)
        else:
            gram = _gram(rows)
            self.grad_sum = gram if self.grad_sum is None else self.grad_sum.add_(gram)
        self._samples_by_group[group] = samples

    @property
    def grad_samples(self) -> int:
        """n of the G scaling: the samples of every model call whose gradients were added."""
        return sum(self._samples_by_group.values())

    @property
    def has_inputs(self) -> bool:
        return self.input_sum is not None or bool(self._input_parts)

    @property
    def has_output_grads(self) -> bool:
        return self.grad_sum is not None or bool(self._grad_parts)

    def _scales(self, loss_reduction: str) -> tuple[float, float]:
        """(c_A, c_G) with S_A = c_A Σ a aᵀ and S_G = c_G Σ g gᵀ."""
        n = self.grad_samples
        return 1.0 / self.input_rows, (float(n) if loss_reduction == "mean" else 1.0 / n)

    def averages(self, loss_reduction: str) -> tuple[Tensor, Tensor]:
        """(S_A, S_G) with the scaling documented in :mod:`rkfac.layers`."""
        c_a, c_g = self._scales(loss_reduction)
        if self.keep_rows:
            return _gram(torch.cat(self._input_parts)) * c_a, _gram(torch.cat(self._grad_parts)) * c_g
        assert self.input_sum is not None and self.grad_sum is not None
        return self.input_sum * c_a, self.grad_sum * c_g

    def columns(self, loss_reduction: str) -> tuple[Tensor, Tensor]:
        """(C_A, C_G), d × N each, with C Cᵀ equal to :meth:`averages` (``keep_rows`` only)."""
        assert self.keep_rows and self._input_parts and self._grad_parts
        c_a, c_g = self._scales(loss_reduction)
        return torch.cat(self._input_parts).T * c_a**0.5, torch.cat(self._grad_parts).T * c_g**0.5

    def clear(self) -> None:
        self.input_sum, self.input_rows = None, 0
        self.grad_sum, self._samples_by_group = None, {}
        self._input_parts: list[Tensor] = []
        self._grad_parts: list[Tensor] = []


class StatisticsCapture:
    """Installs and owns the hooks; decides nothing about when to capture.

    ``should_capture()`` is asked at every forward of a layer in training mode with grad
    enabled. ``capture_output_grads`` is read when the backward reaches a layer: the
    preconditioner clears it in "mc" mode so that the user's own backward adds nothing to G.
    ``root``, the model that holds the layers, delimits the sample groups of weight sharing
    (see the module docstring).
    """

    def __init__(
        self,
        modules: dict[str, SupportedLayer],
        should_capture: Callable[[], bool],
        timer: PhaseTimer | None = None,
        root: nn.Module | None = None,
    ) -> None:
        self.sums = {name: StatisticSums() for name in modules}
        self.timer = timer
        self.should_capture = should_capture
        self.capture_output_grads = True
        self._group = 0  # the current sample group
        self._model_depth = 0  # > 0 while the root model's forward runs
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._forward_hook(name)) for name, module in modules.items()
        ]
        if root is not None:
            self._handles += [
                root.register_forward_pre_hook(self._enter_model),
                root.register_forward_hook(self._leave_model, always_call=True),
            ]

    def _enter_model(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if self._model_depth == 0:
            self._group += 1
        self._model_depth += 1

    def _leave_model(self, module: nn.Module, inputs: tuple[Tensor, ...], output: object) -> None:
        self._model_depth -= 1

    def _sample_group(self) -> int:
        """The group of a layer call: the running model call, or a new group outside one."""
        if self._model_depth == 0:
            self._group += 1
        return self._group

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
                output.register_hook(self._output_grad_hook(layer, sums, samples, self._sample_group(), dtype))

        return hook

    def _output_grad_hook(
        self, layer: SupportedLayer, sums: StatisticSums, samples: int, group: int, dtype: torch.dtype
    ) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self.capture_output_grads:
                with torch.no_grad(), maybe_phase(self.timer, "statistics"):
                    sums.add_output_grads(layers.output_grad_rows(layer, grad.detach()).to(dtype), samples, group)

        return hook

    def clear(self) -> None:
        for sums in self.sums.values():
            sums.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
