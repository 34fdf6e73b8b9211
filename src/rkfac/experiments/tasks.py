"""What a run learns, and so its loss, its evaluation and what its targets measure.

- :class:`Classification` (every model but the autoencoder): the model maps images to logits,
  the loss is the cross-entropy with the labels, evaluation reports test loss and accuracy,
  and targets are test accuracies (reached when ``test_acc >= level``).
- :class:`Reconstruction` (the ``autoencoder`` model, issue 19's ``fashion-autoencoder``): the
  model maps an image's pixels in [0, 1] (flattened) to a reconstruction of them. The loss is
  the squared error summed over the pixels, averaged over the batch,
  ``L = (1/B) Σ_b Σ_p (x̂_bp − x_bp)²``, as the deep-autoencoder literature reports it
  (Hinton & Salakhutdinov 2006; Martens 2010; Martens & Grosse 2015 report squared error per
  image). The output is linear, so this is the negative log-likelihood of a Gaussian
  N(x̂, I/2) up to a constant: its Fisher is the Gauss–Newton matrix, and the MC Fisher draws
  targets from that Gaussian (``mc_loss="mse"``). Hinton & Salakhutdinov trained logistic
  outputs with cross-entropy; a Bernoulli Fisher would need a sampler rkfac does not have,
  and the squared error is what issues 20 and 21 measured. Targets are training-loss levels
  (reached when ``train_eval_loss <= level``), the literature's measure of an optimizer on this
  problem; the test reconstruction error is reported beside them.

Any run may also be timed at training-loss levels (``target_loss``), a classifier's too.

The training loss a target is judged on is not the noisy mean of the steps' batch losses but
an evaluation, in eval mode, on a fixed subset of the training set: its first
:data:`TRAIN_EVAL_SAMPLES` images (the whole set when smaller). Like the test evaluation it is
never counted as training time and draws no random numbers.

Every task gives the run an ``objective`` (lower is better): the test error 1 − accuracy for
classification, the final training loss for reconstruction. Tuning picks on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EVAL_BATCH = 1000
#: The training images a training-loss evaluation uses (the first ones of the set).
TRAIN_EVAL_SAMPLES = 10_000


@dataclass(frozen=True)
class Target:
    """A level a run is timed at: ``metric`` (``test_acc`` or ``train_eval_loss``) reaching ``level``."""

    metric: str  # "test_acc" or "train_eval_loss"
    level: float

    @property
    def key(self) -> str:
        """How the target is spelled in ``summary["targets"]`` (accuracies as before: ``"0.89"``)."""
        return f"{self.level:g}" if self.metric == "test_acc" else f"loss:{self.level:g}"

    @property
    def label(self) -> str:
        """A table header: ``89%`` for an accuracy, ``loss 12`` for a training-loss level."""
        return f"{self.level:.0%}" if self.metric == "test_acc" else f"loss {self.level:g}"

    def met(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value >= self.level if self.metric == "test_acc" else value <= self.level


class Task(Protocol):
    """The loss and evaluation of a run (see the module docstring)."""

    @property
    def mc_loss(self) -> str:
        """The predictive distribution the MC Fisher samples (:mod:`rkfac.mc_fisher`)."""
        ...

    def batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(model input, loss target) of a batch of normalised images and their labels."""
        ...

    def loss(self, outputs: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """The loss of a batch, averaged over its samples (``reduction="sum"``: summed)."""
        ...

    def evaluate(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, float]:
        """Mean loss (and accuracy, for classification) over a dataset, in eval mode."""
        ...


def _evaluate(model: nn.Module, task: Task, images: Tensor, labels: Tensor, *, accuracy: bool) -> dict[str, float]:
    """Summed loss (and correct predictions) over batches of :data:`EVAL_BATCH`, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(images), EVAL_BATCH):
            inputs, targets = task.batch(images[first : first + EVAL_BATCH], labels[first : first + EVAL_BATCH])
            outputs = model(inputs)
            total_loss += float(task.loss(outputs, targets, reduction="sum"))
            if accuracy:
                correct += int((outputs.argmax(1) == targets).sum())
    model.train(was_training)
    result = {"loss": total_loss / len(images)}
    if accuracy:
        result["acc"] = correct / len(images)
    return result


@dataclass(frozen=True)
class Classification:
    mc_loss: str = "cross_entropy"

    def batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return images, labels

    def loss(self, outputs: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(outputs, targets, reduction=reduction)

    def evaluate(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, float]:
        return _evaluate(model, self, images, labels, accuracy=True)


@dataclass(frozen=True)
class Reconstruction:
    """Images back to pixels in [0, 1]: ``x = image · std + mean`` undoes the dataset's
    normalisation (one mean and std per channel), flattened to (B, C·H·W)."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    mc_loss: str = "mse"

    def pixels(self, images: Tensor) -> Tensor:
        if len(self.mean) == 1 and len(self.std) == 1:  # one channel: scalars, no tensor built per step
            return (images * self.std[0] + self.mean[0]).flatten(1)
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return (images * std + mean).flatten(1)

    def batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        pixels = self.pixels(images)
        return pixels, pixels

    def loss(self, outputs: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        per_sample = (outputs - targets).pow(2).sum(1)
        return per_sample.mean() if reduction == "mean" else per_sample.sum()

    def evaluate(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, float]:
        return _evaluate(model, self, images, labels, accuracy=False)


#: Models that reconstruct their input rather than classify it.
RECONSTRUCTING_MODELS = ("autoencoder",)


def task_for(model: str, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)) -> Task:
    """The task a model is trained for; ``mean``/``std``: the dataset's normalisation."""
    if model in RECONSTRUCTING_MODELS:
        return Reconstruction(mean=mean, std=std)
    return Classification()
