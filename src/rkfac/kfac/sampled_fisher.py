"""``fisher="mc"``: the backward with labels sampled from the model's predictive distribution.

The true Fisher is E_{y ~ p(y|x)}[∇log p ∇log pᵀ]; one sampled label per input gives an unbiased
estimate of it (:mod:`rkfac.mc_fisher`). On factor steps the preconditioner runs one extra
backward of the sampled loss with ``torch.autograd.grad`` (so ``.grad`` is not touched and the
graph is kept for the user's own backward) while the collector captures output gradients; during
the user's backward it captures none. The labels come from one generator seeded by the
preconditioner's seed and saved in its state_dict, so a resumed run samples the same labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rkfac.kfac.statistics import StatisticsCollector
from rkfac.mc_fisher import sampled_loss
from rkfac.seeding import keyed_generator


class LabelSampler:
    """The sampled-label backward and its generator, for one preconditioner."""

    def __init__(self, loss: str, loss_reduction: str, seed: int, collector: StatisticsCollector) -> None:
        self.loss, self.loss_reduction, self.seed = loss, loss_reduction, seed
        self.collector = collector
        self.generator: torch.Generator | None = None

    def backward(self, outputs: Tensor, weights: list[Tensor], kept: Tensor | None = None) -> None:
        """Capture G from the gradient of the sampled loss at ``outputs`` w.r.t. ``weights``
        (``kept``: the positions the training loss keeps, :func:`rkfac.mc_fisher.sampled_loss`)."""
        if self.generator is None or self.generator.device != outputs.device:
            self.generator = keyed_generator(outputs.device, self.seed, "mc-labels")
        loss = sampled_loss(outputs, self.loss, self.loss_reduction, self.generator, kept)
        self.collector.capture_output_grads = True
        try:
            torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        finally:
            self.collector.capture_output_grads = False

    def check(self) -> None:
        """Refuse a factor step whose user backward ran without a sampled backward before it."""
        sums = self.collector.sums.values()
        if self.collector.uncaptured_grads and not any(s.has_output_grads for s in sums):
            self.collector.clear()
            raise RuntimeError(
                "fisher='mc' saw the backward of this factor step but no sampled-label gradients: "
                "call pre.sample_fisher(outputs) after the forward and before loss.backward()"
            )

    def state(self) -> Tensor | None:
        return None if self.generator is None else self.generator.get_state()

    def load(self, state: Tensor | None) -> None:
        if state is not None:
            self.generator = torch.Generator()
            self.generator.set_state(state)
