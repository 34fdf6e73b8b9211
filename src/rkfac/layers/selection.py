"""Which modules of a model a curvature method handles: supported kinds, skip rules, the rest named.

:data:`KINDS` lists the layer types rkfac has a :class:`~rkfac.layers.base.LayerKind` for; a new
type is added there. Listed means preconditioned, so three kinds of module are never selected:

- frozen layers (weight with ``requires_grad=False``): they have no gradient to precondition;
  :func:`frozen_layers` names them;
- layers a parent applies through a functional call, which the hooks never see: the
  ``out_proj`` Linear of ``nn.MultiheadAttention`` (attention calls ``F.linear`` with its weight);
- skipped layers.

``skip`` rules are ``nn.Module`` types or glob patterns (``fnmatch``, case-sensitive) on qualified
module names. A pattern skips a module when it matches the module's name or the name of one of
its parents, and a pattern ending in ``.*`` also matches the module it names: ``"classifier.*"``
and ``"classifier"`` both skip a Linear named ``classifier`` and everything inside a module of
that name. The root module's name is empty; messages call it ``<root>``.

Modules that hold trainable parameters of their own but are not selected (nor skipped, nor
normalisation layers, whose plain gradient is the standard choice) are returned by
:func:`unsupported_layers` with the reason, so that a parameter rkfac does not handle is always
named.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from rkfac.layers.base import LayerKind
from rkfac.layers.conv1d import Conv1dKind
from rkfac.layers.conv2d import Conv2dKind
from rkfac.layers.embedding import EmbeddingKind
from rkfac.layers.grouped_conv import GroupedConv1dKind, GroupedConv2dKind
from rkfac.layers.linear import LinearKind

#: The layer types rkfac preconditions, in the order they are tried.
KINDS: tuple[type[LayerKind], ...] = (LinearKind, Conv2dKind, Conv1dKind, GroupedConv2dKind, GroupedConv1dKind, EmbeddingKind)

SUPPORTED_TEXT = "nn.Linear, nn.Conv1d and nn.Conv2d (grouped and depthwise too) and nn.Embedding (sparse=False)"

SkipRule = str | type[nn.Module]

_NORMALIZATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)

#: Parents that apply their submodules' weights through functional calls (no hooks fire).
_FUNCTIONAL_PARENTS = (nn.MultiheadAttention,)

ROOT_NAME = "<root>"


def display_name(name: str) -> str:
    """A qualified module name as messages show it (the root's is empty)."""
    return name or ROOT_NAME


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


def _pattern_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` names ``name`` or one of its parents (see the module docstring)."""
    parts = name.split(".") if name else []
    names = {".".join(parts[:end]) for end in range(1, len(parts) + 1)} or {""}
    patterns = [pattern] + ([pattern[:-2]] if pattern.endswith(".*") else [])
    return any(fnmatch.fnmatchcase(candidate, p) for candidate in names for p in patterns)


def is_skipped(name: str, module: nn.Module, rules: list[SkipRule]) -> bool:
    for rule in rules:
        if isinstance(rule, str) and _pattern_matches(rule, name):
            return True
        if isinstance(rule, type) and isinstance(module, rule):
            return True
    return False


def unmatched_rules(model: nn.Module, rules: list[SkipRule]) -> list[SkipRule]:
    """The rules that skip no module of ``model`` (likely a typo)."""
    modules = list(model.named_modules())
    return [rule for rule in rules if not any(is_skipped(name, module, [rule]) for name, module in modules)]


def _applied_functionally(model: nn.Module) -> set[int]:
    """ids of submodules whose weights a parent applies through a functional call."""
    return {
        id(child)
        for parent in model.modules()
        if isinstance(parent, _FUNCTIONAL_PARENTS)
        for child in parent.modules()
        if child is not parent
    }


def check_model(model: object, owner: str) -> nn.Module:
    """``model`` if it is an ``nn.Module``; the torch.optim habit of passing parameters is refused."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{owner} takes the model (an nn.Module), not {type(model).__name__}: it hooks the model's layers "
            "to capture their inputs and output gradients, so it needs the modules, e.g. rkfac.KFAC(model, lr=0.1)"
        )
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and/or ``torch.compile`` (its ``_orig_mod``), so that
    layer names, and so state dicts, are those of the plain model whichever wrappers it has."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]  # torch.compile's wrapper (not imported: torch._dynamo is slow to load)
        else:
            return model


def select_layers(model: nn.Module, rules: list[SkipRule]) -> dict[str, LayerKind]:
    """``{qualified name: kind}`` of the supported, trainable, not skipped layers whose calls the
    hooks see, in model order."""
    functional = _applied_functionally(model)
    selected = {}
    for name, module in model.named_modules():
        if id(module) in functional or is_skipped(name, module, rules):
            continue
        kind = kind_for(module)
        if kind is not None and kind.weight.requires_grad:
            selected[name] = kind
    return selected


def frozen_layers(model: nn.Module, rules: list[SkipRule]) -> list[str]:
    """Names of supported, not skipped layers left out because their weight is frozen."""
    return [
        name
        for name, module in model.named_modules()
        if (kind := kind_for(module)) is not None and not kind.weight.requires_grad and not is_skipped(name, module, rules)
    ]


def unsupported_layers(model: nn.Module, selected: dict[str, LayerKind], rules: list[SkipRule]) -> list[tuple[str, str]]:
    """(name, what) of modules with trainable parameters of their own that are not selected
    (normalisation and skipped layers left out), ``what`` saying why."""
    functional = _applied_functionally(model)
    found = []
    for name, module in model.named_modules():
        if name in selected or isinstance(module, _NORMALIZATION) or is_skipped(name, module, rules):
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            label = type(module).__name__
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
                label += f" groups={module.groups}"
            if isinstance(module, nn.Embedding) and module.sparse:
                label += " sparse=True (its gradient is a sparse tensor; use sparse=False)"
            if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                label += " scale_grad_by_freq=True (its gradient is rescaled per token, unlike the statistics)"
            if id(module) in functional:
                label += ", applied by its parent through a functional call that hooks do not see"
            elif kind_for(module) is not None:
                label += ", frozen weight with a trainable bias"
            found.append((display_name(name), label))
    return found
