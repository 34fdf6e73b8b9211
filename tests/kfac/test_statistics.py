"""K-FAC statistics against direct per-sample computations (loops over samples and positions)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac
from rkfac.layers import kind_for
from tests.oracles import with_ones

DTYPE = torch.float64


def first_factors(model: nn.Module, loss_fn, x: Tensor, **options) -> dict[str, tuple[Tensor, Tensor]]:
    """Factors after one captured step: with F₁ = S₁ they are the statistics themselves."""
    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1, clip=None, **options)
    model.zero_grad()
    loss_fn(model(x)).backward()
    pre.step()
    return pre.factors()


def per_sample_output_grads(model: nn.Module, layer: nn.Module, per_sample_loss, x: Tensor) -> Tensor:
    """δ_i = d loss_i / d(layer output of sample i), one sample at a time: (n, *output shape)."""
    grads = []
    for i in range(x.shape[0]):
        captured = {}
        handle = layer.register_forward_hook(lambda _m, _i, out: captured.update(out=out))
        loss = per_sample_loss(model(x[i : i + 1]))
        handle.remove()
        grads.append(torch.autograd.grad(loss, captured["out"])[0][0])
    return torch.stack(grads)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_statistics_match_per_sample_definition(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=bias).to(DTYPE)
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 3).to(DTYPE))
    x, y = torch.randn(9, 6, dtype=DTYPE), torch.randint(0, 3, (9,))
    factors = first_factors(model, lambda out: F.cross_entropy(out, y), x)
    a, g = factors["0"]

    rows = with_ones(x) if bias else x
    expected_a = sum(torch.outer(r, r) for r in rows) / len(rows)
    deltas = torch.stack(
        [
            per_sample_output_grads(model, layer, lambda out, i=i: F.cross_entropy(out, y[i : i + 1]), x[i : i + 1])[0]
            for i in range(len(x))
        ]
    )
    expected_g = sum(torch.outer(d, d) for d in deltas) / len(x)
    torch.testing.assert_close(a, expected_a)
    torch.testing.assert_close(g, expected_g)


def test_linear_with_leading_dims_sums_positions() -> None:
    """Inputs (n, T, d): A averages over all n·T rows, G = (1/n) Σ_{i,t} δ_{i,t} δ_{i,t}ᵀ."""
    torch.manual_seed(1)
    layer = nn.Linear(5, 3).to(DTYPE)
    n, tokens = 4, 7
    x = torch.randn(n, tokens, 5, dtype=DTYPE)
    target = torch.randn(n, tokens, 3, dtype=DTYPE)

    def per_sample_loss(out: Tensor, i: int) -> Tensor:
        return (out.tanh() - target[i : i + 1]).pow(2).sum()

    factors = first_factors(layer, lambda out: sum(per_sample_loss(out[i : i + 1], i) for i in range(n)) / n, x)
    a, g = factors[""]
    rows = with_ones(x.reshape(-1, 5))
    torch.testing.assert_close(a, rows.T @ rows / (n * tokens))
    deltas = torch.cat(
        [per_sample_output_grads(layer, layer, lambda out, i=i: per_sample_loss(out, i), x[i : i + 1]) for i in range(n)]
    )
    flat = deltas.reshape(-1, 3)
    torch.testing.assert_close(g, flat.T @ flat / n)


def explicit_patches(x: Tensor, conv: nn.Conv2d, padded: Tensor) -> Tensor:
    """Patches by loops over output positions of an already padded input: (n·T, c·kh·kw)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    n, _, hp, wp = padded.shape
    out_h = (hp - dh * (kh - 1) - 1) // sh + 1
    out_w = (wp - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(n):
        for oh in range(out_h):
            for ow in range(out_w):
                window = padded[i, :, oh * sh : oh * sh + dh * (kh - 1) + 1 : dh, ow * sw : ow * sw + dw * (kw - 1) + 1 : dw]
                rows.append(window.reshape(-1))
    return torch.stack(rows)


CONV_CASES = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1),
    dict(kernel_size=(3, 2), stride=2, padding=(2, 1), dilation=1),
    dict(kernel_size=3, stride=1, padding=2, dilation=2),
    dict(kernel_size=2, stride=(1, 2), padding=0, dilation=(2, 1), bias=False),
    dict(kernel_size=3, stride=1, padding=1, dilation=1, padding_mode="reflect"),
    dict(kernel_size=3, stride=1, padding="same", dilation=1),
]


@pytest.mark.parametrize("options", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv2d_statistics_match_per_position_definition(options: dict) -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, **options).to(DTYPE)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2).to(DTYPE))
    x = torch.randn(3, 3, 7, 6, dtype=DTYPE)
    model(x)  # materialise the lazy layer
    y = torch.tensor([0, 1, 1])
    factors = first_factors(model, lambda out: F.cross_entropy(out, y), x, skip=["3"])
    a, g = factors["0"]

    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    patches = explicit_patches(x, conv, padded)
    out = conv(x)
    # The patch order matches the weight layout: patch · w + b is the convolution output.
    weight_rows = conv.weight.reshape(conv.out_channels, -1)
    direct = patches @ weight_rows.T + (conv.bias if conv.bias is not None else 0)
    torch.testing.assert_close(direct, out.permute(0, 2, 3, 1).reshape(-1, conv.out_channels))

    rows = with_ones(patches) if conv.bias is not None else patches
    torch.testing.assert_close(a, rows.T @ rows / len(rows))
    deltas = torch.cat(
        [per_sample_output_grads(model, conv, lambda o, i=i: F.cross_entropy(o, y[i : i + 1]), x[i : i + 1]) for i in range(3)]
    )  # (n, c_out, H, W)
    positions = deltas.shape[2] * deltas.shape[3]
    flat = deltas.permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    # S_G = T · mean over (sample, position) of δδᵀ
    torch.testing.assert_close(g, positions * (flat.T @ flat) / len(flat))


def test_sum_reduction_scales_g_by_one_over_n() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(4, 3).to(DTYPE)
    x, y = torch.randn(8, 4, dtype=DTYPE), torch.randint(0, 3, (8,))
    _, g_mean = first_factors(layer, lambda out: F.cross_entropy(out, y), x)[""]
    _, g_sum = first_factors(layer, lambda out: F.cross_entropy(out, y, reduction="sum"), x, loss_reduction="sum")[""]
    torch.testing.assert_close(g_sum, g_mean)


def test_accumulated_micro_batches_equal_one_concatenated_batch() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).to(DTYPE)
    x, y = torch.randn(12, 5, dtype=DTYPE), torch.randint(0, 3, (12,))
    whole = first_factors(model, lambda out: F.cross_entropy(out, y), x)

    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1, clip=None)
    model.zero_grad()
    for part in range(4):
        index = slice(3 * part, 3 * part + 3)
        (F.cross_entropy(model(x[index]), y[index]) / 4).backward()
    pre.step()
    for name, (a, g) in pre.factors().items():
        torch.testing.assert_close(a, whole[name][0])
        torch.testing.assert_close(g, whole[name][1])
    # and the same preconditioned gradient as one pass over the concatenated batch
    twin = copy.deepcopy(model)
    twin_pre = rkfac.KFACPreconditioner(twin, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1, clip=None)
    twin.zero_grad()
    F.cross_entropy(twin(x), y).backward()
    twin_pre.step()
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_factors_are_float32_for_low_precision_activations() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 8)
    pre = rkfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    F.cross_entropy(out.float(), torch.randint(0, 2, (16,))).backward()
    pre.step()
    for a, g in pre.factors().values():
        assert a.dtype == torch.float32 and g.dtype == torch.float32


def test_conv_rows_of_channels_last_and_unbatched_inputs_match_explicit_windows() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1).to(DTYPE)
    x = torch.randn(2, 3, 7, 6, dtype=DTYPE)
    expected = with_ones(explicit_patches(x, conv, F.pad(x, conv._reversed_padding_repeated_twice)))
    torch.testing.assert_close(kind_for(conv).input_rows(x.to(memory_format=torch.channels_last)), expected)
    torch.testing.assert_close(kind_for(conv).input_rows(x[1]), expected[len(expected) // 2 :])
