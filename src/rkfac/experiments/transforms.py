"""Batch augmentations in plain torch (no torchvision): random crop with padding, horizontal flip.

Both act on a whole batch (B, C, H, W) at once and draw their randomness only from the given
``torch.Generator``, so a run's augmentation is reproducible from its seed and step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def crop_offsets(batch: int, padding: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """Top-left corners (rows, cols) in the padded image, each uniform on {0, …, 2·padding}."""
    rows = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    cols = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    return rows, cols


def crop_at(images: Tensor, padding: int, rows: Tensor, cols: Tensor, fill: Tensor) -> Tensor:
    """Pad each image by ``padding`` with the per-channel ``fill``, then cut an H × W window at (row, col).

    The window is gathered with one advanced-indexing operation: index [b, c, row_b + i, col_b + j].
    """
    batch, channels, height, width = images.shape
    padded = fill.reshape(1, channels, 1, 1).expand(batch, channels, height + 2 * padding, width + 2 * padding).clone()
    padded[:, :, padding : padding + height, padding : padding + width] = images
    row_index = (rows[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
    col_index = (cols[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
    batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[batch_index, channel_index, row_index, col_index]


def random_crop(images: Tensor, padding: int, generator: torch.Generator, fill: Tensor) -> Tensor:
    rows, cols = crop_offsets(images.shape[0], padding, generator, images.device)
    return crop_at(images, padding, rows, cols, fill)


def flip_mask(batch: int, generator: torch.Generator, device: torch.device, p: float = 0.5) -> Tensor:
    return torch.rand(batch, generator=generator, device=device) < p


def random_hflip(images: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror left-right the images drawn with probability ``p``."""
    mask = flip_mask(images.shape[0], generator, images.device, p)
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x − mean) / std per channel, for images (B, C, H, W) in [0, 1]."""
    shape = (1, len(mean), 1, 1)
    return (images - torch.tensor(mean).reshape(shape)) / torch.tensor(std).reshape(shape)


class PadCropFlip:
    """CIFAR-10 training augmentation on normalised batches: random crop (pad 4) + horizontal flip.

    torchvision pads the raw image with black (0) before normalising; on normalised images the
    same pixel is (0 − mean)/std per channel, which is the fill used here, so the two agree.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 4) -> None:
        self.fill = -torch.tensor(mean) / torch.tensor(std)
        self.padding = padding

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        cropped = random_crop(images, self.padding, generator, self.fill.to(images.device, images.dtype))
        return random_hflip(cropped, generator)
