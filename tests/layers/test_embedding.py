"""nn.Embedding (issue 18): a diagonal A applied as a vector, against the explicit Linear on one-hot rows.

An embedding with weight E (vocab × d) computes exactly what ``nn.Linear(vocab, d, bias=False)``
with weight Eᵀ computes on one-hot inputs. K-FAC on that Linear (dense A = Σ e eᵀ / N, which is
diagonal, decomposed exactly) must give the same factors and the same preconditioned gradient
as rkfac's embedding, which never forms a vocab × vocab matrix.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac
from rkfac.lowrank import DiagonalFactor

DTYPE = torch.float64
VOCAB, DIM = 11, 4


class Embedded(nn.Module):
    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
        self.head = nn.Linear(DIM, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(1))


class OneHot(nn.Module):
    """The explicit equivalent: a bias-free Linear on one-hot token rows."""

    def __init__(self, embedded: Embedded) -> None:
        super().__init__()
        self.embed = nn.Linear(VOCAB, DIM, bias=False)
        self.head = nn.Linear(DIM, 3)
        with torch.no_grad():
            self.embed.weight.copy_(embedded.embed.weight.T)
            self.head.load_state_dict(embedded.head.state_dict())

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(F.one_hot(tokens, VOCAB).to(self.embed.weight.dtype))).mean(1))


def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB - 2, (6, 5), generator=generator), torch.randint(0, 3, (6,), generator=generator)


@pytest.mark.parametrize("damping_mode", ["relative", "pi"])
def test_embedding_equals_the_linear_on_one_hot_rows(damping_mode: str) -> None:
    torch.manual_seed(0)
    embedded = Embedded().double()
    explicit = OneHot(embedded).double()
    tokens, labels = data()
    options = {"decomposition": rkfac.ExactEigh(), "factor_every": 1, "clip": None, "damping_mode": damping_mode}
    pre, reference = rkfac.KFACPreconditioner(embedded, **options), rkfac.KFACPreconditioner(explicit, **options)
    assert pre.layer_names == ["embed", "head"]
    assert pre.describe().startswith("embed: Embedding, A 11 (diagonal), G 4 × 4")
    for model, preconditioner in ((embedded, pre), (explicit, reference)):
        F.cross_entropy(model(tokens), labels).backward()
        preconditioner.step()
    a_diagonal, g = pre.factors()["embed"]
    a_dense, g_dense = reference.factors()["embed"]
    counts = torch.bincount(tokens.reshape(-1), minlength=VOCAB).double() / tokens.numel()
    torch.testing.assert_close(a_diagonal, counts)
    torch.testing.assert_close(torch.diag(a_diagonal), a_dense)
    torch.testing.assert_close(g, g_dense)
    assert isinstance(pre.eigenpairs()["embed"][0], DiagonalFactor)
    torch.testing.assert_close(embedded.embed.weight.grad, explicit.embed.weight.grad.T)
    torch.testing.assert_close(embedded.head.weight.grad, explicit.head.weight.grad)


def test_padding_rows_stay_zero_and_unused_rows_too() -> None:
    torch.manual_seed(0)
    model = Embedded(padding_idx=0).double()
    tokens, labels = data()
    tokens[:, 0] = 0  # padding in every sample
    pre = rkfac.KFACPreconditioner(model, factor_every=1)
    F.cross_entropy(model(tokens), labels).backward()
    pre.step()
    grad = model.embed.weight.grad
    assert torch.equal(grad[0], torch.zeros(DIM, dtype=DTYPE))
    assert torch.equal(grad[VOCAB - 1], torch.zeros(DIM, dtype=DTYPE))  # never looked up


def test_sparse_embeddings_are_named_not_listed() -> None:
    model = nn.Sequential(nn.Embedding(VOCAB, DIM, sparse=True), nn.Linear(DIM, 2))
    with pytest.warns(UserWarning, match=r"0 \(Embedding sparse=True \(its gradient is a sparse tensor"):
        pre = rkfac.KFACPreconditioner(model)
    assert pre.layer_names == ["1"]
    model = nn.Sequential(nn.Embedding(VOCAB, DIM, scale_grad_by_freq=True), nn.Linear(DIM, 2))
    with pytest.warns(UserWarning, match=r"0 \(Embedding scale_grad_by_freq=True \(its gradient is rescaled per token"):
        pre = rkfac.KFACPreconditioner(model)
    assert pre.layer_names == ["1"]


def test_seng_gives_embeddings_the_plain_damped_step() -> None:
    torch.manual_seed(0)
    model = Embedded().double()
    tokens, labels = data()
    pre = rkfac.SENGPreconditioner(model, damping=0.5, update_freq=1)
    assert pre.layer_names == ["head"]
    F.cross_entropy(model(tokens), labels).backward()
    plain = model.embed.weight.grad.clone()
    pre.step()
    torch.testing.assert_close(model.embed.weight.grad, plain / 1.5)


def test_state_dict_round_trip_keeps_the_diagonal_factor() -> None:
    torch.manual_seed(0)
    model = Embedded().double()
    tokens, labels = data()
    pre = rkfac.KFACPreconditioner(model, factor_every=1)
    F.cross_entropy(model(tokens), labels).backward()
    pre.step()
    buffer = io.BytesIO()
    torch.save(pre.state_dict(), buffer)
    buffer.seek(0)
    fresh = rkfac.KFACPreconditioner(model, factor_every=1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.factors()["embed"][0], pre.factors()["embed"][0])
    assert torch.equal(fresh.eigenpairs()["embed"][0].values, pre.eigenpairs()["embed"][0].values)


def test_padding_tokens_are_left_out_of_both_factors() -> None:
    """A padding token's output does not depend on the weight: its rows count in neither A nor G,
    so heavy padding does not set λ_A = δ·max A (it would be the largest count)."""
    torch.manual_seed(0)
    model = Embedded(padding_idx=0).double()
    tokens, labels = data()
    tokens[:, :3] = 0  # most of every sample is padding
    seen = {}

    def keep_grad(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        output.register_hook(lambda g: seen.update(g=g))

    model.embed.register_forward_hook(keep_grad)
    pre = rkfac.KFACPreconditioner(model, factor_every=1)
    F.cross_entropy(model(tokens), labels).backward()
    pre.step()
    a, g = pre.factors()["embed"]
    real = tokens.reshape(-1) != 0
    counts = torch.bincount(tokens.reshape(-1)[real], minlength=VOCAB).double() / int(real.sum())
    rows = seen["g"].reshape(-1, DIM)[real]
    torch.testing.assert_close(a, counts)
    assert a[0] == 0
    torch.testing.assert_close(g, tokens.shape[0] * rows.T @ rows)
