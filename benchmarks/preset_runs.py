"""What the training benchmarks share: a preset's model and optimizer, and its batches in order.

Scripts in this folder run as ``python benchmarks/<name>.py``, so this module is importable
as ``preset_runs`` from them (the script's folder is first on ``sys.path``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rkfac.experiments.config import RunConfig
from rkfac.experiments.datasets import ImageDataset
from rkfac.experiments.models import build_model
from rkfac.experiments.optimizers import build_optimizer
from rkfac.timing import PhaseTimer


def model_and_optimizer(
    config: RunConfig, data: ImageDataset, timer: PhaseTimer | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The config's model (seed 0 init, ``width_scale`` applied) and optimizer."""
    torch.manual_seed(0)
    model = build_model(config.model, data.input_shape, data.num_classes, width_scale=config.width_scale, widths=config.widths)
    return model, build_optimizer(config, model, len(data.train_images) // config.batch_size, timer)


def batch_at(data: ImageDataset, step: int, size: int) -> tuple[Tensor, Tensor]:
    """Training batch number ``step``: consecutive slices of the training set, wrapping around."""
    first = step * size % (len(data.train_images) - size)
    return data.train_images[first : first + size], data.train_labels[first : first + size]
