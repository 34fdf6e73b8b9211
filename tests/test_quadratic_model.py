"""The quadratic model's pieces against dense references: the GGN as an explicit Jᵀ H J (a
reverse-mode Jacobian and the loss's autograd Hessian), its minimiser against a dense solve."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rkfac.quadratic_model import IGNORE_INDEX, QuadraticModel, forward, ggn_inner, ggn_weights, loss_value, output_tangents


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def flat_params(model: nn.Module) -> tuple[torch.Tensor, list[tuple[str, torch.Size]]]:
    named = [(name, p.shape) for name, p in model.named_parameters()]
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), named


def unflatten(vector: torch.Tensor, named: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, shape in named:
        size = shape.numel()
        out[name] = vector[start : start + size].reshape(shape)
        start += size
    return out


def reference_loss(kind: str, outputs: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """The loss written out with torch's own functions (cross-entropy: F.cross_entropy over the
    rows, ignore_index −100 left out as it leaves it; squared error: summed per sample)."""
    if kind == "cross_entropy":
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction=reduction)
    per_sample = (outputs - targets).pow(2).reshape(outputs.shape[0], -1).sum(1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def dense_ggn(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, kind: str, reduction: str) -> torch.Tensor:
    """C = Jᵀ H J with J the reverse-mode Jacobian of the flattened outputs and H the autograd
    Hessian of the loss (:func:`reference_loss`) in the outputs."""
    theta, named = flat_params(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    def outputs_of(vector: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**unflatten(vector, named), **buffers}, (x,)).reshape(-1)

    outputs = outputs_of(theta).detach()
    jacobian = torch.autograd.functional.jacobian(outputs_of, theta)
    shape = functional_call(model, {**unflatten(theta, named), **buffers}, (x,)).shape
    hessian = torch.autograd.functional.hessian(lambda o: reference_loss(kind, o.reshape(shape), targets, reduction), outputs)
    return jacobian.T @ hessian @ jacobian


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_products_from_forward_mode_equal_the_explicit_jt_h_j(kind: str, reduction: str) -> None:
    model = small_model()
    x = torch.randn(5, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (5,)) if kind == "cross_entropy" else torch.randn(5, 3, dtype=torch.float64)
    theta, named = flat_params(model)
    v, w = torch.randn_like(theta), torch.randn_like(theta)
    dense = dense_ggn(model, x, targets, kind, reduction)
    params = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        outputs, (jv, jw) = output_tangents(model, params, [x], [unflatten(v, named), unflatten(w, named)])
    assert float(ggn_inner(kind, outputs, jv, jw, reduction)) == pytest.approx(float(v @ dense @ w), rel=1e-9)
    assert float(ggn_inner(kind, outputs, jv, jv, reduction)) == pytest.approx(float(v @ dense @ v), rel=1e-9)


def test_cross_entropy_over_token_rows_treats_every_position_as_a_sample() -> None:
    torch.manual_seed(1)
    outputs = torch.randn(2, 3, 5, dtype=torch.float64)  # (batch, tokens, classes)
    left, right = torch.randn_like(outputs), torch.randn_like(outputs)
    targets = torch.randint(0, 5, (2, 3))
    flat = outputs.reshape(6, 5)
    hessian = torch.autograd.functional.hessian(lambda o: loss_value("cross_entropy", o.reshape(6, 5), targets.reshape(6)), flat)
    expected = left.reshape(-1) @ hessian.reshape(30, 30) @ right.reshape(-1)
    assert float(ggn_inner("cross_entropy", outputs, left, right)) == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_positions_marked_ignore_index_drop_out_of_the_curvature_and_loss_as_out_of_f_cross_entropy(reduction: str) -> None:
    torch.manual_seed(2)
    outputs = torch.randn(3, 4, 5, dtype=torch.float64)  # (batch, tokens, classes)
    left, right = torch.randn_like(outputs), torch.randn_like(outputs)
    targets = torch.randint(0, 5, (3, 4))
    targets[0, 1:] = IGNORE_INDEX  # padding
    targets[2] = IGNORE_INDEX  # a sample that is all padding
    hessian = torch.autograd.functional.hessian(lambda o: reference_loss("cross_entropy", o, targets, reduction), outputs)
    expected = left.reshape(-1) @ hessian.reshape(60, 60) @ right.reshape(-1)
    inner = ggn_inner("cross_entropy", outputs, left, right, reduction, targets=targets)
    assert float(inner) == pytest.approx(float(expected), rel=1e-10)
    reference = reference_loss("cross_entropy", outputs, targets, reduction)
    assert float(loss_value("cross_entropy", outputs, targets, reduction)) == pytest.approx(float(reference), rel=1e-12)
    # the trace weights of the importance draws count only the kept rows
    probs = outputs.softmax(-1)
    kept = (targets != IGNORE_INDEX).double()
    expected_weights = ((1 - probs.pow(2).sum(-1)) * kept).sum(1)
    torch.testing.assert_close(ggn_weights(outputs, targets), expected_weights)
    assert float(ggn_weights(outputs, targets)[2]) == 0.0


def test_the_passes_leave_running_statistics_alone_and_capture_nothing() -> None:
    model = small_model()
    seen: list[bool] = []
    model[0].register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    before = {name: b.clone() for name, b in model.named_buffers()}
    params = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        output_tangents(model, params, [torch.randn(5, 4, dtype=torch.float64)], [params])
        forward(model, params, [torch.randn(5, 4, dtype=torch.float64)])
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert seen == [False, False]  # rkfac's hooks capture only with grad enabled


def test_the_minimiser_solves_the_two_by_two_system_and_predicts_its_change() -> None:
    matrix = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    model = QuadraticModel(matrix, b)
    c = model.minimiser()
    assert c is not None
    torch.testing.assert_close(c, torch.linalg.solve(matrix, -b))
    grid = [model.change(c + torch.tensor(shift, dtype=torch.float64)) for shift in ([0.01, 0], [0, -0.01], [0.02, 0.02])]
    assert all(value > model.change(c) for value in grid)  # a minimum
    assert model.change(c) == pytest.approx(0.5 * float(b @ c))


@pytest.mark.parametrize("bounds", [(0.0, 0.95), (0.0, 0.2), (-1.0, -0.5)])
def test_a_bounded_momentum_is_the_constrained_minimum_found_by_a_grid(bounds: tuple[float, float]) -> None:
    model = QuadraticModel(torch.tensor([[2.0, 1.5], [1.5, 3.0]], dtype=torch.float64), torch.tensor([-1.0, 2.0]).double())
    c = model.minimiser(second_range=bounds)
    assert c is not None and bounds[0] <= float(c[1]) <= bounds[1]
    mus = torch.linspace(*bounds, 201, dtype=torch.float64)
    alphas = torch.linspace(-3, 3, 1201, dtype=torch.float64)
    best = min(model.change(torch.stack([a, m])) for m in mus for a in alphas[::10])
    assert model.change(c) <= best + 1e-12


def test_parallel_directions_fall_back_to_alpha_alone_and_a_bad_model_to_no_step() -> None:
    parallel = QuadraticModel(torch.tensor([[2.0, 4.0], [4.0, 8.0]], dtype=torch.float64), torch.tensor([-1.0, -2.0]).double())
    c = parallel.minimiser()
    assert c is not None and c.tolist() == [0.5, 0.0]
    assert QuadraticModel(torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([1.0]).double()).minimiser() is None
    assert QuadraticModel(torch.tensor([[float("nan")]], dtype=torch.float64), torch.tensor([1.0]).double()).minimiser() is None


def test_an_unknown_loss_kind_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'hinge'"):
        loss_value("hinge", torch.zeros(2, 2), torch.zeros(2))


def test_forward_mode_passes_through_float32_attention_match_a_float64_central_difference() -> None:
    # float32 attention dispatches to a fused CPU kernel that forward mode cannot differentiate
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(5 * 16, 3))
    x = torch.randn(3, 5, 16)
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangent = {name: torch.randn_like(p) for name, p in params.items()}
    with torch.no_grad():
        outputs, (derivative,) = output_tangents(model, params, [x], [tangent])
        reference = copy.deepcopy(model).double()
        step = 1e-6

        def at(sign: float) -> torch.Tensor:
            moved = {name: (p.double() + sign * step * tangent[name].double()) for name, p in params.items()}
            return functional_call(reference, moved, (x.double(),))

        central = (at(1.0) - at(-1.0)) / (2 * step)
        assert torch.allclose(outputs.double(), at(0.0), rtol=1e-4, atol=1e-5)
        assert torch.allclose(forward(model, params, [x]).double(), at(0.0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(derivative.double(), central, rtol=1e-3, atol=1e-4)
