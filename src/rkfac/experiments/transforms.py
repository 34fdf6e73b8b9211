"""Image batch transforms in plain torch (no torchvision): normalisation, random crop, horizontal flip.

Every function takes a whole batch ``(B, C, H, W)`` and works on it at once (no Python loop over
samples), on whatever device the batch is on. Random transforms draw only from the
``torch.Generator`` they are given, so a run's augmentation is reproducible from its seed and step.

Each random transform is split in two so tests can rebuild it independently: a *draw* helper
(:func:`crop_offsets`, :func:`flip_mask`) that consumes the generator, and an *apply* function
(:func:`crop_at`, :func:`flip_at`) that is deterministic given the draws. :func:`random_crop` and
:func:`random_hflip` are draw-then-apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Fill = float | Sequence[float] | Tensor


def _check_batch(images: Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(images.shape)}")


def _channel_statistics(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``mean`` and ``std`` as (C, 1, 1) tensors on the images' device and dtype, after checking them."""
    if len(mean) != len(std) or images.dim() < 3 or images.shape[-3] != len(mean):
        raise ValueError(
            f"normalize: images of shape {tuple(images.shape)} need one mean and one std per channel (dimension -3); "
            f"got {len(mean)} means and {len(std)} stds"
        )
    if min(std) <= 0:
        raise ValueError(f"normalize: every std must be positive, got {tuple(std)}")
    shape = (len(mean), 1, 1)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).reshape(shape)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).reshape(shape)
    return mean_t, std_t


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel standardisation ``(x − mean[c]) / std[c]`` of float images (…, C, H, W) in [0, 1].

    ``mean`` and ``std`` are the training set's per-channel pixel statistics, so the normalised
    training set has roughly zero mean and unit variance in every channel. Returns a new tensor.
    """
    mean_t, std_t = _channel_statistics(images, mean, std)
    return images.sub(mean_t).div_(std_t)


def normalize_(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """:func:`normalize` in place: for whole datasets, where a second copy costs hundreds of MB and most of the load time."""
    mean_t, std_t = _channel_statistics(images, mean, std)
    return images.sub_(mean_t).div_(std_t)


def zero_pixel_fill(mean: Sequence[float], std: Sequence[float]) -> tuple[float, ...]:
    """The normalised value of a raw 0 (black) pixel per channel: ``(0 − mean[c]) / std[c]``.

    Padding a normalised image with this value equals padding the raw image with 0 and then
    normalising, which is what torchvision's ``RandomCrop(padding=4)`` before ``Normalize`` does.
    """
    return tuple(-m / s for m, s in zip(mean, std, strict=True))


def crop_offsets(
    batch: int, padding: int, generator: torch.Generator, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Top-left corners (rows, cols) of each crop window in the padded image, each uniform on {0, …, 2·padding}.

    Rows are drawn before columns; ``device`` defaults to the generator's (they must agree).
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    device = generator.device if device is None else device
    rows = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    cols = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    return rows, cols


def crop_at(images: Tensor, padding: int, rows: Tensor, cols: Tensor, fill: Fill = 0.0) -> Tensor:
    """Pad every image by ``padding`` on all four sides with ``fill``, then cut the H × W window at (rows[b], cols[b]).

    With P the padded batch (B, C, H + 2p, W + 2p), output[b, c, i, j] = P[b, c, rows[b] + i, cols[b] + j]:
    one advanced-indexing gather for the whole batch. Offsets of (p, p) return the image unchanged;
    each must lie in {0, …, 2p}. ``fill`` is a scalar or one value per channel.
    """
    _check_batch(images)
    batch = images.shape[0]
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if rows.shape != (batch,) or cols.shape != (batch,):
        raise ValueError(
            f"crop_at needs one row and one column offset per image ({batch}), "
            f"got shapes {tuple(rows.shape)} and {tuple(cols.shape)}"
        )
    if batch and (int(torch.minimum(rows, cols).min()) < 0 or int(torch.maximum(rows, cols).max()) > 2 * padding):
        raise ValueError(f"crop offsets must lie in [0, {2 * padding}] for padding {padding}")
    return _gather_crop(images, padding, rows, cols, fill)


def _gather_crop(images: Tensor, padding: int, rows: Tensor, cols: Tensor, fill: Fill) -> Tensor:
    """:func:`crop_at` without the offset range check, which would cost a device sync per batch."""
    batch, channels, height, width = images.shape
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=images.device).flatten()
    if fill_t.numel() not in (1, channels):
        raise ValueError(f"fill must be a scalar or one value per channel ({channels}), got {fill_t.numel()} values")
    padded = fill_t.reshape(1, -1, 1, 1).expand(batch, channels, height + 2 * padding, width + 2 * padding).clone()
    padded[:, :, padding : padding + height, padding : padding + width] = images
    device = images.device
    row_index = (rows.to(device)[:, None] + torch.arange(height, device=device))[:, None, :, None]
    col_index = (cols.to(device)[:, None] + torch.arange(width, device=device))[:, None, None, :]
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    channel_index = torch.arange(channels, device=device)[None, :, None, None]
    return padded[batch_index, channel_index, row_index, col_index]


def random_crop(images: Tensor, padding: int, generator: torch.Generator, fill: Fill = 0.0) -> Tensor:
    """Random translation by up to ``padding`` pixels each way, with ``fill`` in the uncovered border.

    Same distribution as torchvision's ``RandomCrop(H, padding=padding, fill=fill)``: pad, then a
    window whose corner is uniform over all (2p + 1)² positions. The offsets are drawn on the
    generator's device (:func:`crop_offsets`) and moved to the batch's.
    """
    _check_batch(images)
    rows, cols = crop_offsets(images.shape[0], padding, generator)
    return _gather_crop(images, padding, rows, cols, fill)


def flip_mask(batch: int, generator: torch.Generator, device: torch.device | None = None, p: float = 0.5) -> Tensor:
    """Which images to flip: independent Bernoulli(p) draws, ``rand < p``; ``device`` defaults to the generator's."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability p must be in [0, 1], got {p}")
    device = generator.device if device is None else device
    return torch.rand(batch, generator=generator, device=device) < p


def flip_at(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right (reverse the W axis of) exactly the images where ``mask`` is true."""
    _check_batch(images)
    if mask.shape != (images.shape[0],):
        raise ValueError(f"flip mask must have one entry per image ({images.shape[0]}), got shape {tuple(mask.shape)}")
    return torch.where(mask.to(images.device)[:, None, None, None], images.flip(-1), images)


def random_hflip(images: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror left-right each image independently with probability ``p``."""
    _check_batch(images)
    return flip_at(images, flip_mask(images.shape[0], generator, p=p))


def pad_crop_flip(images: Tensor, generator: torch.Generator, fill: Fill, padding: int = 4, p: float = 0.5) -> Tensor:
    """The standard CIFAR augmentation: :func:`random_crop` (``padding``), then :func:`random_hflip` (``p``).

    Draw order on the generator: crop rows, crop columns, flip mask.
    """
    return random_hflip(random_crop(images, padding, generator, fill), generator, p)


class PadCropFlip:
    """CIFAR-10 training augmentation on *normalised* batches: random crop (pad 4) + horizontal flip (p = 0.5).

    The border is filled with :func:`zero_pixel_fill` — the normalised value of a black pixel —
    so it matches torchvision's recipe, which pads the raw image with 0 before normalising
    (normalisation is per-pixel affine, so it commutes with padding, cropping and flipping).
    A class rather than a closure so that a dataset holding it stays picklable.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], padding: int = 4, p: float = 0.5) -> None:
        if padding < 0 or not 0.0 <= p <= 1.0:
            raise ValueError(f"PadCropFlip needs padding >= 0 and p in [0, 1], got padding={padding}, p={p}")
        self.fill = torch.tensor(zero_pixel_fill(mean, std))
        self.padding = padding
        self.p = p

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return pad_crop_flip(images, generator, self.fill, self.padding, self.p)

    def __repr__(self) -> str:
        return f"PadCropFlip(padding={self.padding}, p={self.p}, fill={[round(v, 4) for v in self.fill.tolist()]})"
