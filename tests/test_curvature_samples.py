"""The adaptive step's curvature samples: importance draws weighted so that the estimate of a
batch mean (or sum) stays unbiased, counted against the exact value over many draws; the floor
that keeps every sample drawable; the settings refused and the fallback said aloud."""

from __future__ import annotations

import copy
import gc
import re

import pytest
import torch
import torch.nn.functional as F

import rkfac
from rkfac.adaptive import AdaptiveOptions, AdaptiveStep
from rkfac.curvature_samples import UNIFORM_SHARE, first_samples, importance_samples
from tests.test_adaptive import batch, make_model, make_optimizer

SAMPLES, DRAWN, REPEATS = 12, 5, 4000


def logits_with_a_confident_sample() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(SAMPLES, 4, generator=generator, dtype=torch.float64) * 2
    logits[0] = torch.tensor([40.0, 0.0, 0.0, 0.0])  # p ≈ one-hot: 1 − Σp² ≈ 0
    return logits


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_importance_draws_estimate_the_batch_value_without_bias(reduction: str) -> None:
    logits = logits_with_a_confident_sample()
    parts = torch.rand(SAMPLES, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    parts[0] = 5.0  # the confident sample's part is large: only the uniform share can find it
    index = torch.arange(SAMPLES)
    estimates, first_draws = [], 0
    for seed in range(REPEATS):
        generator = torch.Generator().manual_seed(seed)
        sample = importance_samples([index[:, None].double()], index, logits, DRAWN, reduction, generator)
        assert sample.weights is not None and sample.scale == 1.0
        drawn = sample.targets
        estimates.append(float((sample.weights * parts[drawn]).sum()))
        first_draws += int((drawn == 0).sum())
    estimates_t = torch.tensor(estimates, dtype=torch.float64)
    exact = float(parts.mean() if reduction == "mean" else parts.sum())
    standard_error = float(estimates_t.std()) / REPEATS**0.5
    assert abs(float(estimates_t.mean()) - exact) < 4 * standard_error
    # the confident sample is drawn at the floor's rate β/n, not never
    rate = first_draws / (REPEATS * DRAWN)
    assert rate == pytest.approx(UNIFORM_SHARE / SAMPLES, rel=0.15)


def test_first_samples_scale_a_sum_by_the_batch_over_the_subset_and_keep_a_mean() -> None:
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    assert first_samples([x], y, 4, 0, "sum").scale == 10 / 4
    assert first_samples([x], y, 4, 0, "mean").scale == 1.0
    whole = first_samples([x], y, 40, 0, "sum")
    assert whole.scale == 1.0 and whole.targets.tolist() == list(range(10))


def test_importance_sampling_for_a_squared_error_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=re.escape("curvature_sampling='importance' needs cross_entropy")):
        AdaptiveOptions(loss="mse", curvature_sampling="importance")


def test_without_the_batch_outputs_importance_falls_back_to_the_first_samples_and_says_so() -> None:
    model = make_model()
    opt = make_optimizer(model, curvature_samples=4, curvature_sampling="importance")
    twin_model = copy.deepcopy(model)
    twin = make_optimizer(twin_model, curvature_samples=4, curvature_sampling="first")
    x, y = batch(0)
    for net, optimizer in ((model, opt), (twin_model, twin)):
        torch.manual_seed(1)  # the same global draws for both (the Fisher's sampled targets)
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        net(x[:3])  # a later forward (with gradients on) of another size: its outputs are not the batch's
        if optimizer is opt:
            with pytest.warns(UserWarning, match=re.escape("needs the model's outputs for the batch of 10 samples")):
                optimizer.step(inputs=x, targets=y)
        else:
            optimizer.step(inputs=x, targets=y)
    assert opt.adaptive is not None and twin.adaptive is not None
    assert opt.adaptive.last.alpha == twin.adaptive.last.alpha


def batch_norm_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def test_the_default_sampling_is_importance_for_cross_entropy_and_first_for_mse_or_batch_norm() -> None:
    ce = rkfac.KFAC(make_model(), loss="cross_entropy")
    mse = rkfac.KFAC(make_model(), loss="mse")
    normed = rkfac.KFAC(batch_norm_model(), loss="cross_entropy")
    assert ce.adaptive is not None and mse.adaptive is not None and normed.adaptive is not None
    assert (ce.adaptive.sampling, ce.adaptive.sample_count) == ("importance", 64)
    assert (mse.adaptive.sampling, mse.adaptive.sample_count) == ("first", 32)
    assert (normed.adaptive.sampling, normed.adaptive.sample_count) == ("first", 128)


def test_importance_asked_for_a_model_with_batch_norm_in_training_takes_the_first_samples_and_says_so() -> None:
    model = batch_norm_model()
    opt = make_optimizer(model, curvature_samples=4, curvature_sampling="importance")
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="a BatchNorm in training mode"):
        opt.step(inputs=x, targets=y)


def test_the_output_hook_goes_with_its_step() -> None:
    model = make_model()
    step = AdaptiveStep(model, list(model.parameters()), AdaptiveOptions(loss="cross_entropy"))
    assert len(model._forward_hooks) == 1
    del step
    gc.collect()
    assert len(model._forward_hooks) == 0


def test_a_negative_class_index_other_than_ignore_index_is_refused_by_value() -> None:
    model = make_model()
    opt = make_optimizer(model)
    x, y = batch(0)
    y[3], y[5] = -100, -1  # -100: F.cross_entropy's ignore_index, left out; -1 is no class and no ignore_index
    opt.zero_grad()
    F.cross_entropy(model(x), y.masked_fill(y == -1, 0)).backward()
    with pytest.raises(ValueError, match=re.escape("negative class index (-1)")):
        opt.step(inputs=x, targets=y)


def test_a_stated_ignore_index_takes_the_steps_of_torchs_own_marking() -> None:
    """ignore_index=0 (a padding class) steps as the same batch with those targets marked −100."""
    x, y = batch(0, tokens=3)
    y = y.clamp_min(0)  # class 0 is the padding here
    results = []
    for targets, options in ((y, {"ignore_index": 0}), (y.masked_fill(y == 0, -100), {})):
        model = make_model()
        opt = make_optimizer(model, **options)
        for _ in range(2):
            opt.zero_grad()
            ignore = options.get("ignore_index", -100)
            F.cross_entropy(model(x).reshape(-1, 3), targets.reshape(-1), ignore_index=ignore).backward()
            opt.step(inputs=x, targets=targets)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    model = make_model()
    plain = make_optimizer(model)  # the same batch with class 0 counted: another step
    for _ in range(2):
        plain.zero_grad()
        F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
        plain.step(inputs=x, targets=y)
    assert not torch.allclose(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), results[0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_importance_draws_over_padded_positions_estimate_the_mean_over_the_kept_ones(reduction: str) -> None:
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(SAMPLES, 3, 4, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 4, (SAMPLES, 3), generator=generator)
    targets[0] = -100
    targets[1:4, 1:] = -100
    parts = torch.rand(SAMPLES, 3, generator=generator, dtype=torch.float64) * (targets != -100)  # 0 where left out
    kept = int((targets != -100).sum())
    index = torch.arange(SAMPLES)
    estimates, padding_draws = [], 0
    for seed in range(REPEATS):
        generator = torch.Generator().manual_seed(seed)
        sample = importance_samples([index[:, None].double()], targets, logits, DRAWN, reduction, generator)
        assert sample.weights is not None
        drawn = sample.inputs[0][:, 0].long()  # the inputs are the samples' indices
        per_sample = parts[drawn].mean(1) if reduction == "mean" else parts[drawn].sum(1)  # per_sample's grouping
        estimates.append(float((sample.weights * per_sample).sum()))
        padding_draws += int((drawn == 0).sum())
    estimates_t = torch.tensor(estimates, dtype=torch.float64)
    exact = float(parts.sum() / kept if reduction == "mean" else parts.sum())
    assert abs(float(estimates_t.mean()) - exact) < 4 * float(estimates_t.std()) / REPEATS**0.5
    # the all-padding sample has weight 0: it is drawn only through the uniform share β/n
    assert padding_draws / (REPEATS * DRAWN) == pytest.approx(UNIFORM_SHARE / SAMPLES, rel=0.15)


def test_samples_that_are_all_padding_give_way_to_the_whole_batch() -> None:
    """The first 4 samples all padding would measure no curvature (M = the damping alone): the
    step measures the whole batch instead, and so takes the whole-batch step."""
    x, y = batch(0, tokens=3)
    y[:4] = -100
    results = []
    for samples in (4, 10_000):
        model = make_model()
        opt = make_optimizer(model, curvature_samples=samples, curvature_sampling="first")
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
            opt.step(inputs=x, targets=y)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
