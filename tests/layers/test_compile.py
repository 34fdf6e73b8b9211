"""A torch.compile'd model: same layer names (no ``_orig_mod.``), same training as the plain model,
and no graph break from rkfac's capture (issue 18; the design is in :mod:`rkfac.layers.capture`).

Compiled with the "eager" backend (dynamo's tracing without code generation) so the tests stay
fast on CPU; "aot_eager" adds AOTAutograd's joint forward/backward tracing, the part of the
default inductor backend where the capture operators could be dropped or reordered (inductor's
code generation itself is too slow to compile here on every run).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import rkfac

Make = Callable[[nn.Module], rkfac.KFAC | rkfac.SENG | rkfac.LowRankSOAP]
METHODS: dict[str, Make] = {
    "kfac": lambda model: rkfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1),
    "seng": lambda model: rkfac.SENG(model, lr=0.1),
    "sre-soap": lambda model: rkfac.LowRankSOAP(model, lr=0.01, factor_every=1, inverse_every=2),
}


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


def conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(3 * 36, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, 3),
    ).double()


@pytest.mark.parametrize("method", METHODS)
def test_the_capture_adds_no_graph_break_on_a_factor_step(method: str) -> None:
    torch.manual_seed(0)
    net = conv_net()
    model = torch.compile(net, backend="eager")
    opt = METHODS[method](model)
    assert opt.preconditioner.layer_names == ["0", "3", "5"]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(4, 2, 6, 6, dtype=torch.float64))
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


class SharedNet(nn.Module):
    """Conv2d, in-place ReLUs, and a Linear called twice in one forward (one sample group)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True)
        self.fc, self.shared, self.out = nn.Linear(3 * 36, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.fc(self.act(self.conv(x)).flatten(1)))
        return self.out(self.shared(torch.tanh(self.shared(h))))


def train_shared(make: Make, backend: str | None) -> list[torch.Tensor]:
    """Gradient accumulation, a no-grad forward and a forward never backpropagated, every step."""
    torch.manual_seed(0)
    net = SharedNet().double()
    model = net if backend is None else torch.compile(net, backend=backend)
    opt = make(model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        for _ in range(2):
            x = torch.randn(6, 2, 6, 6, generator=generator, dtype=torch.float64)
            y = torch.randint(0, 3, (6,), generator=generator)
            (F.cross_entropy(model(x), y) / 2).backward()
        with torch.no_grad():
            model(x)
        model(x)  # a logging forward with grad enabled: adds nothing
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize(
    ("method", "backend"), [("kfac", "eager"), ("seng", "eager"), ("sre-soap", "eager"), ("kfac", "aot_eager")]
)
def test_the_compiled_capture_gives_the_eager_numbers(method: str, backend: str) -> None:
    torch._dynamo.reset()
    compiled = train_shared(METHODS[method], backend)
    plain = train_shared(METHODS[method], None)
    for p, q in zip(compiled, plain, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_compiled_model_still_runs_after_the_hooks_are_removed() -> None:
    torch.manual_seed(0)
    net = conv_net()
    model = torch.compile(net, backend="eager")
    opt = rkfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    model(x).sum().backward()  # compiled with the capture operators in the graph
    opt.preconditioner.remove()
    opt.zero_grad()
    model(x).sum().backward()  # the graph may still hold them: they find no capture and do nothing
    assert all(p.grad is not None for p in net.parameters())


def encoder(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(4 * 16, 3))


def test_a_compiled_transformer_with_routed_attention_has_no_break_and_the_eager_numbers() -> None:
    """The attention's routed forward (rkfac.layers.attention) traces into the one graph too."""
    x, y = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    net = encoder()
    rkfac.KFAC(net, lr=0.1, factor_every=1)
    explained = torch._dynamo.explain(torch.compile(net, backend="eager"))(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    trained = []
    for compiled in (False, True):
        net = encoder()
        model = torch.compile(net, backend="eager") if compiled else net
        opt = rkfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1)
        assert "0.layers.1.self_attn.v_proj" in opt.preconditioner.layer_names
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        trained.append([p.detach().clone() for p in net.parameters()])
    for p, q in zip(*trained, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
