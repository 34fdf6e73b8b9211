"""Batch transforms against per-sample references built here with explicit padding, slicing and index reversal.

The random transforms are rebuilt from their draws: a generator seeded the same way gives the
same offsets / flip mask through the draw helpers, which the reference then applies one sample
at a time.
"""

from __future__ import annotations

import pytest
import torch

from rkfac.experiments.transforms import (
    PadCropFlip,
    crop_at,
    crop_offsets,
    flip_at,
    flip_mask,
    normalize,
    normalize_,
    pad_crop_flip,
    random_crop,
    random_hflip,
    zero_pixel_fill,
)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_crop(image: torch.Tensor, padding: int, row: int, col: int, fill: list[float]) -> torch.Tensor:
    """One image (C, H, W): a canvas of the fill values, the image pasted in its middle, the window at (row, col)."""
    _, height, width = image.shape
    canvas = torch.stack([torch.full((height + 2 * padding, width + 2 * padding), value) for value in fill])
    canvas[:, padding : padding + height, padding : padding + width] = image
    return canvas[:, row : row + height, col : col + width]


def reference_flip(image: torch.Tensor) -> torch.Tensor:
    return image[..., torch.arange(image.shape[-1] - 1, -1, -1)]


def test_crop_at_equals_explicit_padding_and_slicing() -> None:
    images = torch.randn(7, 3, 6, 5)
    fill = [-1.5, 0.25, 2.0]
    rows, cols = torch.tensor([0, 4, 2, 1, 3, 0, 4]), torch.tensor([4, 0, 2, 3, 1, 0, 4])
    cropped = crop_at(images, 2, rows, cols, fill)
    assert cropped.shape == images.shape and cropped.dtype == images.dtype
    for b in range(7):
        torch.testing.assert_close(cropped[b], reference_crop(images[b], 2, int(rows[b]), int(cols[b]), fill), rtol=0, atol=0)
    torch.testing.assert_close(cropped[2], images[2], rtol=0, atol=0)  # offset (p, p): unchanged
    torch.testing.assert_close(crop_at(images, 2, rows, cols, 0.5), crop_at(images, 2, rows, cols, [0.5] * 3))


def test_random_crop_is_crop_at_with_the_drawn_offsets() -> None:
    images = torch.randn(16, 3, 8, 8)
    fill = torch.tensor([0.1, -0.2, 0.3])
    rows, cols = crop_offsets(16, 3, seeded(11))
    cropped = random_crop(images, 3, seeded(11), fill)
    for b in range(16):
        torch.testing.assert_close(
            cropped[b], reference_crop(images[b], 3, int(rows[b]), int(cols[b]), fill.tolist()), rtol=0, atol=0
        )
    torch.testing.assert_close(random_crop(images, 0, seeded(11)), images, rtol=0, atol=0)


def test_crop_offsets_are_uniform_on_the_padded_range() -> None:
    rows, cols = crop_offsets(50_000, 2, seeded(0))
    for offsets in (rows, cols):
        counts = torch.bincount(offsets, minlength=5)
        assert len(counts) == 5  # values 0..4 = 0..2p only
        assert torch.all((counts - 10_000).abs() < 500), counts  # 5 standard deviations of a binomial
    assert not torch.equal(rows, cols)


def test_flip_at_flips_exactly_the_masked_images() -> None:
    images = torch.randn(6, 2, 4, 5)
    mask = torch.tensor([True, False, False, True, True, False])
    flipped = flip_at(images, mask)
    for b in range(6):
        torch.testing.assert_close(flipped[b], reference_flip(images[b]) if mask[b] else images[b], rtol=0, atol=0)


def test_random_hflip_uses_the_drawn_mask_and_p() -> None:
    images = torch.randn(32, 3, 4, 4)
    mask = flip_mask(32, seeded(3))
    flipped = random_hflip(images, seeded(3))
    for b in range(32):
        torch.testing.assert_close(flipped[b], reference_flip(images[b]) if mask[b] else images[b], rtol=0, atol=0)
    assert 0 < int(mask.sum()) < 32
    assert torch.equal(random_hflip(images, seeded(3), p=0.0), images)
    assert torch.equal(random_hflip(images, seeded(3), p=1.0), images.flip(-1))
    assert abs(flip_mask(40_000, seeded(1), p=0.3).double().mean().item() - 0.3) < 0.012  # 5 standard deviations


def test_pad_crop_flip_matches_torchvision_recipe_on_raw_pixels() -> None:
    """Augmenting normalised images with the black-pixel fill = pad raw pixels with 0, crop, flip, then normalise."""
    raw = torch.rand(12, 3, 32, 32)
    augment = PadCropFlip(CIFAR_MEAN, CIFAR_STD)
    augmented = augment(normalize(raw, CIFAR_MEAN, CIFAR_STD), seeded(5))
    draws = seeded(5)  # the documented draw order: crop rows, crop columns, flip mask
    rows, cols = crop_offsets(12, 4, draws)
    mask = flip_mask(12, draws)
    for b in range(12):
        window = reference_crop(raw[b], 4, int(rows[b]), int(cols[b]), [0.0, 0.0, 0.0])
        expected = normalize(reference_flip(window) if mask[b] else window, CIFAR_MEAN, CIFAR_STD)
        torch.testing.assert_close(augmented[b], expected)
    assert augmented.shape == raw.shape and augmented.dtype == torch.float32
    torch.testing.assert_close(augment.fill, torch.tensor([-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)]))
    assert zero_pixel_fill((0.5,), (0.25,)) == (-2.0,)


def test_random_transforms_are_deterministic_given_the_generator() -> None:
    images = torch.randn(20, 3, 32, 32)
    original = images.clone()
    augment = PadCropFlip(CIFAR_MEAN, CIFAR_STD)
    first = augment(images, seeded(7))
    assert torch.equal(first, augment(images, seeded(7)))
    assert torch.equal(first, pad_crop_flip(images, seeded(7), augment.fill))
    assert not torch.equal(first, augment(images, seeded(8)))
    assert torch.equal(images, original)  # the input is not modified
    assert augment(images[:0], seeded(7)).shape == (0, 3, 32, 32)


def test_normalize_per_channel() -> None:
    images = torch.rand(4, 3, 5, 5)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.4, 0.8)
    result = normalize(images, mean, std)
    for c in range(3):
        torch.testing.assert_close(result[:, c], (images[:, c] - mean[c]) / std[c])
    torch.testing.assert_close(normalize(images[0], mean, std), result[0])  # a single (C, H, W) image too
    copy = images.clone()
    assert normalize_(copy, mean, std) is copy
    torch.testing.assert_close(copy, result)


def test_bad_arguments_are_value_errors() -> None:
    images = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"one mean and one std per channel .* got 1 means and 1 stds"):
        normalize(images, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="every std must be positive"):
        normalize(images, (0.5,) * 3, (0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="padding must be >= 0, got -1"):
        random_crop(images, -1, seeded(0))
    with pytest.raises(ValueError, match=r"crop offsets must lie in \[0, 4\]"):
        crop_at(images, 2, torch.tensor([0, 5]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="one row and one column offset per image"):
        crop_at(images, 2, torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"fill must be a scalar or one value per channel \(3\), got 2"):
        random_crop(images, 2, seeded(0), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        random_hflip(images, seeded(0), p=1.5)
    with pytest.raises(ValueError, match=r"expected a batch of images \(B, C, H, W\), got a tensor of shape \(3, 4, 4\)"):
        random_hflip(images[0], seeded(0))
