"""Per-layer state of the K-FAC preconditioner, its read-only public view, and its versioned state_dict.

A :class:`LayerState` is one preconditioned layer: its name, its index (which keys its random
sketches), its :class:`~rkfac.layers.LayerKind` and one :class:`~rkfac.kfac.trackers.FactorTracker`
per factor (A, then G). Code outside the preconditioner (``rkfac.spectrum``, the benchmarks) reads
layers through :class:`LayerView`, never through the preconditioner's private state.

state_dict format, version 2::

    {"version": 2, "steps": int, "health": {...}, "mc_generator": ByteTensor | None,
     "layers": {name: {"A": {"factor", "pairs", "online"}, "G": {...}}}}

Version 1 (before the trackers; checkpoints written by rkfac 0.1 before issue 16) kept
``{"factors": {"A": F}, "eigen": {"A": {...}}, "online": {"A": bool}}`` per layer; it is
converted on load. Anything else is refused with a message that says what was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import Tensor, nn

from rkfac.kfac.trackers import FactorTracker
from rkfac.layers import LayerKind
from rkfac.lowrank import FactorInverse

STATE_VERSION = 2


class Factor(Enum):
    """The two Kronecker factors of a layer, in the order trackers are kept."""

    A = 0  # input side
    G = 1  # output-gradient side


@dataclass
class LayerState:
    name: str
    index: int
    kind: LayerKind
    trackers: tuple[FactorTracker, FactorTracker]  # (A, G)

    def pairs(self) -> tuple[FactorInverse, FactorInverse] | None:
        """(A pairs, G pairs) when both factors have a decomposition, else None."""
        a, g = self.trackers[0].pairs, self.trackers[1].pairs
        return None if a is None or g is None else (a, g)


@dataclass(frozen=True)
class FactorView:
    """One factor as the preconditioner holds it now (tensors are live: read, do not modify)."""

    dim: int
    factor: Tensor | None  # the dense average; None before the first statistic or when not kept (B-KFAC)
    pairs: FactorInverse | None  # the decomposition in use (a DiagonalFactor for a diagonal factor)
    online: bool  # updated by Brand's update rather than decomposed


@dataclass(frozen=True)
class LayerView:
    """One preconditioned layer: its module, kind and both factors."""

    name: str
    kind: LayerKind
    a: FactorView
    g: FactorView

    @property
    def module(self) -> nn.Module:
        return self.kind.module


def view(layer: LayerState) -> LayerView:
    dims = layer.kind.factor_dims
    a, g = (FactorView(dim, t.factor, t.pairs, t.online) for dim, t in zip(dims, layer.trackers, strict=True))
    return LayerView(layer.name, layer.kind, a, g)


def layers_state_dict(layers: list[LayerState]) -> dict[str, Any]:
    return {layer.name: {f.name: layer.trackers[f.value].state_dict() for f in Factor} for layer in layers}


def load_layers(layers: list[LayerState], state: dict[str, Any]) -> None:
    """Restore :func:`layers_state_dict` output (any supported version) into ``layers``."""
    saved_layers = _migrated(state)
    names = set(saved_layers)
    if names != {layer.name for layer in layers}:
        raise ValueError(f"state_dict layers {sorted(names)} do not match this preconditioner's {[la.name for la in layers]}")
    for layer in layers:
        device = layer.kind.weight.device
        for f, dim in zip(Factor, layer.kind.factor_dims, strict=True):
            saved = saved_layers[layer.name][f.name]
            factor = saved.get("factor")
            tracker = layer.trackers[f.value]
            expected = layer.kind.block_shape + tracker.factor_shape(dim)
            if factor is not None and tuple(factor.shape) != expected:
                raise ValueError(f"factor {f.name} of layer {layer.name!r} has shape {tuple(factor.shape)}, expected {expected}")
            tracker.load_state_dict(saved, device)


def saved_factors(state: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer: (A, G)}`` of the layers that kept both dense d × d factors in a saved ``state_dict``
    (any supported version): for reading a checkpoint without building the model. A diagonal
    factor (an embedding's A, saved as a vector) and block factors (a grouped convolution's
    (B, d, d) stacks) are left out with their layer."""
    found = {}
    for name, saved in _migrated(state).items():
        a, g = saved["A"].get("factor"), saved["G"].get("factor")
        if a is not None and g is not None and a.dim() == 2:
            found[name] = (a, g)
    return found


def _migrated(state: dict[str, Any]) -> dict[str, Any]:
    version = state.get("version", 1)
    if version == STATE_VERSION:
        return dict(state["layers"])
    if version != 1:
        raise ValueError(f"state_dict has version {version!r}; this rkfac reads versions 1 and {STATE_VERSION}")
    return {
        name: {
            f.name: {
                "factor": saved.get("factors", {}).get(f.name),
                "pairs": saved.get("eigen", {}).get(f.name),
                "online": saved.get("online", {}).get(f.name),
            }
            for f in Factor
        }
        for name, saved in state.get("layers", {}).items()
    }
