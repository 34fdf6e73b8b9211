"""nn.MultiheadAttention: the routed forward equals the module's own, and K-FAC treats its four
projections exactly as the equivalent model written with nn.Linear layers and
``F.scaled_dot_product_attention`` (same factors, same preconditioned gradients, float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac
from rkfac.layers.attention import ExplicitAttention

DTYPE = torch.float64
E, HEADS, N, L, S = 8, 2, 5, 4, 6


def attention(
    batch_first: bool = True, bias: bool = True, kdim: int | None = None, vdim: int | None = None
) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    module = nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first, kdim=kdim, vdim=vdim).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)  # biases are zero-initialised; make every term count
    return module


def inputs(batch_first: bool, kdim: int = E, vdim: int = E, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def make(length: int, width: int) -> Tensor:
        x = torch.randn(N, length, width, generator=generator, dtype=DTYPE)
        return x if batch_first else x.transpose(0, 1)

    return make(L, E), make(S, kdim), make(S, vdim)


MASKS = {
    "none": {},
    "bool attn_mask": {"attn_mask": torch.rand(L, S, generator=torch.Generator().manual_seed(2)) > 0.7},
    "float attn_mask, 3-d": {"attn_mask": torch.randn(N * HEADS, L, S, generator=torch.Generator().manual_seed(3), dtype=DTYPE)},
    "key_padding_mask": {"key_padding_mask": torch.tensor([[False] * (S - i) + [True] * i for i in range(N)])},
    "both": {
        "attn_mask": torch.arange(S).expand(L, S) == torch.arange(L).unsqueeze(1),  # no row fully masked
        "key_padding_mask": torch.tensor([[False] * (S - i) + [True] * i for i in range(N)]),
    },
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize(("batch_first", "bias", "kdim"), [(True, True, None), (False, False, None), (True, True, 3)])
def test_routed_forward_equals_the_modules_own(
    mask: str, need_weights: bool, batch_first: bool, bias: bool, kdim: int | None
) -> None:
    module = attention(batch_first, bias, kdim, kdim)
    q, k, v = inputs(batch_first, kdim or E, kdim or E)
    kwargs = {"need_weights": need_weights, **MASKS[mask]}
    expected, expected_weights = module(q, k, v, **kwargs)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    output, weights = ExplicitAttention(module).forward(q, k, v, **kwargs)
    output.sum().backward()
    torch.testing.assert_close(output, expected)
    if need_weights:
        torch.testing.assert_close(weights, expected_weights)
    else:
        assert weights is None
    for p, grad in zip(module.parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad, grad)


def test_routed_forward_takes_unbatched_inputs_causal_masks_and_per_head_weights() -> None:
    module = attention()
    q, k, v = (t[0] for t in inputs(True))
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=DTYPE)[:, :L]
    explicit = ExplicitAttention(module)
    for kwargs in ({}, {"attn_mask": causal[:, :S] if S == L else torch.zeros(L, S, dtype=DTYPE), "is_causal": False}):
        torch.testing.assert_close(explicit.forward(q, k, v, **kwargs)[0], module(q, k, v, **kwargs)[0])
    x = inputs(True)[0]
    square = nn.Transformer.generate_square_subsequent_mask(L, dtype=DTYPE)
    for need_weights in (False, True):
        got = explicit.forward(x, x, x, attn_mask=square, is_causal=True, need_weights=need_weights)[0]
        torch.testing.assert_close(got, module(x, x, x, attn_mask=square, is_causal=True, need_weights=need_weights)[0])
    per_head = explicit.forward(x, x, x, average_attn_weights=False)[1]
    torch.testing.assert_close(per_head, module(x, x, x, average_attn_weights=False)[1])
    with pytest.raises(RuntimeError, match="is_causal"):
        explicit.forward(x, x, x, is_causal=True)


class ExplicitCrossAttention(nn.Module):
    """The reference: attention written with four nn.Linear layers and F.scaled_dot_product_attention."""

    def __init__(self, module: nn.MultiheadAttention) -> None:
        super().__init__()
        kdim, vdim, bias = module.kdim, module.vdim, module.in_proj_bias is not None
        self.q, self.k, self.v = (nn.Linear(width, E, bias=bias).double() for width in (E, kdim, vdim))
        self.out = nn.Linear(E, E, bias=module.out_proj.bias is not None).double()
        with torch.no_grad():
            weights = (
                module.in_proj_weight.chunk(3)
                if module.in_proj_weight is not None
                else (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            )
            for linear, weight, index in zip((self.q, self.k, self.v), weights, range(3), strict=True):
                linear.weight.copy_(weight)
                if bias:
                    linear.bias.copy_(module.in_proj_bias[index * E : (index + 1) * E])
            self.out.load_state_dict(module.out_proj.state_dict())
        self.batch_first = module.batch_first

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        projected = (self.q(query), self.k(key), self.v(value))  # in the given layout (batch_dim says where n is)
        if not self.batch_first:
            projected = tuple(t.transpose(0, 1) for t in projected)
        q, k, v = (t.unflatten(-1, (HEADS, E // HEADS)).transpose(1, 2) for t in projected)
        heads = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out(heads if self.batch_first else heads.transpose(0, 1))


class Head(nn.Module):
    """Attention then a Linear read-out, so the loss is not linear in the attention output."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention, self.readout = attention, nn.Linear(E, 3).double()

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        out = self.attention(query, key, value)
        out = out[0] if isinstance(out, tuple) else out
        return self.readout(torch.tanh(out)).flatten(0, -2)


@pytest.mark.parametrize(
    ("batch_first", "bias", "kdim"), [(True, True, None), (False, True, None), (True, False, 3), (True, True, 5)]
)
@pytest.mark.parametrize("method", ["kfac", "seng"])
def test_projections_get_the_factors_and_directions_of_the_explicit_linear_model(
    batch_first: bool, bias: bool, kdim: int | None, method: str
) -> None:
    module = attention(batch_first, bias, kdim, kdim)
    routed, reference = Head(module), Head(ExplicitCrossAttention(module))
    reference.readout.load_state_dict(routed.readout.state_dict())
    batch_dim = 0 if batch_first else 1
    if method == "kfac":
        options = {"factor_every": 1, "clip": None, "decomposition": rkfac.ExactEigh(), "batch_dim": batch_dim}
        make = rkfac.KFACPreconditioner
    else:
        options, make = {"update_freq": 1, "sketch_threshold": 1e9, "batch_dim": batch_dim}, rkfac.SENGPreconditioner
    pre, ref = make(routed, **options), make(reference, **options)
    names = {"attention.q_proj": "attention.q", "attention.k_proj": "attention.k", "attention.v_proj": "attention.v"}
    names |= {"attention.out_proj": "attention.out", "readout": "readout"}
    assert pre.layer_names == list(names) and ref.layer_names == list(names.values())
    q, k, v = inputs(batch_first, kdim or E, kdim or E)
    y = torch.randint(0, 3, (N * L,), generator=torch.Generator().manual_seed(5))
    q, k, v = (q, q, q) if kdim is None else (q, k, v)  # self-attention when the widths allow it
    for model in (routed, reference):
        F.cross_entropy(model(q, k, v), y).backward()
    pre.step()
    ref.step()
    factors, expected = (pre.factors(), ref.factors()) if method == "kfac" else ({}, {})
    for name, ref_name in names.items() if method == "kfac" else ():
        for got, want in zip(factors[name], expected[ref_name], strict=True):
            torch.testing.assert_close(got, want)
    in_grad = module.in_proj_weight.grad if module.in_proj_weight is not None else None
    for index, linear in enumerate((reference.attention.q, reference.attention.k, reference.attention.v)):
        weight_grad = (
            in_grad[index * E : (index + 1) * E]
            if in_grad is not None
            else getattr(module, ("q", "k", "v")[index] + "_proj_weight").grad
        )
        torch.testing.assert_close(weight_grad, linear.weight.grad)
        if bias:
            torch.testing.assert_close(module.in_proj_bias.grad[index * E : (index + 1) * E], linear.bias.grad)
    torch.testing.assert_close(module.out_proj.weight.grad, reference.attention.out.weight.grad)


def test_the_forward_is_routed_only_while_attached_and_only_in_training_with_grad() -> None:
    module = attention()
    model = Head(module)
    x = inputs(True)[0]
    pre = rkfac.KFACPreconditioner(model, factor_every=1)
    assert "forward" in vars(module)
    model.eval()
    with torch.no_grad():
        plain = nn.MultiheadAttention.forward(module, x, x, x)[0]
        torch.testing.assert_close(module(x, x, x)[0], plain, rtol=0, atol=0)  # the module's own forward, bitwise
    pre.remove()
    assert "forward" not in vars(module)


def transformer(norm_first: bool = True, batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(L * E, 3)).double()


def test_a_transformer_encoder_has_every_parameter_in_a_group_and_its_attention_preconditioned() -> None:
    model = transformer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: every listed layer gets statistics
        opt = rkfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1)
        groups = opt.groups()
        named = {name for name, p in model.named_parameters()}
        assert sorted(n for names in groups.values() for n in names) == sorted(named)
        for block in range(2):
            for name in ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "linear1.weight"):
                assert f"0.layers.{block}.{name}" in groups["preconditioned"]
        assert all("norm" in name for name in groups["plain SGD"])
        assert "not preconditioned" not in opt.describe()
        assert "0.layers.0.self_attn.k_proj: Attention projection, A 9 × 9, G 8 × 8" in opt.describe()
        x = torch.randn(N, L, E, dtype=DTYPE)
        y = torch.randint(0, 3, (N,))
        F.cross_entropy(model(x), y).backward()
        plain = model[0].layers[0].self_attn.in_proj_weight.grad.clone()
        opt.step()
    assert opt.preconditioner.health.skipped_gradients == 0
    rewritten = model[0].layers[0].self_attn.in_proj_weight.grad
    assert not torch.allclose(rewritten, plain)


def test_unroutable_attention_is_named_and_partial_skips_of_a_packed_weight_are_refused() -> None:
    torch.manual_seed(0)
    odd = nn.Sequential(nn.Linear(E, E), nn.MultiheadAttention(E, HEADS, add_bias_kv=True))
    pre = rkfac.KFACPreconditioner(odd)
    assert pre.layer_names == ["0"]
    assert ("1", "MultiheadAttention, add_bias_kv=True is not supported") in pre.unsupported
    with pytest.raises(ValueError, match=r"skip all three or none"):
        rkfac.KFACPreconditioner(Head(attention()), skip=["attention.q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rules match projections; nothing left unnamed
        skipped = rkfac.KFACPreconditioner(Head(attention()), skip=["attention.*_proj"])
        assert skipped.layer_names == ["readout"] and skipped.unsupported == []
        only_out = rkfac.KFACPreconditioner(Head(attention()), skip=["attention.out_proj"])
        assert only_out.layer_names == ["attention.q_proj", "attention.k_proj", "attention.v_proj", "readout"]
    frozen = Head(attention())
    frozen.attention.in_proj_weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"attention \(MultiheadAttention, frozen weight with a trainable bias\)"):
        pre = rkfac.KFACPreconditioner(frozen)
    assert pre.frozen == ["attention.q_proj", "attention.k_proj", "attention.v_proj"]


class Seq2Seq(nn.Module):
    """nn.Transformer's encoder and decoder layers, sequence-first (batch_first=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0)
        self.decoder = nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0)
        self.head = nn.Linear(E, 3)

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(target.shape[0], dtype=target.dtype)
        decoded = self.decoder(target, self.encoder(source), tgt_mask=mask, tgt_is_causal=True)
        return self.head(decoded).flatten(0, 1)


def test_a_sequence_first_decoder_with_cross_attention_is_preconditioned_whole() -> None:
    torch.manual_seed(0)
    model = Seq2Seq().double()
    opt = rkfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1, batch_dim=1)
    names = opt.preconditioner.layer_names
    for attention in ("encoder.self_attn", "decoder.self_attn", "decoder.multihead_attn"):
        assert all(f"{attention}.{role}" in names for role in ("q_proj", "k_proj", "v_proj", "out_proj"))
    groups = opt.groups()
    assert sorted(n for names in groups.values() for n in names) == sorted(n for n, _ in model.named_parameters())
    assert all("norm" in name for name in groups["plain SGD"])
    source, target = torch.randn(S, N, E, dtype=DTYPE), torch.randn(L, N, E, dtype=DTYPE)
    y = torch.randint(0, 3, (L * N,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(source, target), y).backward()
        opt.step()
    assert all(value == 0 for value in opt.preconditioner.health.as_dict().values())
    # the cross attention's k and v read the memory (S tokens), its q the target (L tokens): N samples each
    a_k, _ = opt.preconditioner.factors()["decoder.multihead_attn.k_proj"]
    a_q, _ = opt.preconditioner.factors()["decoder.multihead_attn.q_proj"]
    assert a_k.shape == a_q.shape == (E + 1, E + 1) and not torch.allclose(a_k, a_q)


def test_a_deleted_model_with_attention_is_freed_after_remove() -> None:
    """The router cache holds its attention modules weakly."""
    import gc
    import weakref

    model = Head(attention())
    pre = rkfac.KFACPreconditioner(model, factor_every=1)
    alive = weakref.ref(model.attention)
    pre.remove()
    del model, pre
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("method", [rkfac.LowRankSOAP, rkfac.LowRankEKFAC])
@pytest.mark.parametrize(("batch_first", "bias", "kdim"), [(True, True, None), (False, True, 5)])
def test_eigenbasis_methods_step_the_projections_as_the_explicit_linear_model(
    batch_first: bool, bias: bool, kdim: int | None, method: type[rkfac.KFAC] | type[rkfac.LowRankSOAP]
) -> None:
    """rkfac.LowRankSOAP and rkfac.LowRankEKFAC (issue 21) on the routed attention: after three
    steps (a new basis every step, so the carry runs; EKFAC's rows paired in the routed hooks)
    every projection's weights equal the explicit-Linear model's."""
    module = attention(batch_first, bias, kdim, kdim)
    routed, reference = Head(module), Head(ExplicitCrossAttention(module))
    reference.readout.load_state_dict(routed.readout.state_dict())
    options = {"lr": 0.01, "factor_every": 1, "inverse_every": 1, "decomposition": rkfac.ExactEigh()}
    options["batch_dim"] = 0 if batch_first else 1
    optimizers = [method(model, **options) for model in (routed, reference)]
    assert optimizers[0].preconditioner.layer_names[:4] == [f"attention.{p}_proj" for p in "qkv"] + ["attention.out_proj"]
    generator = torch.Generator().manual_seed(5)
    for step in range(3):
        q, k, v = inputs(batch_first, kdim or E, kdim or E, seed=10 + step)
        q, k, v = (q, q, q) if kdim is None else (q, k, v)
        y = torch.randint(0, 3, (N * L,), generator=generator)
        for model, opt in zip((routed, reference), optimizers, strict=True):
            opt.zero_grad()
            F.cross_entropy(model(q, k, v), y).backward()
            opt.step()
    explicit = reference.attention
    weights = (
        module.in_proj_weight.chunk(3)
        if module.in_proj_weight is not None
        else (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    )
    for weight, linear in zip(weights, (explicit.q, explicit.k, explicit.v), strict=True):
        torch.testing.assert_close(weight, linear.weight)
    if bias:
        torch.testing.assert_close(module.in_proj_bias, torch.cat([explicit.q.bias, explicit.k.bias, explicit.v.bias]))
    torch.testing.assert_close(module.out_proj.weight, explicit.out.weight)
    torch.testing.assert_close(routed.readout.weight, reference.readout.weight)
    assert not torch.equal(module.out_proj.weight, attention(batch_first, bias, kdim, kdim).out_proj.weight)  # it moved
