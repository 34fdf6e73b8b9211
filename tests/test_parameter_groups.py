"""Every parameter in exactly one named group: preconditioned, plain SGD, or a fallback optimizer (issue 18)."""

from __future__ import annotations

import functools
import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)).double()


def batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (8,), generator=generator)


def test_without_a_fallback_the_other_parameters_take_plain_sgd() -> None:
    opt = rkfac.KFAC(model(), lr=0.1)
    assert opt.groups() == {"preconditioned": ["0.weight", "0.bias", "3.weight", "3.bias"], "plain SGD": ["1.weight", "1.bias"]}
    assert "plain SGD: 1.weight, 1.bias" in opt.describe()


def test_a_fallback_optimizer_steps_the_other_parameters_on_their_plain_gradient() -> None:
    net = model()
    reference = model()
    adamw = functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)
    opt = rkfac.KFAC(net, lr=0.1, fallback=adamw)
    assert opt.groups() == {
        "preconditioned": ["0.weight", "0.bias", "3.weight", "3.bias"],
        "fallback AdamW": ["1.weight", "1.bias"],
    }
    norm_copy = [p.detach().clone().requires_grad_(True) for p in reference[1].parameters()]
    expected = adamw(norm_copy)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for copy, p in zip(norm_copy, net[1].parameters(), strict=True):
            copy.grad = p.grad.clone()  # the plain gradient, as the fallback sees it
        expected.step()
        opt.step()
    for p, q in zip(net[1].parameters(), norm_copy, strict=True):
        torch.testing.assert_close(p, q)
    # a state_dict round trip keeps the fallback's state (AdamW's moments)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = rkfac.KFAC(model(), lr=0.1, fallback=adamw)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    assert fresh.fallback is not None and fresh.fallback.state_dict()["state"][0]["step"] == 3
    with pytest.raises(ValueError, match="disagree on a fallback"):
        rkfac.KFAC(model(), lr=0.1).load_state_dict(opt.state_dict())


def test_seng_takes_no_fallback() -> None:
    with pytest.raises(ValueError, match="takes no fallback"):
        rkfac.SENG(model(), fallback=torch.optim.AdamW)
