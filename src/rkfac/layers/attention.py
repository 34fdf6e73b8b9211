"""``nn.MultiheadAttention``: its four projections preconditioned as four Linear layers.

Attention applies its weights through ``F.multi_head_attention_forward``, so no module hook sees
the projections' inputs or outputs. While rkfac is attached, the module's ``forward`` is routed
(in training with grad enabled; evaluation and ``no_grad`` keep the module's own forward and its
fast path) through :class:`ExplicitAttention`, the same computation written with four hookable
projection calls and ``F.scaled_dot_product_attention``::

    q, k, v = query Wqᵀ + bq, key Wkᵀ + bk, value Wvᵀ + bv       (N, L|S, E)
    heads   = softmax(q_h k_hᵀ / √(E/H) + mask) v_h                 per head h
    output  = concat(heads) Woᵀ + bo

Each projection is a Linear layer applied at every token (the tokens are shared positions, as
for an ``nn.Linear`` on a sequence), so its K-FAC block is exactly that of the equivalent model
written with ``nn.Linear`` layers: :class:`ProjectionKind` is a :class:`LinearKind` whose weight
is the projection's rows of the attention's parameters.

Three blocks for the packed ``in_proj_weight`` (3E × E), not one with G of size 3E: in cross
attention (and whenever ``kdim``/``vdim`` differ) q, k and v read different inputs, so a single
A cannot describe them, and three blocks are the same layout in every case; each G is E × E, so
decomposing the three costs a ninth of one 3E block. The cost: in self-attention the three A
factors are the same matrix, computed and decomposed three times.

``add_bias_kv`` and ``add_zero_attn`` are not routed (the attention is named unsupported and its
parameters get the plain or fallback step); the routed forward refuses nested tensors.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rkfac.layers.linear import LinearKind

ROLES = ("q_proj", "k_proj", "v_proj", "out_proj")


def routable(attention: nn.MultiheadAttention) -> str | None:
    """None if rkfac can route ``attention``; else why not (shown by ``describe()``)."""
    if attention.bias_k is not None:
        return "add_bias_kv=True is not supported"
    if attention.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


class Projection(nn.Module):
    """One projection of an attention module: ``F.linear`` with its rows of the parent's weights.

    Not registered in the model (no parameters of its own, absent from ``named_modules`` and the
    state dict); it exists so that the capture's forward hook sees the projection's input and
    output. Its ``training`` flag is the parent's.
    """

    def __init__(self, attention: nn.MultiheadAttention, role: str) -> None:
        super().__init__()
        # a weak reference: nn.Module would register a module attribute as a child, and a strong
        # one would keep the attention alive through the router cache (_ROUTERS)
        self._parent = weakref.ref(attention)
        self.role = role

    @property
    def training(self) -> bool:
        return self.attention.training

    @training.setter
    def training(self, value: bool) -> None:
        """Ignored: ``train()``/``eval()`` act on the parent."""

    @property
    def attention(self) -> nn.MultiheadAttention:
        attention = self._parent()
        assert attention is not None, "the attention module of this projection was deleted"
        return attention

    def weight_source(self) -> tuple[nn.Parameter, slice]:
        """The parameter holding this projection's weight, and its rows."""
        attention, embed = self.attention, self.attention.embed_dim
        if self.role == "out_proj":
            return cast(nn.Parameter, attention.out_proj.weight), slice(None)
        index = ROLES.index(self.role)
        if attention.in_proj_weight is not None:
            return attention.in_proj_weight, slice(index * embed, (index + 1) * embed)
        return getattr(attention, self.role + "_weight"), slice(None)

    def bias_source(self) -> tuple[nn.Parameter, slice] | None:
        attention, embed = self.attention, self.attention.embed_dim
        if self.role == "out_proj":
            bias = attention.out_proj.bias
            return None if bias is None else (bias, slice(None))
        if attention.in_proj_bias is None:
            return None
        index = ROLES.index(self.role)
        return attention.in_proj_bias, slice(index * embed, (index + 1) * embed)

    def forward(self, inputs: Tensor) -> Tensor:
        weight, rows = self.weight_source()
        bias = self.bias_source()
        return F.linear(inputs, weight[rows], None if bias is None else bias[0][bias[1]])


class ProjectionKind(LinearKind):
    """A :class:`Projection` as a Linear layer; gradients are its rows of the parent's ``.grad``."""

    label = "Attention projection"

    def __init__(self, module: nn.Module, router: ExplicitAttention) -> None:
        super().__init__(module)
        self.router = router

    def install(self) -> Callable[[], None] | None:
        return self.router.install()

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, Projection)

    @property
    def projection(self) -> Projection:
        return cast(Projection, self.module)

    @property
    def weight(self) -> nn.Parameter:
        param, rows = self.projection.weight_source()
        return cast(nn.Parameter, param[rows])

    @property
    def bias(self) -> nn.Parameter | None:
        source = self.projection.bias_source()
        return None if source is None else cast(nn.Parameter, source[0][source[1]])

    def batch_first(self, tensor: Tensor, batch_dim: int) -> Tensor:
        """The routed forward hands the projections batch-first inputs whatever the layout."""
        return tensor

    def parameters(self) -> list[nn.Parameter]:
        sources = [self.projection.weight_source(), self.projection.bias_source()]
        return [source[0] for source in sources if source is not None]

    def _grads(self) -> tuple[Tensor | None, Tensor | None]:
        """This projection's rows of the weight's and the bias's ``.grad`` (views; None if absent)."""
        param, rows = self.projection.weight_source()
        weight_grad = None if param.grad is None else param.grad[rows]
        source = self.projection.bias_source()
        bias_grad = None if source is None or source[0].grad is None else source[0].grad[source[1]]
        return weight_grad, bias_grad

    def gradients(self) -> list[Tensor]:
        return [grad for grad in self._grads() if grad is not None]

    def grad_matrix(self) -> Tensor | None:
        weight_grad, bias_grad = self._grads()
        if weight_grad is None:
            return None
        if not self.has_bias:
            return weight_grad
        bias = bias_grad if bias_grad is not None else weight_grad.new_zeros(weight_grad.shape[0])
        return torch.cat([weight_grad, bias.reshape(-1, 1)], dim=1)

    def set_grad_matrix(self, matrix: Tensor) -> None:
        weight_grad = self._grads()[0]
        if weight_grad is None:
            raise RuntimeError("set_grad_matrix needs the weight's gradient (grad_matrix returned None)")
        weight_grad.copy_(matrix[:, : weight_grad.shape[1]])
        source = self.projection.bias_source()
        if source is not None and source[0].requires_grad:
            if source[0].grad is None:
                source[0].grad = torch.zeros_like(source[0])
            source[0].grad[source[1]].copy_(matrix[:, -1])


def _additive(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    """A boolean mask (True: not attended) as 0 / -inf; a float mask as given."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


class ExplicitAttention:
    """The forward of one ``nn.MultiheadAttention`` through its four :class:`Projection` calls."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        reason = routable(attention)
        if reason is not None:
            raise ValueError(f"cannot route {attention!r}: {reason}")
        self._attention = weakref.ref(attention)  # weak: _ROUTERS maps the module to this router
        self.projections = {role: Projection(attention, role) for role in ROLES}
        self._installs = 0

    @property
    def attention(self) -> nn.MultiheadAttention:
        attention = self._attention()
        assert attention is not None, "the routed attention module was deleted"
        return attention

    def install(self) -> Callable[[], None]:
        """Route the attention's ``forward`` through :meth:`forward`; returns the undo."""
        if self._installs == 0:
            original = self.attention.forward

            def routed(*args: Any, **kwargs: Any) -> Any:
                if self.attention.training and torch.is_grad_enabled():
                    return self.forward(*args, **kwargs)
                return original(*args, **kwargs)

            self.attention.forward = routed  # type: ignore[method-assign]
        self._installs += 1
        undone = False

        def remove() -> None:
            nonlocal undone
            if not undone:
                undone = True
                self._installs -= 1
                if self._installs == 0:
                    del self.attention.forward  # the class's forward again

        return remove

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward``'s arguments and results (see its documentation)."""
        attention = self.attention
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("rkfac's routed MultiheadAttention does not take nested tensors")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not attention.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        heads, head_dim = attention.num_heads, attention.head_dim
        q = self.projections["q_proj"](query)
        k = self.projections["k_proj"](key)
        v = self.projections["v_proj"](value)
        n, length, source = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(n, t.shape[1], heads, head_dim).transpose(1, 2) for t in (q, k, v))
        mask = self._mask(attn_mask, key_padding_mask, q.dtype, n, length, source)
        causal = is_causal and key_padding_mask is None and not need_weights
        dropout = attention.dropout if attention.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            weights = F.dropout(weights, p=dropout) if dropout > 0.0 else weights
            heads_out = weights @ v
        else:
            heads_out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if causal else mask, dropout_p=dropout, is_causal=causal
            )
        output = self.projections["out_proj"](heads_out.transpose(1, 2).reshape(n, length, attention.embed_dim))
        if not batched:
            output = output.squeeze(0)
        elif not attention.batch_first:
            output = output.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        return output, weights

    def _mask(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, dtype: torch.dtype, n: int, length: int, source: int
    ) -> Tensor | None:
        """attn_mask ((L, S) or (N·H, L, S)) and key_padding_mask ((N, S)) as one additive
        (N or 1, H or 1, L, S) mask."""
        mask = _additive(attn_mask, dtype, "attn_mask")
        if mask is not None:
            mask = mask.reshape(1, 1, length, source) if mask.dim() == 2 else mask.reshape(n, -1, length, source)
        padding = _additive(key_padding_mask, dtype, "key_padding_mask")
        if padding is not None:
            padding = padding.reshape(n, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask


#: One router per attention module, shared by every preconditioner attached to it.
_ROUTERS: weakref.WeakKeyDictionary[nn.MultiheadAttention, ExplicitAttention] = weakref.WeakKeyDictionary()


def projection_kinds(name: str, attention: nn.MultiheadAttention) -> dict[str, ProjectionKind]:
    """``{qualified name: kind}`` of the four projections of a routable ``attention`` named ``name``:
    ``name.q_proj``, ``name.k_proj``, ``name.v_proj`` and ``name.out_proj`` (the real submodule's name)."""
    explicit = _ROUTERS.get(attention)
    if explicit is None:
        explicit = _ROUTERS[attention] = ExplicitAttention(attention)
    prefix = f"{name}." if name else ""
    return {prefix + role: ProjectionKind(module, explicit) for role, module in explicit.projections.items()}
