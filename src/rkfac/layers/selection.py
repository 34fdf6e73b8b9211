"""Which modules of a model a curvature method handles: supported kinds, skip rules, the rest named.

:data:`KINDS` lists the layer types rkfac has a :class:`~rkfac.layers.base.LayerKind` for; a new
type is added there. ``skip`` rules are glob patterns matched against the qualified module name
(``fnmatch``, case-sensitive, the whole name) or ``nn.Module`` types. Layers that hold trainable
parameters but that no kind accepts are returned by name so that the caller can say so (a
parameter rkfac does not handle is always named); normalisation layers are left out of that list,
as their plain gradient is the standard choice.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from rkfac.layers.base import LayerKind
from rkfac.layers.conv2d import Conv2dKind
from rkfac.layers.linear import LinearKind

#: The layer types rkfac preconditions, in the order they are tried.
KINDS: tuple[type[LayerKind], ...] = (LinearKind, Conv2dKind)

SUPPORTED_TEXT = "nn.Linear or nn.Conv2d (groups=1)"

SkipRule = str | type[nn.Module]

_NORMALIZATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def kind_for(module: nn.Module) -> LayerKind | None:
    """The :class:`LayerKind` wrapping ``module``, or None when rkfac does not handle its type."""
    for kind in KINDS:
        if kind.accepts(module):
            return kind(module)
    return None


def is_supported(module: nn.Module) -> bool:
    return any(kind.accepts(module) for kind in KINDS)


def skip_rules(skip: Iterable[SkipRule] | SkipRule) -> list[SkipRule]:
    """The rules as a list (one rule may be given alone), each checked."""
    rules = [skip] if isinstance(skip, (str, type)) else list(skip)
    for rule in rules:
        if not (isinstance(rule, str) or (isinstance(rule, type) and issubclass(rule, nn.Module))):
            raise ValueError(f"skip entries must be name patterns (str) or nn.Module types, got {rule!r}")
    return rules


def is_skipped(name: str, module: nn.Module, rules: list[SkipRule]) -> bool:
    for rule in rules:
        if isinstance(rule, str) and fnmatch.fnmatchcase(name, rule):
            return True
        if isinstance(rule, type) and isinstance(module, rule):
            return True
    return False


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel, so that layer names match the unwrapped model."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def select_layers(model: nn.Module, rules: list[SkipRule], *, trainable_only: bool = False) -> dict[str, LayerKind]:
    """``{qualified name: kind}`` of the supported, not skipped layers, in model order."""
    selected = {}
    for name, module in model.named_modules():
        if is_skipped(name, module, rules):
            continue
        kind = kind_for(module)
        if kind is not None and (kind.weight.requires_grad or not trainable_only):
            selected[name] = kind
    return selected


def unsupported_layers(model: nn.Module, selected: dict[str, LayerKind], rules: list[SkipRule]) -> list[tuple[str, str]]:
    """(name, type) of layers with trainable weights that no kind handles (normalisation and
    skipped layers left out)."""
    found = []
    for name, module in model.named_modules():
        if name in selected or isinstance(module, _NORMALIZATION) or is_skipped(name, module, rules):
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            label = type(module).__name__
            if isinstance(module, nn.Conv2d):
                label += f" groups={module.groups}"
            found.append((name, label))
    return found
