"""K-FAC's batch statistics: running sums of the layers' rows, collected through the shared hooks.

:class:`StatisticsCollector` is the :class:`~rkfac.layers.capture.CaptureSink` of K-FAC: on a
factor step it computes ``aᵀa`` of each layer input when the forward runs, and adds it to a
running sum, together with ``gᵀg`` of the output gradient, when the backward reaches that
call's output. Statistics pair by backward: a forward whose output never receives a gradient
before ``step()`` (a logging forward with grad enabled, a loop that skips ``backward()`` after a
non-finite loss, an output that does not require grad) contributes nothing, so A and G always
describe the same samples. Sums (not averages) are kept so
that several forward/backward passes before one optimizer step (gradient accumulation) combine
into the statistics of the concatenated batch. The scaling is fixed in
:mod:`rkfac.layers.base`; with T calls of a layer in one forward (weight sharing, see
:mod:`rkfac.layers.capture`) on n samples (N rows a call),

    S_A = Σ_{calls, rows} a aᵀ / (T N),    S_G = n Σ_{calls, rows} g gᵀ   (mean loss),

exactly the statistics of one call on the n samples with the T uses as extra positions.
Counting the n samples once per call instead (as for micro-batches) would make S_G T times
larger with a mean loss and T times smaller with a sum loss, so the two reductions would no
longer agree.

K-FAC-expand and K-FAC-reduce (Eschenhagen et al. 2023; option ``kfac_approx``). The above is
"expand": every shared row (token, output position) is a sample of the Kronecker statistics.
"reduce" first aggregates each call's rows over its shared positions, per sample:
ā = mean_r a_r and ḡ = Σ_r g_r, so that a call contributes n rows, and then

    S_A = Σ_samples ā āᵀ / n,    S_G = n Σ_samples ḡ ḡᵀ   (mean loss; Σ ḡ ḡᵀ / n for a sum),

which is exact for a linear weight-sharing layer whose loss sees only the aggregate, and costs R×
less in the Gram products. (The option names are curvlinops'; the scaling is the one spec section 7
fixes, tested against hand-computed factors, not compared with curvlinops' code.) Several
calls of one layer in a forward stay separate rows under both.

Subsampled statistics (option ``statistics_samples`` = m). The Gram products cost O(N d²) per
layer and factor step, the one K-FAC cost that grows with the batch; at batch 2048 they are
most of what a cheap basis leaves. With m set, each layer call contributes the rows of its
first m samples only (along ``batch_dim``; the batch is a random draw, so they are a random
subset), and with n the call's samples

    S_A = Σ_{kept rows} a aᵀ / N_kept,    S_G = (n / m) · c_G Σ_{kept rows} g gᵀ,

c_G the full batch's scale above (n for a mean loss, 1/n for a sum). Both are then the mean
over the kept samples of the per-sample statistics, an unbiased estimate of the full batch's:
exactly the statistics of the first m samples run alone (without layers that couple samples,
such as batch norm). Over several calls (micro-batches) n and m are the totals. A call of at
most m samples is kept whole, so a limit at or above the batch size changes nothing.

Statistics are summed in float32 (float64 for a float64 layer), whatever the activation dtype,
so autocast does not degrade them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from rkfac.kfac.positions import PositionMask
from rkfac.layers import Call, LayerKind
from rkfac.timing import PhaseTimer, maybe_phase


@dataclass
class PendingInputs:
    """One layer call's A-side contribution, held until a gradient reaches its output."""

    gram: Tensor | None  # Σ a aᵀ of the call; None when the rows themselves are kept
    rows: Tensor | None  # the rows (B-KFAC's online factors)
    count: int  # N, the rows of the call
    committed: bool = False
    keep: Tensor | None = None  # the rows that count (an embedding's non-padding tokens, a mask's positions), None: all
    batch_first: bool = False  # the rows are in batch-first order (a position mask's): take the gradient's so too
    observed: Any = None  # what a RowObserver made of the rows (e.g. rotated into a basis)


class RowObserver(Protocol):
    """Something that needs the rows themselves, paired: told each call's input rows when the
    forward runs and its output-gradient rows when they arrive, in the same order (a row is one
    sample of the Kronecker statistics), e.g. :class:`rkfac.kfac.eigenvalue_correction.EigenvalueCorrection`."""

    def on_input_rows(self, name: str, rows: Tensor) -> Any: ...

    def on_input_tokens(self, name: str, tokens: Tensor) -> Any:
        """A diagonal factor's input rows, given as the indices of their one-hot vectors (an
        embedding's looked-up tokens, padding left out)."""
        ...

    def on_output_grad_rows(self, name: str, inputs: Any, rows: Tensor) -> None: ...

    def clear_rows(self) -> None: ...


@dataclass(frozen=True)
class Statistic:
    """One factor's batch statistic: S itself (d × d; its diagonal (d,) for a diagonal factor),
    or its columns C (d × N, S = C Cᵀ) for a factor that B-KFAC updates online."""

    value: Tensor
    columns: bool = False

    @property
    def diagonal(self) -> bool:
        return self.value.dim() == 1


def _gram(rows: Tensor) -> Tensor:
    """``rowsᵀ rows`` in the dtype of ``rows``: hooks run inside the user's autocast region,
    which would otherwise compute it in bf16/fp16. Rows (B, N, d) of a block kind give (B, d, d)."""
    with torch.autocast(rows.device.type, enabled=False):
        return rows.mT @ rows


class StatisticSums:
    """Running sums of one layer's statistics since the last factor update.

    With ``keep_rows`` (B-KFAC's online factors) the rows themselves are kept instead of their
    Gram products, so that :meth:`columns` can hand the low-rank statistic S = C Cᵀ to
    Brand's update without a d × d product; :meth:`averages` still works from them.
    """

    input_sum: Tensor | None
    input_rows: int
    grad_sum: Tensor | None
    _samples_by_group: dict[int, tuple[int, int]]  # group: (samples n, kept samples m)

    def __init__(self, keep_rows: bool = False) -> None:
        self.keep_rows = keep_rows
        self.clear()

    def pending(self, rows: Tensor) -> PendingInputs:
        """One call's input rows as they will be added (their Gram product unless ``keep_rows``)."""
        if self.keep_rows:
            return PendingInputs(None, rows, rows.shape[-2])
        return PendingInputs(_gram(rows), None, rows.shape[-2])

    def commit(self, pending: PendingInputs) -> None:
        """Add a call's inputs (once: later gradients of the same output add only to G)."""
        if pending.committed:
            return
        pending.committed = True
        if pending.rows is not None:
            self._input_parts.append(pending.rows)
        elif pending.gram is not None:
            self.input_sum = pending.gram if self.input_sum is None else self.input_sum.add_(pending.gram)
        self.input_rows += pending.count

    def add_inputs(self, rows: Tensor) -> None:
        self.commit(self.pending(rows))

    def add_output_grads(self, rows: Tensor, samples: int, group: int, kept: int | None = None) -> None:
        """Add the rows of one call; ``samples`` count once per sample ``group`` (one model call),
        of which the rows hold ``kept`` (all when None; see "Subsampled statistics")."""
        if self.keep_rows:
            self._grad_parts.append(rows)
        else:
            gram = _gram(rows)
            self.grad_sum = gram if self.grad_sum is None else self.grad_sum.add_(gram)
        self._samples_by_group[group] = (samples, samples if kept is None else kept)

    @property
    def grad_samples(self) -> int:
        """n of the G scaling: the samples of every model call whose gradients were added."""
        return sum(samples for samples, _ in self._samples_by_group.values())

    @property
    def kept_samples(self) -> int:
        """m: the samples among :attr:`grad_samples` whose rows were added."""
        return sum(kept for _, kept in self._samples_by_group.values())

    @property
    def has_inputs(self) -> bool:
        return self.input_sum is not None or bool(self._input_parts)

    @property
    def has_output_grads(self) -> bool:
        return self.grad_sum is not None or bool(self._grad_parts)

    def _scales(self, loss_reduction: str) -> tuple[float, float]:
        """(c_A, c_G) with S_A = c_A Σ a aᵀ and S_G = c_G Σ g gᵀ."""
        n = self.grad_samples
        c_g = float(n) if loss_reduction == "mean" else 1.0 / n
        kept = self.kept_samples
        return 1.0 / self.input_rows, (c_g if kept == n else c_g * n / kept)

    def grad_scale(self, loss_reduction: str) -> float:
        """c_G of S_G = c_G Σ g gᵀ (n for a mean loss, 1/n for a sum; times n/m when subsampled)."""
        return self._scales(loss_reduction)[1]

    def averages(self, loss_reduction: str) -> tuple[Tensor, Tensor]:
        """(S_A, S_G) with the scaling of :mod:`rkfac.layers.base`."""
        c_a, c_g = self._scales(loss_reduction)
        if self.keep_rows:
            return _gram(torch.cat(self._input_parts)) * c_a, _gram(torch.cat(self._grad_parts)) * c_g
        if self.input_sum is None or self.grad_sum is None:
            raise RuntimeError("averages() needs both sums: check has_inputs and has_output_grads first")
        return self.input_sum * c_a, self.grad_sum * c_g

    def columns(self, loss_reduction: str) -> tuple[Tensor, Tensor]:
        """(C_A, C_G), d × N each, with C Cᵀ equal to :meth:`averages` (``keep_rows`` only)."""
        if not (self.keep_rows and self._input_parts and self._grad_parts):
            raise RuntimeError("columns() needs keep_rows and both kinds of rows")
        c_a, c_g = self._scales(loss_reduction)
        return torch.cat(self._input_parts).T * c_a**0.5, torch.cat(self._grad_parts).T * c_g**0.5

    def clear(self) -> None:
        self.input_sum, self.input_rows = None, 0
        self.grad_sum, self._samples_by_group = None, {}
        self._input_parts: list[Tensor] = []
        self._grad_parts: list[Tensor] = []


class StatisticsCollector:
    """K-FAC's capture sink: one :class:`StatisticSums` per layer, filled on factor steps.

    ``capture_output_grads`` is read when the backward reaches a layer: the preconditioner
    clears it in "mc" mode so that the user's own backward adds nothing to G; such gradients
    are counted in ``uncaptured_grads`` (so that a forgotten ``sample_fisher`` can be told).
    """

    def __init__(
        self,
        names: list[str],
        is_factor_step: Callable[[], bool],
        timer: PhaseTimer | None,
        reduce: bool = False,
        batch_dim: int = 0,
        sample_limit: int | None = None,
    ) -> None:
        self.sums = {name: StatisticSums() for name in names}
        self.reduce = reduce  # K-FAC-reduce: aggregate each call's shared rows per sample first
        self.batch_dim = batch_dim
        self.sample_limit = sample_limit  # statistics from the first m samples of each call (None: all)
        self.is_factor_step = is_factor_step
        self.timer = timer
        self.capture_output_grads = True
        self.uncaptured_grads = 0
        self.observer: RowObserver | None = None
        self.positions = PositionMask()  # positions left out of the statistics (rkfac.kfac.positions)

    def capturing(self) -> bool:
        return self.is_factor_step()

    def _kept(self, layer: LayerKind, tensor: Tensor, samples: int) -> tuple[Tensor, int, int]:
        """(tensor, kept samples m, batch dim): the first ``sample_limit`` samples of ``tensor``
        moved batch first (so its batch dim is then 0), or ``tensor`` as it is when the call has
        no more samples than that (its rows, and so the float sums, stay in the usual order)."""
        if self.sample_limit is None or samples <= self.sample_limit:
            return tensor, samples, self.batch_dim
        return layer.batch_first(tensor, self.batch_dim).narrow(0, 0, self.sample_limit), self.sample_limit, 0

    def on_input(self, name: str, layer: LayerKind, inputs: Tensor) -> PendingInputs:
        with torch.no_grad(), maybe_phase(self.timer, "statistics"):
            samples = layer.samples(inputs, self.batch_dim)
            inputs, kept, batch_dim = self._kept(layer, inputs, samples)
            positions = None
            if self.positions.kept is not None:  # the mask's rows are batch first: so are these
                inputs, batch_dim = layer.batch_first(inputs, batch_dim), 0
                positions = self.positions.rows(name, layer, inputs, samples)
            if layer.diagonal_input:  # an embedding: Σ e eᵀ is diagonal, kept as token counts
                keep = layer.row_mask(inputs)
                if positions is not None:
                    keep = positions if keep is None else keep & positions
                counts, count = layer.input_diagonal(inputs, layer.statistics_dtype, keep)
                diagonal = PendingInputs(counts, None, count, keep=keep, batch_first=positions is not None)
                if self.observer is not None:
                    diagonal.observed = self.observer.on_input_tokens(name, layer.input_tokens(inputs, keep))
                return diagonal
            if not self.reduce:
                rows = layer.input_rows(inputs).to(layer.statistics_dtype)
                if positions is not None:
                    rows = rows[positions]
            else:
                rows = layer.input_rows(layer.batch_first(inputs, batch_dim)).to(layer.statistics_dtype)
                rows = rows.unflatten(-2, (kept, -1)).mean(-2)
            pending = self.sums[name].pending(rows)
            pending.keep, pending.batch_first = positions, positions is not None
            if self.observer is not None:
                pending.observed = self.observer.on_input_rows(name, rows)
            return pending

    def on_output_grad(self, name: str, layer: LayerKind, grad: Tensor, call: Call) -> None:
        if not self.capture_output_grads:
            self.uncaptured_grads += 1
            return
        with torch.no_grad(), maybe_phase(self.timer, "statistics"):
            grad, kept, batch_dim = self._kept(layer, grad, call.samples)
            if call.context.batch_first:  # rows a position mask chose, in batch-first order
                grad = layer.batch_first(grad, batch_dim)
            if self.reduce and not layer.diagonal_input:
                rows = layer.output_grad_rows(layer.batch_first(grad, batch_dim)).to(layer.statistics_dtype)
                rows = rows.unflatten(-2, (kept, -1)).sum(-2)
            else:
                rows = layer.output_grad_rows(grad).to(layer.statistics_dtype)
            if call.context.keep is not None:
                rows = rows[call.context.keep]
            sums = self.sums[name]
            sums.commit(call.context)
            sums.add_output_grads(rows, call.samples, call.group, kept)
            if self.observer is not None:
                self.observer.on_output_grad_rows(name, call.context.observed, rows)

    def clear(self) -> None:
        for sums in self.sums.values():
            sums.clear()
        self.uncaptured_grads = 0
        if self.observer is not None:
            self.observer.clear_rows()
