"""The contract every :class:`~rkfac.layers.LayerKind` in ``rkfac.layers.KINDS`` keeps.

For each kind, on example modules (with and without bias, on each input layout the kind
handles), against computations that do not use the kind (:mod:`tests.oracles`):

- ``factor_dims`` is (d_A, d_G) of the layer's gradient matrix, as the weight's shape gives it;
- after a sum-reduced backward, Σ_rows g aᵀ over the output-gradient and input rows is what
  autograd wrote into ``weight.grad`` / ``bias.grad``, which ``grad_matrix()`` returns as the
  (d_G, d_A) matrix (for a kind with one-hot input rows, an embedding: the one-hot rows, whose
  Gram diagonal ``input_diagonal`` returns);
- for kinds with per-sample columns (SENG): ``columns.transpose(1, 2)`` stacked over samples is
  the row matrix, for inputs and for output gradients; Gy_i X_iᵀ is sample i's own gradient
  (``torch.func``), and Σ_i Gy_i X_iᵀ the summed one;
- ``set_grad_matrix`` writes a matrix back into those same ``.grad`` tensors, round trip exact.

A kind of B independent blocks (``block_shape == (B,)``, a grouped convolution) keeps the same
contract per block: rows (B, N, d), gradient matrix (B, d_G, d_A), block j being rows
j·d_G … (j+1)·d_G − 1 of the oracle's (B·d_G, d_A) matrix (:func:`blocked`).

A new kind needs an entry in :data:`EXAMPLES`; without one the tests below fail and say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rkfac.layers import KINDS, LayerKind, kind_for
from tests.oracles import grad_matrix, per_sample_grad_matrices

DTYPE = torch.float64
N = 4  # samples per batch


@dataclass(frozen=True)
class Example:
    """A module of one kind and a batch of its inputs (samples first).

    ``one_hot_rows`` is for kinds with ``diagonal_input`` (no dense ``input_rows``): the input
    rows written out by hand.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Tensor]
    one_hot_rows: Callable[[nn.Module, Tensor], Tensor] | None = None


def one_hot(module: nn.Module, indices: Tensor) -> Tensor:
    """One row e_index per looked-up token: the input rows of ``out = weight.T @ onehot(index)``."""
    return F.one_hot(indices.reshape(-1), module.num_embeddings).to(DTYPE)  # type: ignore[arg-type]


#: By the kind's class name, so that this file also loads where a kind is not (yet) in KINDS.
EXAMPLES: dict[str, list[Example]] = {
    "LinearKind": [
        Example("matrix-bias", lambda: nn.Linear(5, 3), lambda: torch.randn(N, 5)),
        Example("matrix-no-bias", lambda: nn.Linear(5, 3, bias=False), lambda: torch.randn(N, 5)),
        Example("tokens-bias", lambda: nn.Linear(5, 3), lambda: torch.randn(N, 6, 5)),
        Example("tokens-no-bias", lambda: nn.Linear(5, 3, bias=False), lambda: torch.randn(N, 2, 3, 5)),
    ],
    "Conv2dKind": [
        Example("bias-stride2-pad1", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), lambda: torch.randn(N, 2, 7, 6)),
        Example(
            "no-bias-rect-stride-pad-dilation",
            lambda: nn.Conv2d(3, 2, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(1, 2), bias=False),
            lambda: torch.randn(N, 3, 5, 7),
        ),
        Example(
            "bias-same-reflect",
            lambda: nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect"),
            lambda: torch.randn(N, 2, 5, 5),
        ),
    ],
    "Conv1dKind": [
        Example("bias-stride2-pad1", lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), lambda: torch.randn(N, 2, 9)),
        Example(
            "no-bias-pad-dilation",
            lambda: nn.Conv1d(3, 2, 2, padding=1, dilation=2, bias=False),
            lambda: torch.randn(N, 3, 8),
        ),
        Example(
            "bias-same-circular",
            lambda: nn.Conv1d(2, 4, 3, padding="same", padding_mode="circular"),
            lambda: torch.randn(N, 2, 6),
        ),
    ],
    "GroupedConv2dKind": [
        Example("groups2-bias-pad1", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), lambda: torch.randn(N, 4, 5, 6)),
        Example(
            "depthwise-no-bias-stride2-dilation",
            lambda: nn.Conv2d(3, 3, (3, 2), groups=3, stride=2, dilation=(1, 2), bias=False),
            lambda: torch.randn(N, 3, 7, 7),
        ),
        Example(
            "depthwise-x2-same-reflect",
            lambda: nn.Conv2d(2, 4, 3, groups=2, padding="same", padding_mode="reflect"),
            lambda: torch.randn(N, 2, 5, 5),
        ),
    ],
    "GroupedConv1dKind": [
        Example("groups3-bias-stride2", lambda: nn.Conv1d(6, 3, 3, groups=3, stride=2), lambda: torch.randn(N, 6, 9)),
        Example(
            "depthwise-no-bias-circular",
            lambda: nn.Conv1d(4, 4, 3, groups=4, padding=1, padding_mode="circular", bias=False),
            lambda: torch.randn(N, 4, 7),
        ),
    ],
    "EmbeddingKind": [
        Example("tokens", lambda: nn.Embedding(7, 3), lambda: torch.randint(0, 7, (N, 5)), one_hot),
        Example("one-token-per-sample", lambda: nn.Embedding(6, 2), lambda: torch.randint(0, 6, (N,)), one_hot),
    ],
}


def _cases(per_sample_only: bool = False) -> list[object]:
    cases: list[object] = []
    for kind in KINDS:
        if per_sample_only and (kind.diagonal_input or not kind.per_sample):
            continue
        examples = EXAMPLES.get(kind.__name__) or [None]
        cases += [pytest.param(kind, ex, id=f"{kind.__name__}-{ex.name if ex else 'MISSING'}") for ex in examples]
    return cases


ALL_KINDS = _cases()
PER_SAMPLE_KINDS = _cases(per_sample_only=True)  # with dense input rows and SENG's per-sample columns


def example_layer(kind: type[LayerKind], example: Example | None, seed: int = 0) -> tuple[nn.Module, LayerKind, Tensor]:
    if example is None:
        pytest.fail(f"{kind.__name__} is in rkfac.layers.KINDS but has no example module: add it to EXAMPLES in {__name__}")
    torch.manual_seed(seed)
    module = example.build().to(DTYPE)
    chosen = kind_for(module)
    assert type(chosen) is kind, f"kind_for({module}) gave {type(chosen).__name__}, the example is listed under {kind.__name__}"
    x = example.inputs()
    return module, chosen, x.to(DTYPE) if x.is_floating_point() else x


def input_rows(layer: LayerKind, example: Example, x: Tensor) -> Tensor:
    """The kind's dense rows, or for a one-hot kind the rows written out by the example."""
    if not layer.diagonal_input:
        return layer.input_rows(x)
    assert example.one_hot_rows is not None, f"{example.name}: a diagonal-input kind's example needs one_hot_rows"
    return example.one_hot_rows(layer.module, x)


def blocked(layer: LayerKind, matrix: Tensor) -> Tensor:
    """The oracle's (d_G, d_A) gradient matrix as the kind lays it out: unchanged for one block,
    (B, d_G / B, d_A) for B blocks (a grouped convolution's groups are consecutive output channels)."""
    return matrix.reshape(*layer.block_shape, -1, matrix.shape[-1]) if layer.block_shape else matrix


def half_squared_error(output: Tensor, target: Tensor) -> Tensor:
    """Σ ½(output − target)² over everything: a sum over samples, so ∂/∂output_i is sample i's own."""
    return 0.5 * (output - target).pow(2).sum()


def backward(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """A sum-reduced backward through ``module`` alone: (the output with its .grad, the target)."""
    output = module(x)
    target = torch.randn_like(output)
    output.retain_grad()
    half_squared_error(output, target).backward()
    assert output.grad is not None
    return output, target


def test_every_kind_has_an_example_module() -> None:
    missing = [kind.__name__ for kind in KINDS if not EXAMPLES.get(kind.__name__)]
    assert not missing, f"kinds in rkfac.layers.KINDS without an example module in {__name__}.EXAMPLES: {missing}"


@pytest.mark.parametrize(("kind", "example"), ALL_KINDS)
def test_factor_dims_are_those_of_the_gradient_matrix(kind: type[LayerKind], example: Example | None) -> None:
    module, layer, x = example_layer(kind, example)
    backward(module, x)
    d_g, d_a = blocked(layer, grad_matrix(module)).shape[-2:]
    assert layer.factor_dims == (d_a, d_g)
    assert layer.has_bias == (getattr(module, "bias", None) is not None)


@pytest.mark.parametrize(("kind", "example"), ALL_KINDS)
def test_rows_give_the_summed_gradient(kind: type[LayerKind], example: Example | None) -> None:
    module, layer, x = example_layer(kind, example)
    assert example is not None and layer.grad_matrix() is None  # before any backward
    output, _ = backward(module, x)
    rows, grad_rows = input_rows(layer, example, x), layer.output_grad_rows(output.grad)
    assert rows.shape[:-1] == grad_rows.shape[:-1], "one input row per output-gradient row (per block)"
    assert rows.shape[:-2] == grad_rows.shape[:-2] == layer.block_shape
    if layer.has_bias:  # the bias input is a trailing 1 in every row
        assert torch.equal(rows[..., -1], torch.ones(rows.shape[:-1], dtype=DTYPE))
    if layer.diagonal_input:
        diagonal, count = layer.input_diagonal(x, DTYPE)
        assert count == len(rows)
        torch.testing.assert_close(diagonal, (rows.T @ rows).diagonal(), rtol=0, atol=0)
    by_hand = blocked(layer, grad_matrix(module))
    torch.testing.assert_close(grad_rows.mT @ rows, by_hand)  # Σ_rows g aᵀ = ∇W (per block)
    matrix = layer.grad_matrix()
    assert matrix is not None
    torch.testing.assert_close(matrix, by_hand, rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "example"), PER_SAMPLE_KINDS)
def test_columns_are_the_rows_grouped_by_sample(kind: type[LayerKind], example: Example | None) -> None:
    module, layer, x = example_layer(kind, example)
    d_a, d_g = layer.factor_dims
    grad_output = torch.randn_like(module(x))

    rows, columns = layer.input_rows(x), layer.input_columns(x)
    grad_rows, grad_columns = layer.output_grad_rows(grad_output), layer.output_grad_columns(grad_output)
    positions = columns.shape[2]
    assert columns.shape == (N, d_a, positions) and grad_columns.shape == (N, d_g, positions)
    assert rows.shape == (N * positions, d_a) and grad_rows.shape == (N * positions, d_g)
    torch.testing.assert_close(columns.transpose(1, 2).reshape(-1, d_a), rows, rtol=0, atol=0)
    torch.testing.assert_close(grad_columns.transpose(1, 2).reshape(-1, d_g), grad_rows, rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "example"), PER_SAMPLE_KINDS)
def test_columns_give_the_per_sample_gradients(kind: type[LayerKind], example: Example | None) -> None:
    module, layer, x = example_layer(kind, example)
    output, target = backward(module, x)
    per_sample = layer.output_grad_columns(output.grad) @ layer.input_columns(x).transpose(1, 2)  # Gy_i X_iᵀ
    torch.testing.assert_close(per_sample, per_sample_grad_matrices(module, module, x, target, loss=half_squared_error))
    torch.testing.assert_close(per_sample.sum(0), grad_matrix(module))


@pytest.mark.parametrize(("kind", "example"), ALL_KINDS)
def test_set_grad_matrix_round_trips_into_the_parameter_grads(kind: type[LayerKind], example: Example | None) -> None:
    module, layer, x = example_layer(kind, example)
    backward(module, x)
    grads = [p.grad for p in module.parameters()]
    before = [g.clone() for g in grads if g is not None]

    matrix = layer.grad_matrix()
    assert matrix is not None
    layer.set_grad_matrix(matrix.clone())
    assert all(torch.equal(p.grad, b) for p, b in zip(module.parameters(), before, strict=True))

    d_a, d_g = layer.factor_dims
    new = torch.randn(*layer.block_shape, d_g, d_a, dtype=DTYPE)
    layer.set_grad_matrix(new)
    same = all(p.grad is g for p, g in zip(module.parameters(), grads, strict=True))
    assert same, "set_grad_matrix replaced a parameter's .grad instead of writing into it"
    assert torch.equal(blocked(layer, grad_matrix(module)), new)  # read back by hand from weight.grad / bias.grad
    assert torch.equal(layer.grad_matrix(), new)
