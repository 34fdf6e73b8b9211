"""fisher="mc": G from a backward with labels sampled from the model, .grad untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rkfac
from rkfac.mc_fisher import sampled_targets
from rkfac.seeding import keyed_generator

DTYPE = torch.float64


def model_and_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    return model, torch.randn(10, 5, dtype=DTYPE), torch.randint(0, 3, (10,))


def test_mc_g_factor_is_mean_outer_product_of_sampled_label_gradients() -> None:
    model, x, y = model_and_batch()
    pre = rkfac.KFACPreconditioner(model, fisher="mc", seed=3, factor_every=1, clip=None)
    logits = model(x)
    pre.sample_fisher(logits)
    F.cross_entropy(logits, y).backward()
    true_grads = [p.grad.clone() for p in model.parameters()]
    pre.step()

    # The same draws, by the documented generator, then per-sample gradients one at a time.
    labels = sampled_targets(model(x), "cross_entropy", keyed_generator(torch.device("cpu"), 3, "mc-labels"))
    deltas = []
    for i in range(len(x)):
        hidden = model[1](model[0](x[i : i + 1]))
        out = model[2](hidden)
        deltas.append(torch.autograd.grad(F.cross_entropy(out, labels[i : i + 1]), out)[0][0])
    stacked = torch.stack(deltas)
    torch.testing.assert_close(pre.factors()["2"][1], stacked.T @ stacked / len(x))

    # The training gradient was the data-label gradient, not the sampled one.
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for expected, p in zip(true_grads, model.parameters()):
        torch.testing.assert_close(p.grad, expected)


def test_sampled_labels_follow_the_softmax() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]]).repeat(20000, 1)
    labels = sampled_targets(logits, "cross_entropy", torch.Generator().manual_seed(0))
    frequencies = torch.bincount(labels, minlength=3).double() / len(labels)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0].double(), 0), atol=0.01, rtol=0)


def test_mc_requires_sample_fisher_on_factor_steps() -> None:
    model, x, y = model_and_batch()
    pre = rkfac.KFACPreconditioner(model, fisher="mc", factor_every=2)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"call pre.sample_fisher\(outputs\)"):
        pre.step()
    assert pre.steps == 0 and pre.factors() == {}


def test_sample_fisher_is_a_no_op_off_factor_steps_and_refused_for_empirical() -> None:
    model, x, y = model_and_batch()
    pre = rkfac.KFACPreconditioner(model, fisher="mc", factor_every=2)
    logits = model(x)
    pre.sample_fisher(logits)
    F.cross_entropy(logits, y).backward()
    pre.step()
    after_first = {name: (a.clone(), g.clone()) for name, (a, g) in pre.factors().items()}
    logits = model(x)  # step 1 is not a factor step: nothing captured, nothing sampled
    pre.sample_fisher(logits)
    F.cross_entropy(logits, y).backward()
    pre.step()  # inputs captured without sampled gradients would raise here
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, after_first[name][0]) and torch.equal(g, after_first[name][1])
    with pytest.raises(ValueError, match="sample_fisher is for fisher='mc'"):
        rkfac.KFACPreconditioner(model).sample_fisher(logits)


def padded_sequence_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A position-wise model on (batch, tokens, 5) inputs and targets with padding marked −100."""
    model, _, _ = model_and_batch()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 5, generator=generator, dtype=DTYPE)
    y = torch.randint(0, 3, (6, 4), generator=generator)
    y[0, 2:] = -100
    y[3] = -100
    return model, x, y


def test_given_the_targets_the_sampled_loss_leaves_out_the_padded_positions_as_the_training_loss_does() -> None:
    """G from fisher="mc" with targets= is n Σ_r g_r g_rᵀ (README: the statistics' scaling, n
    the batch) with g_r the output gradient at position r of the sampled labels' mean loss with
    the padded positions marked −100 (what F.cross_entropy leaves out), written out by hand;
    without targets= the padded positions' draws count too."""
    model, x, y = padded_sequence_batch()
    g_factors = []
    for targets in (y, None):
        pre = rkfac.KFACPreconditioner(model, fisher="mc", seed=3, factor_every=1, clip=None)
        logits = model(x)
        pre.sample_fisher(logits, targets=targets)
        F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)).backward()
        pre.step()
        g_factors.append(pre.factors()["2"][1])
        pre.remove()
        model.zero_grad()
    outputs = model(x).detach().requires_grad_()
    labels = sampled_targets(outputs, "cross_entropy", keyed_generator(torch.device("cpu"), 3, "mc-labels"))
    kept = y != -100
    rows = outputs.reshape(-1, 3)[kept.reshape(-1)]
    loss = F.cross_entropy(rows, labels.reshape(-1)[kept.reshape(-1)], reduction="sum") / int(kept.sum())
    (grads,) = torch.autograd.grad(loss, outputs)
    flat = grads.reshape(-1, 3)
    torch.testing.assert_close(g_factors[0], len(x) * flat.T @ flat)
    assert not torch.allclose(g_factors[1], g_factors[0])


def test_sample_fisher_refuses_targets_it_cannot_match_by_shape_or_loss() -> None:
    model, x, y = padded_sequence_batch()
    logits = model(x)
    with pytest.raises(ValueError, match=r"targets have shape \(6, 3\).*need \(6, 4\)"):
        rkfac.KFACPreconditioner(model, fisher="mc").sample_fisher(logits, targets=y[:, :3])
    with pytest.raises(ValueError, match="mc_loss is 'mse'"):
        rkfac.KFACPreconditioner(model, fisher="mc", mc_loss="mse").sample_fisher(logits, targets=y)
