"""nn.Conv1d (issue 18's first new layer kind) against its explicit Conv2d equivalent.

A Conv1d with kernel k, stride s, padding p and dilation d computes exactly what a Conv2d with
kernel (1, k), stride (1, s), padding (0, p), dilation (1, d) computes on the input with a unit
height axis: same patches, same output positions. K-FAC (KFC scaling, positions summed) must then
give both the same factors and the same preconditioned gradients, and SENG the same directions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rkfac

DTYPE = torch.float64


def pair(bias: bool, stride: int, padding: int, dilation: int, padding_mode: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    conv1 = nn.Conv1d(3, 4, 3, stride=stride, padding=padding, dilation=dilation, bias=bias, padding_mode=padding_mode)
    conv2 = nn.Conv2d(
        3, 4, (1, 3), stride=(1, stride), padding=(0, padding), dilation=(1, dilation), bias=bias, padding_mode=padding_mode
    )
    with torch.no_grad():
        conv2.weight.copy_(conv1.weight.unsqueeze(2))
        if bias:
            conv2.bias.copy_(conv1.bias)
    one_d = nn.Sequential(conv1, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    two_d = nn.Sequential(conv2, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    return one_d, two_d


CASES = [(True, 1, 1, 1, "zeros"), (False, 2, 0, 1, "zeros"), (True, 1, 2, 2, "zeros"), (True, 1, 1, 1, "circular")]


@pytest.mark.parametrize(("bias", "stride", "padding", "dilation", "padding_mode"), CASES)
@pytest.mark.parametrize("method", ["kfac", "seng"])
def test_conv1d_equals_its_conv2d_equivalent(bias, stride, padding, dilation, padding_mode, method) -> None:  # type: ignore[no-untyped-def]
    if padding_mode != "zeros" and method == "seng":
        pytest.skip("one padding-mode case is enough")
    one_d, two_d = pair(bias, stride, padding, dilation, padding_mode)
    x = torch.randn(5, 3, 11, dtype=DTYPE)
    x2 = x.unsqueeze(2)
    one_d(x), two_d(x2)  # materialise the lazy heads
    two_d[3].load_state_dict(one_d[3].state_dict())
    y = torch.tensor([0, 1, 1, 0, 1])
    options = {"factor_every": 1, "clip": None} if method == "kfac" else {"update_freq": 1, "sketch_threshold": 1e9}
    make = rkfac.KFACPreconditioner if method == "kfac" else rkfac.SENGPreconditioner
    pre1, pre2 = make(one_d, **options), make(two_d, **options)
    assert pre1.layer_names == pre2.layer_names == ["0", "3"]
    F.cross_entropy(one_d(x), y).backward()
    F.cross_entropy(two_d(x2), y).backward()
    pre1.step()
    pre2.step()
    if method == "kfac":
        for (a1, g1), (a2, g2) in zip(pre1.factors().values(), pre2.factors().values(), strict=True):
            torch.testing.assert_close(a1, a2)
            torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(one_d[0].weight.grad, two_d[0].weight.grad.squeeze(2))
    if bias:
        torch.testing.assert_close(one_d[0].bias.grad, two_d[0].bias.grad)


def test_unbatched_conv_inputs_count_one_sample() -> None:
    """An unbatched (c, L) / (c, H, W) input is one sample: G is that of the batched input (groups
    = 1 and grouped convolutions alike)."""
    convs = [(nn.Conv1d(2, 3, 3), (2, 7)), (nn.Conv2d(2, 3, 3), (2, 5, 5))]
    convs += [(nn.Conv1d(4, 4, 3, groups=2), (4, 7)), (nn.Conv2d(3, 6, 3, groups=3), (3, 5, 5))]
    for conv, shape in ((conv.double(), shape) for conv, shape in convs):
        x = torch.randn(*shape, dtype=DTYPE)
        factors = []
        for inputs in (x, x.unsqueeze(0)):
            conv.zero_grad()
            pre = rkfac.KFACPreconditioner(conv, factor_every=1)
            conv(inputs).square().sum().backward()
            pre.step()
            factors.append(pre.factors()[""])
            pre.remove()
        torch.testing.assert_close(factors[0][1], factors[1][1])
        torch.testing.assert_close(factors[0][0], factors[1][0])
