"""A torch.compile'd model: same layer names (no ``_orig_mod.``), same training as the plain model.

Compiled with the "eager" backend (dynamo's tracing without code generation) so the test stays
fast on CPU. Graph breaks that rkfac's capture causes are not tested here: they remain (issue 18).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import rkfac


def train(compiled: bool) -> tuple[rkfac.KFAC, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    model = torch.compile(net, backend="eager") if compiled else net
    opt = rkfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (16,), generator=generator)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt, [p.detach().clone() for p in net.parameters()]


def test_a_compiled_model_trains_as_the_plain_one_under_the_same_names() -> None:
    plain, plain_params = train(compiled=False)
    compiled, compiled_params = train(compiled=True)
    assert compiled.preconditioner.layer_names == plain.preconditioner.layer_names == ["0", "2"]
    assert compiled.state_dict()["preconditioner"]["layers"].keys() == plain.state_dict()["preconditioner"]["layers"].keys()
    for p, q in zip(compiled_params, plain_params, strict=True):
        torch.testing.assert_close(p, q)
