"""Padded positions left out of K-FAC's statistics (``pre.positions(kept)``), against factors
written out by hand from the kept rows (rkfac.kfac.positions)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac
from tests.oracles import with_ones

DTYPE = torch.float64
VOCAB, WIDTH, HIDDEN, CLASSES = 11, 6, 5, 4


class TokenTagger(nn.Module):
    """Embedding, Linear, tanh, a per-token Linear head: every layer's rows are the positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.hidden(self.embed(tokens)).tanh())


def padded_batch(seed: int, lengths: list[int], tokens: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens (n, T), targets with −100 at the padding, kept (n, T)); padding uses token 0."""
    generator = torch.Generator().manual_seed(seed)
    n = len(lengths)
    kept = torch.arange(tokens) < torch.tensor(lengths)[:, None]
    ids = torch.randint(1, VOCAB, (n, tokens), generator=generator).masked_fill(~kept, 0)
    targets = torch.randint(0, CLASSES, (n, tokens), generator=generator).masked_fill(~kept, -100)
    return ids, targets, kept


def loss_of(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100)


def model_at(seed: int) -> TokenTagger:
    torch.manual_seed(seed)
    return TokenTagger().to(DTYPE)


def factors_with(model: nn.Module, ids: Tensor, targets: Tensor, kept: Tensor | None, **options) -> dict:
    """The factors after one captured step (F₁ = S₁), the forward inside ``positions(kept)``."""
    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1, clip=None, **options)
    model.zero_grad()
    if kept is None:
        logits = model(ids)
    else:
        with pre.positions(kept):
            logits = model(ids)
    loss_of(logits, targets).backward()
    pre.step()
    return pre.factors()


def hand_factors(model: TokenTagger, ids: Tensor, targets: Tensor, rows: Tensor, n_scale: float) -> dict:
    """S_A = Σ_{rows} a aᵀ / N_rows, S_G = n_scale · Σ_{rows} g gᵀ for each layer, with a and g
    each layer's inputs and loss gradients at the positions ``rows`` selects (n, T)."""
    embedded = model.embed(ids)
    hidden = model.hidden(embedded)
    logits = model.head(hidden.tanh())
    for tensor in (embedded, hidden, logits):
        tensor.retain_grad()
    loss_of(logits, targets).backward()
    count = int(rows.sum())
    counts = torch.bincount(ids[rows], minlength=VOCAB).to(DTYPE) / count
    expected = {"embed": (counts, n_scale * embedded.grad[rows].T @ embedded.grad[rows])}
    for name, inputs, outputs in (("hidden", embedded, hidden), ("head", hidden.tanh(), logits)):
        a = with_ones(inputs.detach()[rows])
        expected[name] = (a.T @ a / count, n_scale * outputs.grad[rows].T @ outputs.grad[rows])
    return expected


def test_masked_statistics_equal_the_kept_rows_by_hand() -> None:
    ids, targets, kept = padded_batch(0, [5, 3, 1])
    factors = factors_with(model_at(0), ids, targets, kept)
    expected = hand_factors(model_at(0), ids, targets, kept, n_scale=len(ids))
    for name, (a, g) in expected.items():
        torch.testing.assert_close(factors[name][0], a, msg=f"{name} A")
        torch.testing.assert_close(factors[name][1], g, msg=f"{name} G")
    # without the mask, A averages over the padding too: the test above can tell the two apart
    unmasked = factors_with(model_at(0), ids, targets, None)
    for name in ("hidden", "head"):
        assert not torch.allclose(unmasked[name][0], expected[name][0])


def test_a_mask_that_keeps_everything_changes_nothing() -> None:
    ids, targets, _ = padded_batch(1, [5, 5, 5, 5])
    masked = factors_with(model_at(1), ids, targets, torch.ones_like(ids, dtype=torch.bool))
    plain = factors_with(model_at(1), ids, targets, None)
    for name, (a, g) in plain.items():
        assert torch.equal(masked[name][0], a) and torch.equal(masked[name][1], g)


def test_sequence_first_layout_takes_a_batch_first_mask() -> None:
    """batch_dim=1: the model sees (T, n) tokens; the mask stays (n, T); same factors."""
    ids, targets, kept = padded_batch(2, [4, 2, 5])
    batch_first = factors_with(model_at(2), ids, targets, kept)
    sequence_first = factors_with(model_at(2), ids.T.contiguous(), targets.T.contiguous(), kept, batch_dim=1)
    for name, (a, g) in batch_first.items():
        torch.testing.assert_close(sequence_first[name][0], a)
        torch.testing.assert_close(sequence_first[name][1], g)


def test_statistics_samples_cut_the_mask_with_the_rows() -> None:
    """m = 2 of n = 4 samples: the kept rows of the first two, G scaled by n/m as without a mask."""
    ids, targets, kept = padded_batch(3, [3, 5, 2, 4])
    factors = factors_with(model_at(3), ids, targets, kept, statistics_samples=2)
    first_two = kept.clone()
    first_two[2:] = False
    expected = hand_factors(model_at(3), ids, targets, first_two, n_scale=len(ids) * len(ids) / 2)
    for name, (a, g) in expected.items():
        torch.testing.assert_close(factors[name][0], a, msg=f"{name} A")
        torch.testing.assert_close(factors[name][1], g, msg=f"{name} G")


def test_micro_batches_each_with_their_mask_average_every_kept_row() -> None:
    ids, targets, kept = padded_batch(4, [5, 1, 3, 2])
    model = model_at(4)
    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1, clip=None)
    for part in (slice(0, 2), slice(2, 4)):
        with pre.positions(kept[part]):
            logits = model(ids[part])
        loss_of(logits, targets[part]).backward()
    pre.step()
    inputs = with_ones(model_at(4).embed(ids).detach()[kept])
    torch.testing.assert_close(pre.factors()["hidden"][0], inputs.T @ inputs / len(inputs))


def test_refusals_name_the_value() -> None:
    ids, _, kept = padded_batch(5, [3, 2])
    model = model_at(5)
    pre = rkfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    with pytest.raises(ValueError, match=r"bool tensor.*torch.int64"), pre.positions(kept.long()):
        pass
    with pytest.raises(ValueError, match=r"shape \(2,\)"), pre.positions(kept[:, 0]):
        pass
    with pytest.raises(ValueError, match=r"'embed'.*\(2, 5\).*\(2, 6\)"), pre.positions(torch.ones(2, 6, dtype=torch.bool)):
        model(ids)
    reduced = rkfac.KFACPreconditioner(model_at(5), factor_every=1, inverse_every=1, kfac_approx="reduce")
    with pytest.raises(ValueError, match="kfac_approx='expand'"), reduced.positions(kept):
        pass


def test_a_convolution_keeps_its_rows_and_says_so() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv1d(3, 4, kernel_size=3, padding=1), nn.Flatten(), nn.Linear(4 * 5, 2)).to(DTYPE)
    x, y = torch.randn(2, 3, 5, dtype=DTYPE), torch.tensor([0, 1])
    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1, clip=None)
    with pytest.warns(UserWarning, match="'0' .*keeps every row"), pre.positions(torch.ones(2, 5, dtype=torch.bool)):
        out = model(x)
    F.cross_entropy(out, y).backward()
    pre.step()
    plain = factors_with_plain(model, x, y)
    for name, (a, g) in plain.items():
        torch.testing.assert_close(pre.factors()[name][0], a)
        torch.testing.assert_close(pre.factors()[name][1], g)


def factors_with_plain(model: nn.Module, x: Tensor, y: Tensor) -> dict:
    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1, clip=None)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    return pre.factors()


def test_seng_refuses_a_mask_that_is_not_bool() -> None:
    _, _, kept = padded_batch(7, [4, 2, 5])
    seng = rkfac.SENGPreconditioner(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"bool tensor.*torch.float32"), seng.positions(kept.float()):
        pass


def test_attention_projections_take_the_mask() -> None:
    """Self-attention with the padded keys masked and only the kept outputs in the loss: every
    padded row has a zero output gradient, so G is the same with and without the mask (a
    mask misaligned with the rows would drop real rows), and A of the q, k, v projections is
    the Gram product of the kept inputs."""
    torch.manual_seed(8)
    x = torch.randn(3, 5, 6, dtype=DTYPE)
    kept = torch.arange(5) < torch.tensor([5, 3, 1])[:, None]
    factors = []
    for mask in (kept, None):
        torch.manual_seed(9)
        attention = nn.MultiheadAttention(6, 2, batch_first=True).to(DTYPE)
        pre = rkfac.KFACPreconditioner(attention, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1, clip=None)
        with pre.positions(mask) if mask is not None else contextlib.nullcontext():
            out, _ = attention(x, x, x, key_padding_mask=~kept, need_weights=False)
        (out[kept].pow(2).sum() / kept.sum()).backward()
        pre.step()
        factors.append(pre.factors())
    masked, plain = factors
    inputs = with_ones(x[kept])
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(masked[name][0], inputs.T @ inputs / len(inputs))
    for name, (_, g) in plain.items():
        torch.testing.assert_close(masked[name][1], g, msg=name)
    assert not torch.allclose(plain["q_proj"][0], masked["q_proj"][0])
