"""The one set of removable hooks that K-FAC, B-KFAC and SENG capture layer data through.

A forward hook on each layer hands the detached input to a :class:`CaptureSink` and registers
a hook on the output tensor that hands over the output gradient when the backward reaches it.
The sink decides what to keep (K-FAC: Gram products of the rows; SENG: per-sample gradients)
and when to capture at all (``capturing()``, asked at every forward of a layer in training mode
with grad enabled).

Why a hook on the output tensor rather than ``register_full_backward_hook``: the full backward
hook wraps the output in a custom autograd function, which breaks a following in-place
activation (``nn.ReLU(inplace=True)``). A tensor hook registered before the in-place change
receives the gradient of the tensor as the layer produced it, which is what both methods need.

Sample groups (weight sharing). A layer called several times in one forward (``y = fc(fc(x))``)
contributes the rows of every call, and its n samples count once: the calls are treated like
the positions of a convolution (KFC), or the time steps of K-FAC for RNNs (Martens, Ba & Ando
2018), "K-FAC-expand" in Eschenhagen et al. (2023). Calls "in one forward" are the layer calls
made while ``root`` (the model) runs its forward: a forward pre-hook on the model starts a new
group, and every layer call inside it belongs to that group. Each micro-batch of gradient
accumulation is its own model call and so its own group; a layer called directly, outside the
model (or with no ``root``), is a group of its own. Each output gradient arrives with its
:class:`Call` (samples n and group), so the sink can count n once per group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rkfac.layers.base import LayerKind


@dataclass(frozen=True)
class Call:
    """One call of a layer whose output gradient is awaited."""

    samples: int  # n: the first dimension of the call's input
    group: int  # the sample group (one model forward)
    context: Any  # what the sink's ``on_input`` returned for this call


class CaptureSink(Protocol):
    """What a curvature method does with the captured data."""

    def capturing(self) -> bool:
        """Whether to capture the current forward (e.g. only on factor-update steps)."""
        ...

    def on_input(self, name: str, layer: LayerKind, inputs: Tensor) -> Any:
        """A layer's detached input; the value returned comes back with the output gradient."""
        ...

    def on_output_grad(self, name: str, layer: LayerKind, grad: Tensor, call: Call) -> None:
        """The detached gradient of the loss w.r.t. the output of the ``call``."""
        ...


class LayerCapture:
    """Installs and owns the hooks on ``layers`` (and on ``root`` for the sample groups)."""

    def __init__(
        self, layers: dict[str, LayerKind], sink: CaptureSink, root: nn.Module | None = None, batch_dim: int = 0
    ) -> None:
        self.sink = sink
        self.batch_dim = batch_dim  # where the samples are in inputs with shared dimensions
        self._group = 0  # the current sample group
        self._model_depth = 0  # > 0 while the root model's forward runs
        self._handles: list[RemovableHandle] = [
            layer.module.register_forward_hook(self._forward_hook(name, layer)) for name, layer in layers.items()
        ]
        self._undo = [undo for layer in layers.values() if (undo := layer.install()) is not None]
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

    def _forward_hook(self, name: str, layer: LayerKind) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        sink = self.sink

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not (module.training and torch.is_grad_enabled() and sink.capturing()):
                return
            x = inputs[0].detach()
            samples = layer.samples(x, self.batch_dim)
            context = sink.on_input(name, layer, x)
            if output.requires_grad:
                call = Call(samples, self._sample_group(), context)
                output.register_hook(lambda grad: sink.on_output_grad(name, layer, grad.detach(), call))

        return hook

    def remove(self) -> None:
        """Take every hook off; nothing is captured afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for undo in self._undo:
            undo()
        self._undo.clear()
