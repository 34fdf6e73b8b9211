"""SENG against dense float64 references built from per-sample gradients computed by torch.func."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rkfac
from rkfac.layers import kind_for
from rkfac.seng import per_sample
from tests.oracles import backward, dense_seng_direction, grad_matrix, per_sample_grad_matrices


def conv_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.LayerNorm(3 * 9),
        nn.Linear(3 * 9, 4),
    ).double()


def mlp_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def batch(model: nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    is_conv = isinstance(model[0], nn.Conv2d)  # type: ignore[index]
    shape = (n, 2, 5, 5) if is_conv else (n, 6)
    return torch.randn(shape, generator=generator, dtype=torch.float64), torch.randint(0, 4, (n,), generator=generator)


@pytest.mark.parametrize("make_model", [mlp_model, conv_model])
def test_hook_factors_give_the_per_sample_gradients_of_torch_func(make_model):
    torch.manual_seed(0)
    model = make_model()
    x, y = batch(model, 7, seed=1)
    captured = {}
    layer = model[0]

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        captured["x"] = inputs[0]
        out.register_hook(lambda g: captured.update(g=g))

    layer.register_forward_hook(keep)
    backward(model, x, y)
    gy, cols = per_sample.per_sample_factors(kind_for(layer), captured["x"], captured["g"], scale=7.0)
    expected = per_sample_grad_matrices(model, layer, x, y)
    torch.testing.assert_close(per_sample.explicit(gy, cols), expected.flatten(1))


def test_linear_on_token_inputs_sums_positions():
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    g = torch.randn(4, 5, 2, dtype=torch.float64)
    gy, cols = per_sample.per_sample_factors(kind_for(layer), x, g, scale=1.0)
    expected = torch.stack([torch.cat([g[i].T @ x[i], g[i].sum(0, keepdim=True).T], dim=1) for i in range(4)])
    torch.testing.assert_close(per_sample.explicit(gy, cols), expected.flatten(1))


def test_truncate_keeps_the_best_rank_r_per_sample_gradient():
    gy = torch.randn(3, 6, 9, dtype=torch.float64)
    cols = torch.randn(3, 4, 9, dtype=torch.float64)
    kept_g, kept_x = per_sample.truncate(gy, cols, rank=2)
    for i in range(3):
        u, s, vh = torch.linalg.svd(gy[i])
        best = (u[:, :2] * s[:2]) @ vh[:2] @ cols[i].T
        torch.testing.assert_close(kept_g[i] @ kept_x[i].T, best)
    same_g, same_x = per_sample.truncate(gy, cols, rank=9)
    assert same_g is gy and same_x is cols


@pytest.mark.parametrize("make_model", [mlp_model, conv_model])
def test_unsketched_direction_equals_the_dense_solve(make_model):
    torch.manual_seed(0)
    model = make_model()
    damping = 0.7
    pre = rkfac.SENGPreconditioner(model, damping=damping, update_freq=2, sketch_threshold=1e9)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    x0, y0 = batch(model, 9, seed=2)
    rows = {id(layer): per_sample_grad_matrices(model, layer, x0, y0).flatten(1) for layer in layers}
    # step 0 rebuilds from this batch; step 1 reuses U from step 0 with a new gradient
    for step, (x, y) in enumerate([(x0, y0), batch(model, 9, seed=3)]):
        backward(model, x, y)
        raw = {id(layer): grad_matrix(layer).clone() for layer in layers}
        norm = model[3] if len(model) > 3 else None
        raw_norm = None if norm is None else norm.weight.grad.clone()
        pre.step()
        for layer in layers:
            expected = dense_seng_direction(rows[id(layer)], raw[id(layer)], damping)
            torch.testing.assert_close(grad_matrix(layer), expected, rtol=1e-9, atol=1e-12, msg=f"step {step}")
        if norm is not None:
            torch.testing.assert_close(norm.weight.grad, raw_norm / (1 + damping))


def test_a_smaller_batch_at_a_rebuild_uses_its_own_samples():
    torch.manual_seed(0)
    model = mlp_model()
    pre = rkfac.SENGPreconditioner(model, damping=1.0, update_freq=1, sketch_threshold=1e9)
    for n in (8, 3):
        x, y = batch(model, n, seed=n)
        backward(model, x, y)
        raw = grad_matrix(model[2]).clone()
        pre.step()
        rows = per_sample_grad_matrices(model, model[2], x, y).flatten(1)
        torch.testing.assert_close(grad_matrix(model[2]), dense_seng_direction(rows, raw, 1.0))


def test_accumulated_passes_concatenate_into_one_u():
    torch.manual_seed(0)
    model = conv_model()
    twin = copy.deepcopy(model)
    x, y = batch(model, 8, seed=4)
    pre = rkfac.SENGPreconditioner(model, damping=0.5, loss_reduction="sum", sketch_threshold=1e9)
    twin_pre = rkfac.SENGPreconditioner(twin, damping=0.5, loss_reduction="sum", sketch_threshold=1e9)
    model.zero_grad()
    for part in (slice(0, 3), slice(3, 8)):
        F.cross_entropy(model(x[part]), y[part], reduction="sum").backward()
    twin.zero_grad()
    F.cross_entropy(twin(x), y, reduction="sum").backward()
    pre.step()
    twin_pre.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def sketch_error(col_sample_size: int, seed: int, sketch_rank: int = 16) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 48), nn.Tanh(), nn.Linear(48, 4)).double()
    x = torch.randn(32, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(6))
    pre = rkfac.SENGPreconditioner(
        model, damping=0.5, sketch_threshold=0, col_sample_size=col_sample_size, sketch_rank=sketch_rank, seed=seed
    )
    backward(model, x, y)
    raw = grad_matrix(model[0]).clone()
    pre.step()
    exact = dense_seng_direction(per_sample_grad_matrices(model, model[0], x, y).flatten(1), raw, 0.5)
    return float((grad_matrix(model[0]) - exact).norm() / exact.norm())


def test_sketched_direction_error_shrinks_as_the_sample_grows():
    sizes = (6, 12, 24, 48)  # 48 ≥ both widths of the first layer (41, 48): no sampling
    mean_errors = [sum(sketch_error(size, seed) for seed in range(8)) / 8 for size in sizes]
    assert mean_errors[0] > mean_errors[1] > mean_errors[2] > mean_errors[3]
    assert mean_errors[3] < 1e-10  # the full sample is the exact solve
    assert mean_errors[2] < 0.5 * mean_errors[0]


def test_sketched_conv_is_exact_when_the_rank_and_sample_cover_everything():
    torch.manual_seed(0)
    model = conv_model()
    x, y = batch(model, 6, seed=7)
    pre = rkfac.SENGPreconditioner(model, damping=0.5, sketch_threshold=0, col_sample_size=100, sketch_rank=9)
    backward(model, x, y)
    raw = grad_matrix(model[0]).clone()
    pre.step()
    rows = per_sample_grad_matrices(model, model[0], x, y).flatten(1)
    torch.testing.assert_close(grad_matrix(model[0]), dense_seng_direction(rows, raw, 0.5))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(model, 16, seed=100 + step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def seng_options(**changes):
    options = {"lr": 0.05, "update_freq": 2, "sketch_threshold": 10, "col_sample_size": 3, "sketch_rank": 2}
    options.update(changes)
    return options


def test_same_seed_same_run_and_another_seed_another_sketch():
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(0)
        model = conv_model()
        train(model, rkfac.SENG(model, seed=seed, **seng_options()), range(5))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_state_dict_round_trip_resumes_bitwise():
    torch.manual_seed(0)
    model = conv_model()
    optimizer = rkfac.SENG(model, **seng_options(update_freq=3))
    train(model, optimizer, range(4))
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, range(4, 9))

    resumed = conv_model()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = rkfac.SENG(resumed, **seng_options(update_freq=3))
    resumed_optimizer.load_state_dict(saved_optimizer)
    train(resumed, resumed_optimizer, range(4, 9))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_momentum_weight_decay_and_callable_lr():
    torch.manual_seed(0)
    model = mlp_model()
    twin = copy.deepcopy(model)
    optimizer = rkfac.SENG(model, lr=lambda step: 0.1 / (step + 1), momentum=0.5, weight_decay=0.01, update_freq=1)
    pre = rkfac.SENGPreconditioner(twin, update_freq=1)
    buffers: dict[int, torch.Tensor] = {}
    for step in range(3):
        x, y = batch(model, 8, seed=step)
        backward(model, x, y)
        backward(twin, x, y)
        optimizer.step()
        pre.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / (step + 1))
        with torch.no_grad():
            for p in twin.parameters():
                d = p.grad + 0.01 * p
                buffers[id(p)] = d.clone() if step == 0 else buffers[id(p)] * 0.5 + d
                p -= 0.1 / (step + 1) * buffers[id(p)]
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"damping": 0.0}, "damping"),
        ({"update_freq": 0}, "update_freq"),
        ({"col_sample_size": 0}, "col_sample_size"),
        ({"sketch_threshold": -1.0}, "sketch_threshold"),
        ({"sketch_rank": 0}, "sketch_rank"),
        ({"loss_reduction": "avg"}, "loss_reduction"),
    ],
)
def test_bad_arguments_raise_naming_the_value(options, named):
    arguments = {"lr": 0.1, **options}
    with pytest.raises(ValueError, match=named):
        rkfac.SENG(mlp_model(), **arguments)


def test_a_callable_lr_that_goes_bad_names_the_step():
    model = mlp_model()
    optimizer = rkfac.SENG(model, lr=lambda step: 0.1 if step < 1 else float("nan"))
    train(model, optimizer, range(1))
    with pytest.raises(ValueError, match=r"lr.*step 1"):
        train(model, optimizer, range(1, 2))


def test_model_without_supported_layers_is_refused():
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        rkfac.SENG(nn.Sequential(nn.LayerNorm(4)), lr=0.1)


def test_a_rebuild_without_captured_samples_is_a_clear_error():
    model = mlp_model()
    pre = rkfac.SENGPreconditioner(model)
    x, _ = batch(model, 4, seed=0)
    with torch.no_grad():
        model(x)
    model.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="no layer captured"):
        pre.step()


def test_grad_scaler_gives_the_unscaled_direction():
    results = []
    for scale in (None, 2.0**12):
        torch.manual_seed(0)
        model = conv_model().float()
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        optimizer = rkfac.SENG(model, lr=0.05, update_freq=2, grad_scaler=scaler)
        for step in range(3):
            x, y = batch(model, 8, seed=step)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x.float()), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    for plain, scaled in zip(*results, strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-6)


class TwiceCalled(nn.Module):
    """A Linear applied twice in one forward (weight sharing), between two ordinary layers."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.first(x)))))))


@pytest.mark.parametrize("sketch_threshold", [1e9, 20.0], ids=["exact", "sketched"])
def test_a_layer_called_twice_gets_the_summed_per_sample_gradient(sketch_threshold: float) -> None:
    """The shared capture counts the two calls as positions of the same samples, as K-FAC does:
    U's row i is sample i's whole gradient of the shared weight (both uses), by torch.func."""
    torch.manual_seed(0)
    model = TwiceCalled().double()
    damping = 0.6
    # sketched: col_sample_size covers every row, so the sketch is exact and the oracle still applies
    pre = rkfac.SENGPreconditioner(model, damping=damping, update_freq=1, sketch_threshold=sketch_threshold, col_sample_size=64)
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(7, 6, generator=generator, dtype=torch.float64), torch.randint(0, 4, (7,), generator=generator)
    layers = [model.first, model.shared, model.head]
    rows = {id(layer): per_sample_grad_matrices(model, layer, x, y).flatten(1) for layer in layers}
    backward(model, x, y)
    raw = {id(layer): grad_matrix(layer).clone() for layer in layers}
    pre.step()
    for layer in layers:
        expected = dense_seng_direction(rows[id(layer)], raw[id(layer)], damping)
        torch.testing.assert_close(grad_matrix(layer), expected, rtol=1e-9, atol=1e-12)
