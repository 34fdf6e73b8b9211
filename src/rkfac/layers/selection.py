"""Which modules of a model a curvature method handles: supported kinds, skip rules, the rest named.

:data:`KINDS` lists the layer types rkfac has a :class:`~rkfac.layers.base.LayerKind` for; a new
type is added there. Listed means preconditioned, so three kinds of module are never selected:

- frozen layers (weight with ``requires_grad=False``): they have no gradient to precondition;
  :func:`frozen_layers` names them;
- layers a parent applies through a functional call, which the hooks never see: the
  ``out_proj`` Linear of an ``nn.MultiheadAttention`` rkfac cannot route (see below);
- skipped layers.

``nn.MultiheadAttention`` is not one layer but four projections (:mod:`.attention`): a routable
one contributes ``name.q_proj``, ``name.k_proj``, ``name.v_proj`` and ``name.out_proj``. Skip rules
apply to those names; the q, k and v rows of a packed ``in_proj_weight`` are skipped all together
or not at all (one parameter is in one group).

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

from rkfac.layers.attention import projection_kinds, routable
from rkfac.layers.base import LayerKind
from rkfac.layers.conv1d import Conv1dKind
from rkfac.layers.conv2d import Conv2dKind
from rkfac.layers.embedding import EmbeddingKind
from rkfac.layers.grouped_conv import GroupedConv1dKind, GroupedConv2dKind
from rkfac.layers.linear import LinearKind

#: The layer types rkfac preconditions, in the order they are tried.
KINDS: tuple[type[LayerKind], ...] = (LinearKind, Conv2dKind, Conv1dKind, GroupedConv2dKind, GroupedConv1dKind, EmbeddingKind)

SUPPORTED_TEXT = (
    "nn.Linear, nn.Conv1d and nn.Conv2d (grouped and depthwise too), nn.Embedding (sparse=False) and nn.MultiheadAttention"
)

SkipRule = str | type[nn.Module]

_NORMALIZATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


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
    modules += [
        (projection, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention) and routable(module) is None
        for projection in projection_kinds(name, module)
    ]
    return [rule for rule in rules if not any(is_skipped(name, module, [rule]) for name, module in modules)]


def _applied_functionally(model: nn.Module) -> set[int]:
    """ids of submodules whose weights a parent applies through a functional call: those of an
    attention module rkfac cannot route (a routed one calls them as hookable projections)."""
    return {
        id(child)
        for parent in model.modules()
        if isinstance(parent, nn.MultiheadAttention) and routable(parent) is not None
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


def _candidates(model: nn.Module, rules: list[SkipRule]) -> dict[str, LayerKind]:
    """``{qualified name: kind}`` of the supported, not skipped layers whose calls the hooks see
    (trainable or not), in model order; a routable attention module gives its four projections."""
    functional = _applied_functionally(model)
    found: dict[str, LayerKind] = {}
    for name, module in model.named_modules():
        if id(module) in functional or is_skipped(name, module, rules) or name in found:
            continue
        if isinstance(module, nn.MultiheadAttention) and routable(module) is None:
            projections = projection_kinds(name, module)
            found.update({p: kind for p, kind in projections.items() if not is_skipped(p, module, rules)})
            _check_packed_skip(name, module, [p for p in projections if p not in found], rules)
        elif (kind := kind_for(module)) is not None:
            found[name] = kind
    return found


def _check_packed_skip(name: str, attention: nn.MultiheadAttention, skipped: list[str], rules: list[SkipRule]) -> None:
    """Refuse rules that skip some of q, k, v of a packed ``in_proj_weight`` (one parameter)."""
    packed = [p for p in skipped if not p.endswith(".out_proj")]
    if attention.in_proj_weight is not None and 0 < len(packed) < 3:
        raise ValueError(
            f"skip rules {rules} skip {packed} but not all of the q, k and v projections of {display_name(name)}, "
            "whose rows share one in_proj_weight: skip all three or none"
        )


def select_layers(model: nn.Module, rules: list[SkipRule]) -> dict[str, LayerKind]:
    """``{qualified name: kind}`` of the supported, trainable, not skipped layers whose calls the
    hooks see, in model order."""
    return {name: kind for name, kind in _candidates(model, rules).items() if kind.weight.requires_grad}


def frozen_layers(model: nn.Module, rules: list[SkipRule]) -> list[str]:
    """Names of supported, not skipped layers left out because their weight is frozen."""
    return [name for name, kind in _candidates(model, rules).items() if not kind.weight.requires_grad]


def unsupported_layers(model: nn.Module, selected: dict[str, LayerKind], rules: list[SkipRule]) -> list[tuple[str, str]]:
    """(name, what) of modules with trainable parameters of their own that are not selected
    (normalisation and skipped layers left out), ``what`` saying why."""
    functional = _applied_functionally(model)
    covered = {id(p) for kind in selected.values() for p in kind.parameters()}
    found = []
    for name, module in model.named_modules():
        if name in selected or isinstance(module, _NORMALIZATION) or is_skipped(name, module, rules):
            continue
        if isinstance(module, nn.MultiheadAttention) and (reason := routable(module)) is not None:
            found.append((display_name(name), f"MultiheadAttention, {reason}"))
            continue
        if isinstance(module, nn.MultiheadAttention):  # routed: its parameters are its projections'
            projections = [p for p in projection_kinds(name, module) if not p.endswith(".out_proj")]
            own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in covered]
            if own and not any(is_skipped(p, module, rules) for p in projections):
                found.append((display_name(name), "MultiheadAttention, frozen weight with a trainable bias"))
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
