"""The adaptive step (rkfac.KFAC with loss=...) against dense references: α and μ minimise the
quadratic model built from an explicit GGN, ρ is the measured over the predicted change, λ
follows the Levenberg–Marquardt rule, the factor damping follows λ, and everything it needs
is saved, averaged over ranks and refused by name when it cannot be honoured."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rkfac
from rkfac.adaptive import AdaptiveOptions, AdaptiveStep
from rkfac.damping import factor_dampings, tikhonov_dampings
from rkfac.experiments.models import build_model
from rkfac.lowrank import BlockEigenpairs, Eigenpairs
from rkfac.seeding import derived_seed
from tests.gloo import run_ranks
from tests.test_quadratic_model import dense_ggn, flat_params

WEIGHT_DECAY = 0.01


def make_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()


def batch(seed: int, n: int = 10, tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of 4 features, or with ``tokens`` a sequence batch (n, tokens, 4) whose targets
    mark about a third of the positions, and all of sample 1's, ignore_index (−100)."""
    generator = torch.Generator().manual_seed(seed)
    if not tokens:
        return torch.randn(n, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator)
    x = torch.randn(n, tokens, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n, tokens), generator=generator)
    padding = torch.rand(n, tokens, generator=generator) < 0.3
    padding[1] = True
    return x, y.masked_fill(padding, -100)


def make_optimizer(model: nn.Module, **options: object) -> rkfac.KFAC:
    settings = {
        "loss": "cross_entropy",
        "decomposition": rkfac.ExactEigh(),
        "factor_every": 1,
        "inverse_every": 1,
        "weight_decay": WEIGHT_DECAY,
        **options,
    }
    return rkfac.KFAC(model, **settings)


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def minimise(matrix: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The coefficients minimising bᵀc + ½cᵀQc, μ (the second) on its nearest bound of [0, 0.95]."""
    coefficients = torch.linalg.solve(matrix, -b)
    if len(b) == 2 and not 0.0 <= coefficients[1] <= 0.95:
        mu = min(max(float(coefficients[1]), 0.0), 0.95)
        coefficients = torch.tensor([-(b[0] + matrix[0, 1] * mu) / matrix[0, 0], mu], dtype=torch.float64)
    return coefficients


def importance_draws(
    logits: torch.Tensor, count: int, seed: int, step: int, targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws of ``rkfac.curvature_samples.importance_samples``, written out: q mixes each
    sample's 1 − Σp² (normalised; summed over its positions not marked −100 in ``targets``) 9:1
    with uniform; the m draws with replacement come from the generator seeded by
    (seed, "curvature-samples", step). Returns the draws and their q."""
    probs = logits.detach().softmax(-1).double()
    per_row = 1 - probs.pow(2).sum(-1)
    if targets is not None:
        per_row = per_row * (targets != -100)
    trace = per_row.reshape(len(per_row), -1).sum(1)
    q = 0.9 * trace / trace.sum() + 0.1 / len(trace)
    generator = torch.Generator().manual_seed(derived_seed(seed, "curvature-samples", step))
    draws = torch.multinomial(q, count, replacement=True, generator=generator)
    return draws, q[draws]


def sampled_ggn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    logits: torch.Tensor,
    sampling: str,
    samples: int,
    reduction: str,
    seed: int,
    step: int,
) -> torch.Tensor:
    """The curvature the step should use: the dense GGN of the first samples (scaled n/m for a
    sum), of the whole batch, or Σₖ ωₖ C_{sₖ} over importance draws, C_s one sample's GGN summed
    over its positions and ωₖ = 1/(m N qₖ) for a mean (N the positions the loss keeps: those not
    marked −100), 1/(m qₖ) for a sum."""
    if samples >= len(x) or sampling == "first":
        curvature = dense_ggn(model, x[:samples], y[:samples], "cross_entropy", reduction)
        return curvature * len(x) / len(x[:samples]) if reduction == "sum" else curvature  # a sum stands for the batch's
    draws, q = importance_draws(logits, samples, seed, step, y)
    weights = 1 / (samples * q) / (int((y != -100).sum()) if reduction == "mean" else 1)
    with torch.random.fork_rng():  # a copy without the step's forward hook (its passes would be caught as the batch's)
        twin = make_model()
    twin.load_state_dict(model.state_dict())
    return sum(w * dense_ggn(twin, x[s : s + 1], y[s : s + 1], "cross_entropy", "sum") for w, s in zip(weights, draws.tolist()))


@pytest.mark.parametrize(
    ("samples", "reduction", "sampling", "tokens", "scale"),
    [
        (10_000, "mean", "importance", 0, 1.0),
        (4, "mean", "first", 0, 1.0),
        (4, "sum", "first", 0, 1.0),
        (4, "mean", "importance", 0, 1.0),
        (4, "sum", "importance", 0, 1.0),
        (10_000, "mean", "importance", 3, 1.0),
        (4, "mean", "first", 3, 1.0),
        (4, "mean", "importance", 3, 1.0),
        (4, "sum", "importance", 3, 1.0),
        (10_000, "mean", "importance", 0, 0.3),
    ],
)  # 10 000: all of it; tokens: a sequence batch with padded positions (ignore_index); scale: step_scale s
def test_each_step_takes_the_alpha_and_mu_that_minimise_the_dense_quadratic_model(
    samples: int, reduction: str, sampling: str, tokens: int, scale: float
) -> None:
    model = make_model()
    opt = make_optimizer(
        model,
        curvature_samples=samples,
        curvature_sampling=sampling,
        initial_damping=0.3,
        loss_reduction=reduction,
        step_scale=scale,
    )
    previous: torch.Tensor | None = None
    for step in range(3):
        x, y = batch(step, tokens=tokens)
        opt.zero_grad()
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction=reduction).backward()
        theta, _ = flat_params(model)
        g = flat([p.grad for p in model.parameters()]).clone() + WEIGHT_DECAY * theta
        damping = opt.adaptive.damping  # type: ignore[union-attr]
        gradient = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).clone()
        curvature = sampled_ggn(model, x, y, logits, sampling, samples, reduction, opt.adaptive.seed, step)  # type: ignore[union-attr]
        opt.step(inputs=x, targets=y)
        # the factors were damped by λ + η, split as "pi" splits it: a dense Kronecker solve
        a, g_factor = opt.preconditioner.factors()["0"]  # type: ignore[attr-defined]
        pi = math.sqrt((a.trace() / a.shape[0]) / (g_factor.trace() / g_factor.shape[0]))
        root = math.sqrt(damping + WEIGHT_DECAY)
        eye = torch.eye
        solved = torch.linalg.solve(g_factor + root / pi * eye(8, dtype=torch.float64), gradient)
        solved = torch.linalg.solve(a + pi * root * eye(5, dtype=torch.float64), solved.T).T
        torch.testing.assert_close(torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1), solved)
        direction = -(flat([p.grad for p in model.parameters()]) + WEIGHT_DECAY * theta)
        update = flat_params(model)[0] - theta
        shifted = curvature + (damping + WEIGHT_DECAY) * torch.eye(len(theta), dtype=torch.float64)
        vectors = [direction] if previous is None else [direction, previous]
        matrix = torch.tensor([[float(u @ shifted @ v) for v in vectors] for u in vectors], dtype=torch.float64)
        b = torch.tensor([float(g @ v) for v in vectors], dtype=torch.float64)
        coefficients = scale * minimise(matrix, b)  # M's minimiser over span(Δ, δ₀), shortened by s
        expected = sum(c * v for c, v in zip(coefficients, vectors, strict=True))
        torch.testing.assert_close(update, expected, rtol=1e-7, atol=1e-12)
        record = opt.adaptive.last  # type: ignore[union-attr]
        assert record.scale == scale
        assert record.alpha == pytest.approx(float(coefficients[0]), rel=1e-7)
        assert record.momentum == (0.0 if previous is None else pytest.approx(float(coefficients[1]), rel=1e-7))
        assert record.predicted == pytest.approx(float(g @ update + 0.5 * update @ shifted @ update), rel=1e-7)
        previous = update


def test_rho_is_the_measured_over_the_predicted_change_of_the_objective() -> None:
    model = make_model()
    opt = make_optimizer(model, curvature_samples=10_000)
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()

    def objective() -> float:
        with torch.no_grad():
            decay = 0.5 * WEIGHT_DECAY * float(flat_params(model)[0].pow(2).sum())
            return float(F.cross_entropy(model(x), y)) + decay

    before = objective()
    opt.step(inputs=x, targets=y)
    record = opt.adaptive.last  # type: ignore[union-attr]
    assert record.rho is not None and math.isfinite(record.rho)
    assert record.rho == pytest.approx((objective() - before) / record.predicted, rel=1e-9)


def test_damping_moves_by_the_levenberg_marquardt_rule_within_its_bounds() -> None:
    step = AdaptiveStep(make_model(), [], AdaptiveOptions(loss="mse", initial_damping=1.0, max_damping=2.0))
    omega = 0.95**5
    step._adjust(actual=-0.9, predicted=-1.0)  # ρ = 0.9 > 3/4: shrink
    assert step.damping == pytest.approx(omega)
    step._adjust(actual=-0.5, predicted=-1.0)  # ρ = 0.5: keep
    assert step.damping == pytest.approx(omega)
    step._adjust(actual=0.1, predicted=-1.0)  # ρ < 1/4: grow
    assert step.damping == pytest.approx(1.0)
    for _ in range(10):
        step._adjust(actual=float("inf"), predicted=-1.0)  # a blown-up loss grows it, up to the bound
    assert step.damping == 2.0


def pairs(values: list[float]) -> Eigenpairs:
    d = len(values)
    return Eigenpairs(torch.eye(d, dtype=torch.float64), torch.tensor(values, dtype=torch.float64), sum(values), max(values))


def test_tikhonov_damping_splits_lambda_so_the_product_is_lambda_in_both_modes() -> None:
    a, g = pairs([4.0, 1.0, 0.5]), pairs([0.02, 0.01])
    lam = 0.3
    pi_a, pi_g = tikhonov_dampings("pi", lam, a, g)
    assert (pi_a, pi_g) == factor_dampings("pi", lam, a, g)  # pi already means λ_A λ_G = δ
    rel_a, rel_g = tikhonov_dampings("relative", lam, a, g)
    assert rel_a * rel_g == pytest.approx(lam) and pi_a * pi_g == pytest.approx(lam)
    assert rel_a / rel_g == pytest.approx(4.0 / 0.02)  # each follows its factor's λ_max
    blocks = BlockEigenpairs(
        torch.eye(2, dtype=torch.float64).repeat(2, 1, 1),
        torch.tensor([[2.0, 1.0], [8.0, 1.0]], dtype=torch.float64),
        traces=torch.tensor([3.0, 9.0], dtype=torch.float64),
        tops=torch.tensor([2.0, 8.0], dtype=torch.float64),
    )
    block_a, block_g = tikhonov_dampings("relative", lam, blocks, blocks)
    torch.testing.assert_close(block_a * block_g, torch.full((2,), lam, dtype=torch.float64))


def test_the_floor_raises_each_factor_damping_to_a_fraction_of_its_top_eigenvalue() -> None:
    a, g = pairs([4.0, 1.0, 0.5]), pairs([0.02, 0.01])
    tiny = 1e-8
    floor_a, floor_g = tikhonov_dampings("pi", tiny, a, g, floor=1e-3)
    assert (floor_a, floor_g) == (pytest.approx(4e-3), pytest.approx(2e-5))  # both were below their floor
    assert tikhonov_dampings("pi", 10.0, a, g, floor=1e-3) == tikhonov_dampings("pi", 10.0, a, g)  # above it: unchanged
    blocks = BlockEigenpairs(
        torch.eye(2, dtype=torch.float64).repeat(2, 1, 1),
        torch.tensor([[2.0, 1.0], [8.0, 1.0]], dtype=torch.float64),
        traces=torch.tensor([3.0, 9.0], dtype=torch.float64),
        tops=torch.tensor([2.0, 8.0], dtype=torch.float64),
    )
    block_a, _ = tikhonov_dampings("relative", tiny, blocks, blocks, floor=0.01)
    torch.testing.assert_close(block_a, torch.tensor([0.02, 0.08], dtype=torch.float64))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 0.1}, "drop {'lr': 0.1}"),
        ({"momentum": 0.9}, "drop {'momentum': 0.9}"),
        ({"damping": 0.01}, "initial_damping"),
        ({"clip": "kl"}, "clip='kl'"),
        ({"fallback": torch.optim.AdamW}, "fallback"),
        ({"grad_scaler": torch.amp.GradScaler("cpu")}, "GradScaler"),
        ({"loss": "hinge"}, "'hinge'"),
        ({"initial_damping": 10.0, "max_damping": 1.0}, "initial_damping 10.0"),
        ({"step_scale": 0.0}, "step_scale"),
        ({"step_scale": 1.5}, "step_scale"),
        ({"loss": None, "curvature_samples": 8}, "['curvature_samples'] are the adaptive step's options: give loss="),
        ({"loss": None, "step_scale": 0.5}, "['step_scale'] are the adaptive step's options"),
    ],
)
def test_settings_the_adaptive_step_cannot_honour_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        rkfac.KFAC(make_model(), **{"loss": "cross_entropy", **options})


def test_an_lr_scheduler_or_a_step_scale_schedule_shortens_the_chosen_step() -> None:
    """The param group's lr is the step scale s: after a StepLR halves it, the step is half of
    the step an unscheduled twin takes from the same state; a callable step_scale does the same;
    a scheduler taking s above 1 is refused by value."""
    twins = [make_model() for _ in range(3)]
    plain = make_optimizer(twins[0], curvature_samples=10_000)
    scheduled = make_optimizer(twins[1], curvature_samples=10_000)
    scheduler = torch.optim.lr_scheduler.StepLR(scheduled, step_size=1, gamma=0.5)
    callable_scale = make_optimizer(twins[2], curvature_samples=10_000, step_scale=lambda step: 1.0 if step == 0 else 0.5)
    updates = []
    for step in range(2):
        x, y = batch(step)
        before = [flat_params(model)[0] for model in twins]
        for model, opt in zip(twins, (plain, scheduled, callable_scale), strict=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(inputs=x, targets=y)
        scheduler.step()
        updates.append([flat_params(model)[0] - theta for model, theta in zip(twins, before, strict=True)])
    first, second = updates
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], first[2])  # s = 1 for all three at step 0
    torch.testing.assert_close(second[1], 0.5 * second[0], rtol=1e-10, atol=1e-14)
    assert torch.equal(second[1], second[2])
    assert scheduled.adaptive.last.scale == 0.5  # type: ignore[union-attr]
    scheduled.param_groups[0]["lr"] = 2.0
    x, y = batch(2)
    F.cross_entropy(twins[1](x), y).backward()
    with pytest.raises(ValueError, match=r"must be in \(0, 1\], got 2.0"):
        scheduled.step(inputs=x, targets=y)


def test_the_step_asks_for_the_batch_and_the_fixed_step_refuses_one() -> None:
    model = make_model()
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"opt\.step\(inputs=x, targets=y\)"):
        make_optimizer(model).step()
    with pytest.raises(ValueError, match="loss="):
        rkfac.KFAC(model).step(inputs=x, targets=y)


def run_steps(model: nn.Module, opt: rkfac.KFAC, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(inputs=x, targets=y)


def test_between_measurements_the_model_keeps_the_curvature_per_unit_direction_and_runs_no_pass() -> None:
    model = make_model()
    opt = make_optimizer(model, curvature_samples=6, damping_every=5, model_every=2)
    passes = []
    model.register_forward_hook(lambda *_: passes.append(1))
    unit: torch.Tensor | None = None  # vᵢᵀCvⱼ / (‖vᵢ‖‖vⱼ‖) of the last measuring step, from the dense GGN
    previous: torch.Tensor | None = None
    for step in range(11):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        theta = flat_params(model)[0]
        g = flat([p.grad for p in model.parameters()]).clone() + WEIGHT_DECAY * theta
        damping = opt.adaptive.damping  # type: ignore[union-attr]
        curvature = dense_ggn(model, x[:6], y[:6], "cross_entropy", "mean")
        passes.clear()
        opt.step(inputs=x, targets=y)
        record = opt.adaptive.last  # type: ignore[union-attr]
        update = flat_params(model)[0] - theta
        direction = -(flat([p.grad for p in model.parameters()]) + WEIGHT_DECAY * theta)
        vectors = [direction] if previous is None else [direction, previous]
        norms = torch.stack([v.norm() for v in vectors])
        gram = torch.tensor([[float(u @ v) for v in vectors] for u in vectors], dtype=torch.float64)
        if step % 2 == 0:  # measured: the forward-mode passes ran, C is this batch's
            assert passes and math.isfinite(record.predicted)
            measured = torch.tensor([[float(u @ curvature @ v) for v in vectors] for u in vectors], dtype=torch.float64)
            unit = measured / torch.outer(norms, norms)
        else:  # between: the last Ĉ scaled to this step's Δ and δ₀, exact inner products, no pass
            assert not passes and math.isnan(record.predicted)
            assert unit is not None
            if len(unit) < len(vectors):  # measured before there was a δ₀ (step 0): Δ alone, μ = 0
                vectors, norms, gram = vectors[:1], norms[:1], gram[:1, :1]
                assert record.momentum == 0.0
            measured = unit * torch.outer(norms, norms)
        coefficients = minimise(measured + (damping + WEIGHT_DECAY) * gram, torch.stack([g @ v for v in vectors]))
        expected = sum(c * v for c, v in zip(coefficients, vectors, strict=True))
        torch.testing.assert_close(update, expected, rtol=1e-7, atol=1e-12)
        # λ adjusts on the measuring step whose window (s − 2, s] holds a multiple of T = 5: steps 0, 6, 10
        assert (record.rho is not None) == (step in (0, 6, 10)), step
        previous = update


@pytest.mark.parametrize("model_every", [1, 3])
def test_a_restored_optimizer_continues_bitwise_and_the_training_random_stream_is_untouched(model_every: int) -> None:
    model = make_model(dropout=0.3)
    opt = make_optimizer(model, curvature_samples=6, damping_every=2, model_every=model_every)
    run_steps(model, opt, range(4))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # the live state moves on with the training
    rng = torch.get_rng_state()
    run_steps(model, opt, range(4, 8))
    uninterrupted = flat_params(model)[0]

    twin = make_model(dropout=0.3)
    twin.load_state_dict(saved_model)
    twin_opt = make_optimizer(twin, curvature_samples=6, damping_every=2, model_every=model_every)
    twin_opt.load_state_dict(saved_opt)
    torch.set_rng_state(rng)
    run_steps(twin, twin_opt, range(4, 8))
    assert torch.equal(flat_params(twin)[0], uninterrupted)
    assert twin_opt.adaptive.damping == opt.adaptive.damping  # type: ignore[union-attr]

    x, y = batch(9)
    twin_opt.zero_grad()
    F.cross_entropy(twin(x), y).backward()
    state = torch.get_rng_state()
    twin_opt.step(inputs=x, targets=y)
    assert torch.equal(torch.get_rng_state(), state)  # its own passes drew from a forked stream


def test_state_of_a_fixed_step_optimizer_is_refused_by_an_adaptive_one() -> None:
    fixed = rkfac.KFAC(make_model())
    with pytest.raises(ValueError, match="adaptive step"):
        make_optimizer(make_model()).load_state_dict(fixed.state_dict())


def train_on(model: nn.Module, opt: rkfac.KFAC, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """``steps`` adaptive steps on one batch; the losses before each, every step taken (not skipped)."""
    losses: list[float] = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(inputs=x, targets=y)
        losses.append(float(loss.detach()))
        assert not opt.adaptive.last.skipped  # type: ignore[union-attr]
        assert math.isfinite(opt.adaptive.last.alpha)  # type: ignore[union-attr]
    return losses


def test_adaptive_kfac_trains_a_small_problem_without_a_learning_rate() -> None:
    model = make_model()
    opt = make_optimizer(model, weight_decay=0.0)
    x = batch(0, n=64)[0]
    y = x[:, :3].argmax(1)  # a rule the network can learn
    losses = train_on(model, opt, x, y, steps=40)
    assert losses[-1] < 0.5 * losses[0]


GLOBAL = 12


def _train_adaptive(rank: int, world_size: int) -> list[torch.Tensor]:
    model = make_model()
    wrapped = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    opt = make_optimizer(wrapped, curvature_samples=10_000, damping_every=1)
    share = GLOBAL // world_size
    part = slice(rank * share, (rank + 1) * share)
    for step in range(4):
        x, y = batch(step, n=GLOBAL)
        opt.zero_grad()
        F.cross_entropy(wrapped(x[part]), y[part]).backward()
        opt.step(inputs=x[part], targets=y[part])
    return [p.detach().clone() for p in model.parameters()] + [torch.tensor(opt.adaptive.damping)]  # type: ignore[union-attr]


def test_two_ranks_take_the_step_one_process_takes_over_the_global_batch(tmp_path: Path) -> None:
    ranks = run_ranks(_train_adaptive, 2, tmp_path)
    for mine, theirs in zip(ranks[0], ranks[1], strict=True):
        assert torch.equal(mine, theirs)
    alone = _train_adaptive(0, 1)
    for distributed, single in zip(ranks[0], alone, strict=True):
        torch.testing.assert_close(distributed, single, rtol=1e-9, atol=1e-12)


def test_the_command_line_refuses_a_fixed_step_setting_for_an_adaptive_optimizer() -> None:
    from rkfac.experiments.presets import resolve_config

    with pytest.raises(ValueError, match=re.escape("drop {'lr': 0.1}")):
        resolve_config("sre-kfac-auto", "quick", {"lr": 0.1})
    assert resolve_config("sre-kfac-auto", "quick", {"initial_damping": 0.5}).initial_damping == 0.5


def test_the_adaptive_step_trains_the_presets_vision_transformer() -> None:
    # fashion-vit's model in float32: its attention runs through a kernel forward mode can differentiate
    torch.manual_seed(0)
    model = build_model("vit", (1, 14, 14), 3)
    opt = rkfac.KFAC(model, loss="cross_entropy", curvature_samples=8)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 14, 14, generator=generator)
    y = (x.mean((1, 2, 3)) > 0).long()
    losses = train_on(model, opt, x, y, steps=6)
    assert losses[-1] < losses[0]
