"""KFACPreconditioner behaviour: the solve against dense references, schedules, clipping, state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac
from tests.oracles import batch, dense_kfac_direction, grad_matrices, mlp, saved_and_loaded, with_ones

DTYPE = torch.float64


def backward(model: nn.Module, seed: int) -> None:
    x, y = batch(seed, dtype=next(model.parameters()).dtype)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


DECOMPOSITIONS = [
    rkfac.ExactEigh(),
    rkfac.RandomizedSVD(rank=13, oversample=0, power_iters=1),
    rkfac.SymmetricRandomizedEVD(rank=40, oversample=10, power_iters=2),
]


@pytest.mark.parametrize("mode", ["relative", "pi"])
@pytest.mark.parametrize("decomposition", DECOMPOSITIONS, ids=repr)
def test_direction_equals_dense_solve_from_factors(mode: str, decomposition: rkfac.Decomposition) -> None:
    """With rank ≥ d every method is exact, so all three must match the dense solve."""
    model = mlp()
    pre = rkfac.KFACPreconditioner(
        model, decomposition=decomposition, damping=0.05, damping_mode=mode, clip=None, factor_every=1, inverse_every=1
    )
    for step in range(3):  # exercise the exponential average, not just the first statistic
        backward(model, step)
        grads = grad_matrices(model)
        pre.step()
    factors = pre.factors()
    for name, grad in grads.items():
        a, g = factors[name]
        expected = dense_kfac_direction(a, g, grad, 0.05, mode)
        torch.testing.assert_close(grad_matrices(model)[name], expected)


@pytest.mark.parametrize("decomposition", [rkfac.ExactEigh(), rkfac.SymmetricRandomizedEVD(rank=40, oversample=8)], ids=repr)
def test_bfloat16_apply_rounds_wide_layers_only(decomposition: rkfac.Decomposition) -> None:
    """bfloat16 rounds each product to 2⁻⁹. Where the gradient lies in the top modes the damped
    inverse cancels most of it, by up to (1 + 1/δ)² = 121 at relative damping 0.1, so the bound
    is (1 + 1/δ)² · 2⁻⁹ ≈ 0.24; this toy layer (inputs of dimension 6, a few dominant modes) is
    near that case, at about 0.1. A wrong expansion would be off by O(1); the exact algebra is
    tested in test_lowrank. Layers narrower than LOW_PRECISION_MIN_DIM on a side are solved in
    float32: the same bits as without the option."""
    torch.manual_seed(0)
    width = rkfac.kfac.LOW_PRECISION_MIN_DIM
    x, y = torch.randn(256, 6), torch.randint(0, 4, (256,))
    directions = []
    for apply_dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4))
        pre = rkfac.KFACPreconditioner(model, decomposition=decomposition, clip=None, apply_dtype=apply_dtype)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        directions.append(grad_matrices(model))
    for name, reference in directions[0].items():
        error = float((directions[1][name] - reference).norm() / reference.norm())
        if name == "2":  # the one layer ≥ 128 on both sides
            assert directions[1][name].dtype == torch.float32 and 0 < error < 0.24, error
        else:
            assert torch.equal(directions[1][name], reference), name


def test_truncated_direction_uses_low_rank_plus_damping() -> None:
    """rank < d: the direction is the dense solve with U D Uᵀ (not the full factor)."""
    model = mlp()
    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(rank=3), damping=0.1, clip=None)
    backward(model, 0)
    grads = grad_matrices(model)
    pre.step()
    for name, (a_pairs, g_pairs) in pre.eigenpairs().items():
        lam_a, lam_g = 0.1 * a_pairs.top, 0.1 * g_pairs.top
        a_dense = a_pairs.dense() + lam_a * torch.eye(a_pairs.dim, dtype=DTYPE)
        g_dense = g_pairs.dense() + lam_g * torch.eye(g_pairs.dim, dtype=DTYPE)
        expected = torch.linalg.solve(a_dense, torch.linalg.solve(g_dense, grads[name]).T).T
        torch.testing.assert_close(grad_matrices(model)[name], expected)


def test_exponential_average_and_update_schedule() -> None:
    """F₁ = S₁, F_k = ρF_{k−1} + (1−ρ)S_k, updated only on factor steps (here steps 0, 2, 4).

    The first layer's A statistic depends only on the input batch, so it is computed directly.
    """
    model = mlp()
    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(), factor_decay=0.8, factor_every=2, inverse_every=4)
    for step in range(5):
        backward(model, step)
        pre.step()
        if step == 0:
            torch.testing.assert_close(pre.factors()["0"][0], _first_layer_statistics(0))
    expected = _first_layer_statistics(0)
    for step in (2, 4):
        expected = 0.8 * expected + 0.2 * _first_layer_statistics(step)
    torch.testing.assert_close(pre.factors()["0"][0], expected)


def _first_layer_statistics(seed: int) -> Tensor:
    x, _ = batch(seed)
    rows = with_ones(x)
    return rows.T @ rows / len(rows)


def test_decompositions_recomputed_on_inverse_steps_only() -> None:
    model = mlp()
    calls: list[int] = []

    class Counting(rkfac.ExactEigh):
        def decompose(self, factor, generator=None, step=0):  # type: ignore[no-untyped-def]
            calls.append(step)
            return super().decompose(factor, generator, step)

    pre = rkfac.KFACPreconditioner(model, decomposition=Counting(), factor_every=1, inverse_every=3)
    for step in range(7):
        backward(model, step)
        pre.step()
    layers, factors = 3, 2
    assert sorted(set(calls)) == [0, 3, 6]
    assert len(calls) == 3 * layers * factors


def test_first_step_is_defined_even_if_not_an_inverse_step() -> None:
    model = mlp()
    pre = rkfac.KFACPreconditioner(model, factor_every=1, inverse_every=lambda step: 100)
    backward(model, 0)
    before = grad_matrices(model)
    pre.step()
    after = grad_matrices(model)
    assert len(pre.eigenpairs()) == 3
    assert all(not torch.equal(before[k], after[k]) and torch.isfinite(after[k]).all() for k in before)


def test_schedules_given_as_callables_are_called_with_the_step() -> None:
    seen: dict[str, list[int]] = {"damping": [], "factor_every": [], "inverse_every": []}

    def record(name: str, value: float) -> object:
        def schedule(step: int) -> float:
            seen[name].append(step)
            return value

        return schedule

    model = mlp()
    pre = rkfac.KFACPreconditioner(
        model,
        damping=record("damping", 0.1),
        factor_every=record("factor_every", 1),
        inverse_every=record("inverse_every", 2),
        clip=None,
    )
    for step in range(3):
        backward(model, step)
        pre.step()
    assert sorted(set(seen["damping"])) == [0, 1, 2]
    assert sorted(set(seen["inverse_every"])) == [0, 1, 2]
    assert set(seen["factor_every"]) == {0, 1, 2}

    # A damping schedule changes the direction exactly as the fixed value would.
    fixed, scheduled = mlp(), mlp()
    pre_fixed = rkfac.KFACPreconditioner(fixed, damping=0.3, clip=None)
    pre_scheduled = rkfac.KFACPreconditioner(scheduled, damping=lambda step: 0.3 if step == 0 else 1.0, clip=None)
    for model, pre in ((fixed, pre_fixed), (scheduled, pre_scheduled)):
        backward(model, 0)
        pre.step()
    for name, grad in grad_matrices(fixed).items():
        torch.testing.assert_close(grad_matrices(scheduled)[name], grad)


def test_bad_schedule_value_names_the_step() -> None:
    model = mlp()
    pre = rkfac.KFACPreconditioner(model, damping=lambda step: -1.0)
    backward(model, 0)
    with pytest.raises(ValueError, match=r"damping \(at step 0\) must be > 0.0, got -1.0"):
        pre.step()


@pytest.mark.parametrize("clip_value", [1e-4, 10.0])
def test_rms_clip_scales_each_layer(clip_value: float) -> None:
    reference, clipped = mlp(), mlp()
    pre_ref = rkfac.KFACPreconditioner(reference, clip=None)
    pre_clip = rkfac.KFACPreconditioner(clipped, clip="rms", clip_value=clip_value)
    for model, pre in ((reference, pre_ref), (clipped, pre_clip)):
        backward(model, 0)
        pre.step()
    for name, direction in grad_matrices(reference).items():
        rms = float(direction.pow(2).mean().sqrt())
        torch.testing.assert_close(grad_matrices(clipped)[name], direction * min(1.0, clip_value / rms))


@pytest.mark.parametrize("clip_value", [1e-6, 1e3])
def test_kl_clip_scales_globally(clip_value: float) -> None:
    reference, clipped = mlp(), mlp()
    pre_ref = rkfac.KFACPreconditioner(reference, clip=None)
    pre_clip = rkfac.KFACPreconditioner(clipped, clip="kl", clip_value=clip_value, lr=0.5)
    backward(reference, 0)
    raw = grad_matrices(reference)
    pre_ref.step()
    backward(clipped, 0)
    pre_clip.step()
    directions = grad_matrices(reference)
    quadratic = sum(float((directions[k] * raw[k]).sum()) for k in raw) * 0.5**2
    scale = min(1.0, math.sqrt(clip_value / quadratic))
    for name, direction in directions.items():
        torch.testing.assert_close(grad_matrices(clipped)[name], direction * scale)


def run_steps(seed: int, steps: int = 6, decomposition: rkfac.Decomposition | None = None) -> list[Tensor]:
    model = mlp(dtype=torch.float32)
    decomposition = decomposition or rkfac.SymmetricRandomizedEVD(rank=3, oversample=2, power_iters=1)
    opt = rkfac.KFAC(model, lr=0.1, decomposition=decomposition, factor_every=1, inverse_every=2, seed=seed)
    for step in range(steps):
        backward(model, step)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_same_seed_gives_bitwise_identical_parameters() -> None:
    first, second, other = run_steps(seed=5), run_steps(seed=5), run_steps(seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_state_dict_round_trip_continues_the_run_exactly() -> None:
    decomposition = rkfac.RandomizedSVD(rank=3, oversample=2, power_iters=1)

    def make() -> tuple[nn.Module, rkfac.KFAC]:
        model = mlp(dtype=torch.float32)
        return model, rkfac.KFAC(
            model, lr=0.1, momentum=0.9, weight_decay=1e-3, decomposition=decomposition, factor_every=2, inverse_every=3, seed=1
        )

    model, opt = make()
    for step in range(10):
        backward(model, step)
        opt.step()
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, opt = make()
    for step in range(5):
        backward(model, step)
        opt.step()
    saved = saved_and_loaded({"model": model.state_dict(), "optimizer": opt.state_dict()})
    model, opt = make()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    assert opt.preconditioner.steps == 5
    for step in range(5, 10):
        backward(model, step)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters()))


def test_preconditioner_state_dict_holds_step_factors_and_decompositions() -> None:
    model = mlp()
    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(rank=5))
    backward(model, 0)
    pre.step()
    state = pre.state_dict()
    fresh = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(rank=5))
    fresh.load_state_dict(state)
    assert fresh.steps == 1
    for name, (a, g) in pre.factors().items():
        assert torch.equal(fresh.factors()[name][0], a) and torch.equal(fresh.factors()[name][1], g)
        assert torch.equal(fresh.eigenpairs()[name][0].vectors, pre.eigenpairs()[name][0].vectors)
    other = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="do not match"):
        rkfac.KFACPreconditioner(other).load_state_dict(state)


def version_1(state: dict) -> dict:
    """A state_dict as rkfac wrote it before the factor trackers (no "version" key)."""
    layers = {}
    for name, saved in state["layers"].items():
        layers[name] = {
            "factors": {key: saved[key]["factor"] for key in "AG" if saved[key]["factor"] is not None},
            "eigen": {key: saved[key]["pairs"] for key in "AG" if saved[key]["pairs"] is not None},
            "online": {key: saved[key]["online"] for key in "AG" if saved[key]["online"] is not None},
        }
    return {"steps": state["steps"], "layers": layers, "mc_generator": state["mc_generator"], "health": state["health"]}


@pytest.mark.parametrize(
    "decomposition", [rkfac.SymmetricRandomizedEVD(rank=5, oversample=2), rkfac.BrandUpdate(rank=5)], ids=["sre", "brand"]
)
def test_a_version_1_state_dict_loads_and_continues_the_run_exactly(decomposition: rkfac.Decomposition) -> None:
    def make() -> tuple[nn.Module, rkfac.KFACPreconditioner]:
        model = mlp()
        return model, rkfac.KFACPreconditioner(model, decomposition=decomposition, factor_every=1, inverse_every=2)

    model, pre = make()
    for step in range(3):
        backward(model, step)
        pre.step()
    state = pre.state_dict()
    assert state["version"] == 2
    old_model, old = make()
    old.load_state_dict(version_1(state))
    for step in range(3, 6):  # the same gradients into both: the same factors and directions
        backward(model, step)
        backward(old_model, step)
        pre.step()
        old.step()
        for name, grad in grad_matrices(model).items():
            assert torch.equal(grad, grad_matrices(old_model)[name])
    with pytest.raises(ValueError, match="version 7"):
        old.load_state_dict({**state, "version": 7})


def test_remove_takes_hooks_off() -> None:
    model = mlp()
    pre = rkfac.KFACPreconditioner(model, factor_every=1)
    backward(model, 0)
    pre.step()
    factors = {k: (a.clone(), g.clone()) for k, (a, g) in pre.factors().items()}
    pre.remove()
    assert all(not m._forward_hooks for m in model.modules())
    backward(model, 1)
    pre.step()
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, factors[name][0]) and torch.equal(g, factors[name][1])


def test_eval_mode_and_no_grad_capture_nothing() -> None:
    model = mlp()
    pre = rkfac.KFACPreconditioner(model, factor_every=1)
    model.eval()
    backward(model, 0)
    plain = grad_matrices(model)
    pre.step()
    assert pre.factors() == {}
    for name, grad in grad_matrices(model).items():
        assert torch.equal(grad, plain[name])  # no statistics yet: plain gradient
    model.train()
    with torch.no_grad():
        model(100 * batch(0)[0])  # would swamp A if it were captured
    backward(model, 1)
    pre.step()
    reference_model = mlp()
    reference = rkfac.KFACPreconditioner(reference_model, factor_every=1)
    reference_model.eval()
    backward(reference_model, 0)
    reference.step()
    reference_model.train()
    backward(reference_model, 1)
    reference.step()
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, reference.factors()[name][0]) and torch.equal(g, reference.factors()[name][1])


def test_inplace_activations_give_the_same_statistics() -> None:
    plain, inplace = mlp(inplace=False), mlp(inplace=True)
    pre_plain = rkfac.KFACPreconditioner(plain, clip=None)
    pre_inplace = rkfac.KFACPreconditioner(inplace, clip=None)
    for model, pre in ((plain, pre_plain), (inplace, pre_inplace)):
        backward(model, 0)
        pre.step()
    for name, (a, g) in pre_plain.factors().items():
        torch.testing.assert_close(pre_inplace.factors()[name][0], a)
        torch.testing.assert_close(pre_inplace.factors()[name][1], g)


def test_inplace_relu_cnn_gives_the_same_statistics_and_direction() -> None:
    def cnn(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(4, 4, 3), nn.ReLU(inplace=inplace),
            nn.Flatten(), nn.Linear(4 * 9, 3),
        ).to(DTYPE)  # fmt: skip

    x, y = torch.randn(6, 2, 5, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    grads = []
    for inplace in (False, True):
        model = cnn(inplace)
        pre = rkfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        grads.append(([p.grad for p in model.parameters()], pre.factors()))
    (plain_grads, plain_factors), (inplace_grads, inplace_factors) = grads
    for name, (a, g) in plain_factors.items():
        torch.testing.assert_close(inplace_factors[name][0], a)
        torch.testing.assert_close(inplace_factors[name][1], g)
    for plain, inplace in zip(plain_grads, inplace_grads, strict=True):
        torch.testing.assert_close(inplace, plain)


def test_other_parameters_keep_their_plain_gradient_and_skip_works() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 4, 3, padding=2),  # 5 × 5 → 3 × 3
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
        nn.Linear(5, 2),
    ).double()
    with pytest.warns(UserWarning, match=r"plain gradient: 3 \(ConvTranspose2d\)") as caught:
        pre = rkfac.KFACPreconditioner(model, skip=["6"])
    assert len(caught) == 1  # reported once, BatchNorm not counted as unsupported
    assert pre.layer_names == ["0", "5"] and pre.unsupported == [("3", "ConvTranspose2d")]
    assert pre.describe().splitlines() == [
        "0: Conv2d, A 28 × 28, G 4 × 4",
        "5: Linear, A 37 × 37, G 5 × 5",
        "not preconditioned: 3 (ConvTranspose2d)",
    ]
    skipped = rkfac.KFACPreconditioner(model, skip=[nn.Conv2d, nn.ConvTranspose2d])  # on purpose: no warning
    assert skipped.layer_names == ["5", "6"]
    x = torch.randn(8, 3, 7, 7, dtype=DTYPE)
    F.cross_entropy(model(x), torch.randint(0, 2, (8,))).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    pre.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p.grad, plain[name])
        assert changed == (name.split(".")[0] in {"0", "5"}), name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"damping": -0.1}, "damping must be > 0.0, got -0.1"),
        ({"damping": 0.0}, "damping must be > 0.0, got 0.0"),
        ({"factor_decay": 1.0}, "factor_decay must be < 1.0, got 1.0"),
        ({"factor_decay": -0.5}, "factor_decay must be >= 0.0, got -0.5"),
        ({"damping_mode": "tikhonov"}, "damping_mode must be one of .*got 'tikhonov'"),
        ({"clip": "norm"}, "clip must be one of .*got 'norm'"),
        ({"clip_value": 0}, "clip_value must be > 0.0, got 0"),
        ({"fisher": "true"}, "fisher must be one of .*got 'true'"),
        ({"loss_reduction": "none"}, "loss_reduction must be one of .*got 'none'"),
        ({"factor_every": 0}, "factor_every must be >= 1, got 0"),
        ({"inverse_every": 1.5}, "inverse_every must be an integer, got 1.5"),
        ({"skip": [3]}, "skip entries must be .*got 3"),
        ({"decomposition": "eigh"}, "decomposition must be an rkfac Decomposition.*got 'eigh'"),
        ({"seed": "zero"}, "seed must be an integer, got 'zero'"),
        ({"apply_dtype": "bf16"}, "apply_dtype must be None or a floating torch.dtype.*got 'bf16'"),
        ({"apply_dtype": torch.int8}, "apply_dtype must be None or a floating torch.dtype.*got torch.int8"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rkfac.KFACPreconditioner(mlp(), **options)


def test_model_with_nothing_to_precondition_is_refused() -> None:
    with pytest.raises(ValueError, match=r"has no trainable layer to precondition \(rkfac handles nn\.Linear"):
        rkfac.KFACPreconditioner(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))
    with pytest.raises(ValueError, match=r"after skip=\['\*'\]"):
        rkfac.KFACPreconditioner(mlp(), skip=["*"])


def test_model_in_float64_keeps_float64_factors() -> None:
    model = mlp(dtype=torch.float64)
    pre = rkfac.KFACPreconditioner(model)
    backward(model, 0)
    pre.step()
    assert all(a.dtype == torch.float64 for a, _ in pre.factors().values())


def test_phase_timer_accounts_statistics_decomposition_and_preconditioning() -> None:
    from rkfac.timing import PhaseTimer

    model = mlp()
    timer = PhaseTimer()
    pre = rkfac.KFACPreconditioner(model, factor_every=2, inverse_every=2, timer=timer)
    backward(model, 0)
    pre.step()
    first = timer.reset()
    assert set(first) == {"statistics", "decomposition", "precondition"} and all(v > 0 for v in first.values())
    backward(model, 1)  # not a factor step: no statistics captured
    pre.step()
    assert "statistics" not in timer.reset()
