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

Under ``torch.compile`` (issue 18). Dynamo traces the hooks into the model's graph, and the
eager hooks cannot be traced without graph breaks: the sinks mutate Python state (sums, pieces),
their statistics code asks for what a graph cannot hold (``storage_offset``), the group counter
would be baked into the graph as a constant (a recompilation at every forward), and a tensor
hook on an intermediate is traced as a subgraph that may not mutate anything (it also makes
dynamo drop the model's later Python side effects, a torch bug). So while dynamo traces
(``torch.compiler.is_compiling()``), the hooks put opaque operators (``torch.library.custom_op``)
into the graph instead, and the eager code runs inside them, on real tensors, when the compiled
model runs:

- ``rkfac::enter_model`` / ``rkfac::leave_model`` on the model: the sample group bookkeeping;
- ``rkfac::take_input`` on each layer: asks ``capturing()``, calls ``on_input`` and returns a
  ticket, a scalar tensor naming the :class:`Call` that the capture keeps (-1: none awaited);
- ``rkfac::take_output_grad`` in the backward: ``on_output_grad`` with the ticket's call.

The output gradient reaches the last through :class:`_HandOver`, an identity autograd function
on the layer output that marks it dirty, as an in-place operation does: no copy and no view,
so a following in-place activation still works, and its backward receives the gradient of the
output as the layer produced it, like the eager tensor hook. The operators are registered as
ordered side effects: the compiler neither removes them (they return nothing the model uses)
nor reorders them. They hand the sink copies of the input and the gradient, because compiled
code may reuse a buffer once an operator has returned. A call's ticket is kept until
:meth:`LayerCapture.forget_awaiting` (every preconditioner step), so that, as in eager mode, a
forward whose gradient does not come before the step adds nothing and a second backward through
a kept graph adds its gradient again. The eager path is unchanged, and so are eager numbers; the
compiled "eager" and "aot_eager" backends give them bitwise, inductor to rounding. Where torch
lacks ``custom_op`` or the effect registration (older versions), the eager hooks are traced, with
their graph breaks.
"""

from __future__ import annotations

import itertools
import weakref
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
        self._layers = list(layers.items())
        self._key = next(_keys)  # how the compiled-graph operators find this capture
        self._tickets = itertools.count()
        self._awaiting: dict[int, tuple[int, Call]] = {}  # ticket → (layer index, call), compiled models only
        _captures[self._key] = self
        self._handles: list[RemovableHandle] = [
            layer.module.register_forward_hook(self._forward_hook(index, name, layer))
            for index, (name, layer) in enumerate(self._layers)
        ]
        self._undo = [undo for layer in layers.values() if (undo := layer.install()) is not None]
        if root is not None:
            self._handles += [
                root.register_forward_pre_hook(self._enter_model),
                root.register_forward_hook(self._leave_model, always_call=True),
            ]

    def _enter_model(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if _compiling():
            torch.ops.rkfac.enter_model(self._key)
        else:
            self._enter()

    def _leave_model(self, module: nn.Module, inputs: tuple[Tensor, ...], output: object) -> None:
        if _compiling():
            torch.ops.rkfac.leave_model(self._key)
        else:
            self._leave()

    def _enter(self) -> None:
        if self._model_depth == 0:
            self._group += 1
        self._model_depth += 1

    def _leave(self) -> None:
        self._model_depth -= 1

    def _sample_group(self) -> int:
        """The group of a layer call: the running model call, or a new group outside one."""
        if self._model_depth == 0:
            self._group += 1
        return self._group

    def _forward_hook(
        self, index: int, name: str, layer: LayerKind
    ) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor | None]:
        sink = self.sink

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if not (module.training and torch.is_grad_enabled()):
                return None
            if _compiling():
                return self._traced_capture(index, inputs[0], output)
            if not sink.capturing():
                return None
            x = inputs[0].detach()
            samples = layer.samples(x, self.batch_dim)
            context = sink.on_input(name, layer, x)
            if output.requires_grad:
                call = Call(samples, self._sample_group(), context)
                output.register_hook(lambda grad: sink.on_output_grad(name, layer, grad.detach(), call))
            return None

        return hook

    # -- under torch.compile (see the module docstring) ------------------------------------

    def _traced_capture(self, index: int, inputs: Tensor, output: Tensor) -> Tensor | None:
        """What the forward hook puts into the graph; the returned output replaces the layer's."""
        awaits_grad = output.requires_grad
        ticket = torch.ops.rkfac.take_input(inputs.detach(), self._key, index, awaits_grad)
        return _HandOver.apply(output, ticket, self._key) if awaits_grad else None

    def _take_input(self, index: int, inputs: Tensor, awaits_grad: bool) -> int:
        """The eager hook's work, run by ``rkfac::take_input``: the ticket of the call, or -1."""
        if not self.sink.capturing():
            return -1
        name, layer = self._layers[index]
        x = inputs.clone()
        samples = layer.samples(x, self.batch_dim)
        context = self.sink.on_input(name, layer, x)
        if not awaits_grad:
            return -1
        ticket = next(self._tickets)
        self._awaiting[ticket] = (index, Call(samples, self._sample_group(), context))
        return ticket

    def _take_output_grad(self, ticket: int, grad: Tensor) -> None:
        """The eager tensor hook's work, run by ``rkfac::take_output_grad``."""
        awaited = self._awaiting.get(ticket)
        if awaited is None:  # nothing captured, or forgotten at a step
            return
        index, call = awaited
        name, layer = self._layers[index]
        self.sink.on_output_grad(name, layer, grad.detach().clone(), call)

    def forget_awaiting(self) -> None:
        """Drop the calls of a compiled model still awaiting their output gradient (at each step)."""
        self._awaiting.clear()

    def remove(self) -> None:
        """Take every hook off; nothing is captured afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for undo in self._undo:
            undo()
        self._undo.clear()
        _captures.pop(self._key, None)  # a graph compiled with the hooks finds nothing to run
        self._awaiting.clear()


_keys = itertools.count()
_captures: weakref.WeakValueDictionary[int, LayerCapture] = weakref.WeakValueDictionary()


def _define_operators() -> bool:
    """Define the capture operators (module docstring); False where this torch cannot."""
    register_effect = getattr(torch.library, "_register_effectful_op", None)
    try:
        from torch._library.effects import EffectType
    except ImportError:
        return False
    if not hasattr(torch.library, "custom_op") or register_effect is None:
        return False

    def enter_model(key: int) -> None:
        capture = _captures.get(key)
        if capture is not None:
            capture._enter()

    def leave_model(key: int) -> None:
        capture = _captures.get(key)
        if capture is not None:
            capture._leave()

    def take_input(inputs: Tensor, key: int, index: int, awaits_grad: bool) -> Tensor:
        capture = _captures.get(key)
        ticket = -1 if capture is None else capture._take_input(index, inputs, awaits_grad)
        return torch.tensor(ticket, dtype=torch.int64)

    def take_input_fake(inputs: Tensor, key: int, index: int, awaits_grad: bool) -> Tensor:
        return torch.empty((), dtype=torch.int64)

    def nothing(*args: object) -> None:  # what the others return at trace time
        return None

    def take_output_grad(grad: Tensor, ticket: Tensor, key: int) -> None:
        capture = _captures.get(key)
        if capture is not None:
            capture._take_output_grad(int(ticket), grad)

    operators: list[tuple[str, Callable[..., object], str]] = [
        ("enter_model", enter_model, "(int key) -> ()"),
        ("leave_model", leave_model, "(int key) -> ()"),
        ("take_input", take_input, "(Tensor inputs, int key, int index, bool awaits_grad) -> Tensor"),
        ("take_output_grad", take_output_grad, "(Tensor grad, Tensor ticket, int key) -> ()"),
    ]
    for name, fn, schema in operators:
        op = torch.library.custom_op(f"rkfac::{name}", fn, mutates_args=(), schema=schema)
        register_effect(f"rkfac::{name}", EffectType.ORDERED)  # kept although it returns nothing used, and in order
        op.register_fake(take_input_fake if name == "take_input" else nothing)
    return True


_compiling: Callable[[], bool] = torch.compiler.is_compiling if _define_operators() else lambda: False


class _HandOver(torch.autograd.Function):
    """The identity on a layer output whose backward hands the output gradient to the capture.

    The output is marked dirty, as by an in-place operation, rather than returned as a view or
    a copy: a view would break a following in-place activation, and a copy would cost one.
    """

    @staticmethod
    def forward(ctx: Any, output: Tensor, ticket: Tensor, key: int) -> Tensor:
        ctx.mark_dirty(output)
        ctx.save_for_backward(ticket)
        ctx.key = key
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (ticket,) = ctx.saved_tensors
        torch.ops.rkfac.take_output_grad(grad, ticket, ctx.key)
        return grad, None, None
