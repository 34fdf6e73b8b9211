"""Datasets held in memory as normalised tensors: Fashion-MNIST, CIFAR-10 and a synthetic set.

Both real datasets fit in memory (Fashion-MNIST 60 000 × 1 × 28 × 28, CIFAR-10 50 000 × 3 × 32 × 32
as float32: 190 MB and 610 MB), so they are decoded and normalised once and a training step only
indexes tensors; there is no data-loader process.

An explicit ``data_dir`` (``--data-dir``) is used or refused, never replaced: the files are read
from ``data_dir`` or the dataset's subdirectory in it (Fashion-MNIST may be downloaded into it),
and otherwise the error names the directory and the files it lacks. Without one, Fashion-MNIST
is looked for, in order, in ``$RKFAC_DATA`` and ``$RKFAC_DATA/fashion-mnist``; Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``); the cache
``$XDG_CACHE_HOME/rkfac/fashion-mnist`` (default ``~/.cache/rkfac/fashion-mnist``). The first
directory holding all four IDX files wins (each may be gzipped or not). When none does, they are
downloaded into the cache (:mod:`rkfac.experiments.download`). Files are verified against known
SHA-256 hashes wherever they were found, so a corrupt copy is reported instead of silently
trained on.

CIFAR-10 comes from the python-pickle batch directory (``data_batch_1`` … ``data_batch_5``,
``test_batch``) found in ``data_dir`` or ``data_dir/cifar-10-batches-py``, else in
``$RKFAC_DATA/cifar-10-batches-py``; it is not downloaded.

Every loaded dataset lists the files it read (``ImageDataset.files``: path and SHA-256 of the
bytes on disk), which a run records in ``env.json``; the synthetic set reads none.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rkfac.experiments.download import (
    FASHION_MNIST_FILES,
    HOW_TO_GET,
    DatasetUnavailableError,
    download_fashion_mnist,
    verify,
)
from rkfac.experiments.transforms import PadCropFlip, normalize_

DATASETS = ("fashion-mnist", "cifar10", "synthetic")
DATA_VARIABLE = "RKFAC_DATA"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Per-channel pixel statistics (pixels in [0, 1]) of the training sets, the usual published values.
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_SUBDIR = "cifar-10-batches-py"


@dataclass(frozen=True)
class DataFile:
    """A file a dataset was read from: its path (absolute, links not followed) and the SHA-256 of its bytes."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: Path) -> DataFile:
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
        return cls(str(path.absolute()), digest.hexdigest())


@dataclass(frozen=True)
class ImageDataset:
    """A classification dataset as in-memory tensors.

    Images are float32 (N, C, H, W), already normalised; labels are int64 (N,) in
    [0, num_classes). ``augment`` maps a normalised training batch and a generator to an
    augmented batch of the same shape (``None``: train on the images as they are). ``files``:
    the files the dataset was read from, in the order read. ``mean`` and ``std``: the
    normalisation per channel, ``image = (pixel − mean) / std`` with pixels in [0, 1] (0 and 1
    for the synthetic set, whose images are not pixels), so that a task can recover the pixels.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None
    files: tuple[DataFile, ...] = ()
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        channels, height, width = self.train_images.shape[1:]
        return channels, height, width


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    download: bool = True,
    synthetic_train: int = 512,
    synthetic_test: int = 256,
    seed: int = 0,
) -> ImageDataset:
    """Load one of :data:`DATASETS`. ``download`` only concerns Fashion-MNIST; the sizes and seed only the synthetic set."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download=download)
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name == "synthetic":
        return synthetic_dataset(synthetic_train, synthetic_test, seed)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _searched(places: list[Path]) -> str:
    return ", ".join(str(place) for place in places)


def _unique(places: list[Path]) -> list[Path]:
    return list(dict.fromkeys(places))


def to_normalised_float(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 images (N, C, H, W) → float32 ``(pixels / 255 − mean[c]) / std[c]``, with a single allocation."""
    return normalize_(torch.from_numpy(pixels.astype(np.float32)).div_(255), mean, std)


# ---------------------------------------------------------------- Fashion-MNIST


def cache_dir() -> Path:
    """Where downloads go without ``data_dir``: ``$XDG_CACHE_HOME/rkfac/fashion-mnist``, else ``~/.cache/rkfac/fashion-mnist``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rkfac" / "fashion-mnist"


def fashion_mnist_candidates(data_dir: str | None) -> list[Path]:
    """The directories searched for Fashion-MNIST, in order: an explicit ``data_dir`` and its
    ``fashion-mnist/`` alone, else the places of the module docstring."""
    if data_dir:
        return _unique([Path(data_dir), Path(data_dir) / "fashion-mnist"])
    root = os.environ.get(DATA_VARIABLE)
    places = [Path(root), Path(root) / "fashion-mnist"] if root else []
    return _unique([*places, DEBIAN_FASHION_MNIST, cache_dir()])


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name`` or, failing that, the same name without ``.gz`` (a gunzipped copy)."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _lacking(folder: Path) -> str:
    """What ``folder`` lacks of Fashion-MNIST, as a predicate: "lacks a, b" or "does not exist"."""
    if not folder.is_dir():
        return "does not exist"
    return "lacks " + ", ".join(name for name in FASHION_MNIST_FILES if _find(folder, name) is None)


def locate_fashion_mnist(data_dir: str | None, download: bool = True) -> dict[str, Path]:
    """Paths of the four files (keyed by their ``.gz`` names) from the first directory holding all of them.

    Downloads them when no directory does and ``download`` is true: into ``data_dir`` if given
    (an explicit directory is used or refused, never replaced by another copy), else into the
    cache. The files are not verified here; :func:`load_fashion_mnist` does that while reading them.
    """
    searched = fashion_mnist_candidates(data_dir)
    for folder in searched:
        found = {name: _find(folder, name) for name in FASHION_MNIST_FILES}
        if all(found.values()):
            return {name: path for name, path in found.items() if path is not None}
    if data_dir:
        return _download_into_data_dir(Path(data_dir), download)
    if not download:
        raise DatasetUnavailableError(
            f"Fashion-MNIST not found in {_searched(searched)} (download=False, so not downloaded); "
            f"expected {', '.join(FASHION_MNIST_FILES)}; {HOW_TO_GET}"
        )
    try:
        return download_fashion_mnist(cache_dir())
    except DatasetUnavailableError as error:
        raise type(error)(f"Fashion-MNIST not found in {_searched(searched)}, and {error}") from error


def _download_into_data_dir(given: Path, download: bool) -> dict[str, Path]:
    """The files downloaded into an explicit data directory that lacks them, or an error naming it and what it lacks."""
    inside = given / "fashion-mnist"
    where = f"Fashion-MNIST not found in the data directory {given} (--data-dir): it {_lacking(given)}" + (
        f" (and {inside} {_lacking(inside)})" if inside.is_dir() else ""
    )
    rule = "an explicit data directory is used or refused, never replaced by another copy"
    if not download:
        raise DatasetUnavailableError(f"{where}; {rule} (download=False, so not downloaded into it); {HOW_TO_GET}")
    try:
        return download_fashion_mnist(given)
    except DatasetUnavailableError as error:
        raise type(error)(f"{where}; {rule}, and downloading into it failed: {error}") from error


def parse_idx(content: bytes, source: Path) -> np.ndarray:
    """An IDX array of unsigned bytes.

    Layout: two zero bytes, the type code 0x08 (uint8), the number of dimensions d, then d
    big-endian int32 sizes, then the data in row-major (C) order. ``source`` names the file in errors.
    """
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] != 0x08:
        raise DatasetUnavailableError(
            f"{source} is not an IDX uint8 file (header bytes {content[:4].hex() or 'none'}, expected 000008 then the rank); "
            f"{HOW_TO_GET}"
        )
    ndim = content[3]
    offset = 4 + 4 * ndim
    if len(content) < offset:
        raise DatasetUnavailableError(
            f"{source} ends inside its IDX header ({len(content)} bytes for {ndim} dimensions); {HOW_TO_GET}"
        )
    dims = [int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(content) - offset != int(np.prod(dims)):
        raise DatasetUnavailableError(
            f"{source} holds {len(content) - offset} bytes of data, its header says {dims}; {HOW_TO_GET}"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(data_dir: str | None = None, *, download: bool = True) -> ImageDataset:
    """Fashion-MNIST: images (N, 1, 28, 28) scaled to [0, 1] and normalised with mean 0.2860, std 0.3530; no augmentation."""
    files = locate_fashion_mnist(data_dir, download)
    arrays = {name: parse_idx(verify(path, name), path) for name, path in files.items()}
    read = tuple(DataFile.of(path) for path in files.values())

    def images(name: str) -> Tensor:
        return to_normalised_float(arrays[name][:, None], FASHION_MEAN, FASHION_STD)

    def labels(name: str) -> Tensor:
        return torch.from_numpy(arrays[name].astype(np.int64))

    return ImageDataset(
        "fashion-mnist",
        images("train-images-idx3-ubyte.gz"),
        labels("train-labels-idx1-ubyte.gz"),
        images("t10k-images-idx3-ubyte.gz"),
        labels("t10k-labels-idx1-ubyte.gz"),
        num_classes=10,
        files=read,
        mean=FASHION_MEAN,
        std=FASHION_STD,
    )


# ---------------------------------------------------------------- CIFAR-10


def cifar10_candidates(data_dir: str | None) -> list[Path]:
    """The directories searched for the CIFAR-10 batches, in order: an explicit ``data_dir``
    and its ``cifar-10-batches-py/`` alone, else ``$RKFAC_DATA/cifar-10-batches-py``."""
    if data_dir:
        return _unique([Path(data_dir), Path(data_dir) / CIFAR_SUBDIR])
    return [Path(os.environ[DATA_VARIABLE]) / CIFAR_SUBDIR] if os.environ.get(DATA_VARIABLE) else []


def locate_cifar10(data_dir: str | None) -> Path:
    """The first candidate directory holding all six batch files."""
    places = cifar10_candidates(data_dir)
    expected = (*CIFAR_TRAIN, CIFAR_TEST)
    partial = []
    for folder in places:
        missing = [name for name in expected if not (folder / name).is_file()]
        if not missing:
            return folder
        if len(missing) < len(expected):
            partial.append(f"{folder} lacks {', '.join(missing)}")
    where = _searched(places) if places else "nowhere (no data_dir given and $RKFAC_DATA unset)"
    raise DatasetUnavailableError(
        f"CIFAR-10 python batches ({', '.join(expected)}) not found in {where}"
        + (f" ({'; '.join(partial)})" if partial else "")
        + "; CIFAR-10 is not downloaded automatically: get cifar-10-python.tar.gz from the dataset's site, unpack it, "
        "and pass --data-dir (the directory holding cifar-10-batches-py/) or set $RKFAC_DATA"
    )


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from one pickled batch.

    Each row of ``b"data"`` is one image as 3072 bytes: the 1024 red pixels, then green, then
    blue, each channel row-major, so a reshape to (3, 32, 32) gives CHW directly.
    """
    try:
        with open(path, "rb") as stream:
            batch = pickle.load(stream, encoding="bytes")
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        raise DatasetUnavailableError(
            f"{path} is not a readable CIFAR-10 batch ({type(error).__name__}: {error}); re-extract cifar-10-python.tar.gz"
        ) from error
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DatasetUnavailableError(
            f"{path}: data of shape {data.shape} and dtype {data.dtype} with labels of shape {labels.shape}; "
            "expected uint8 (N, 3072) and N labels; re-extract cifar-10-python.tar.gz"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetUnavailableError(f"{path}: labels range over [{labels.min()}, {labels.max()}], expected [0, 9]")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | None = None) -> ImageDataset:
    """CIFAR-10: images (N, 3, 32, 32) normalised per channel; augmentation random crop (pad 4) + horizontal flip.

    The training set is the five batches in order, so ``train_labels[k]`` is label
    ``k mod n`` of batch ``k // n + 1`` (n images per batch).
    """
    folder = locate_cifar10(data_dir)
    train = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN]
    test_images, test_labels = read_cifar_batch(folder / CIFAR_TEST)
    read = tuple(DataFile.of(folder / name) for name in (*CIFAR_TRAIN, CIFAR_TEST))

    return ImageDataset(
        "cifar10",
        to_normalised_float(np.concatenate([images for images, _ in train]), CIFAR_MEAN, CIFAR_STD),
        torch.from_numpy(np.concatenate([labels for _, labels in train])),
        to_normalised_float(test_images, CIFAR_MEAN, CIFAR_STD),
        torch.from_numpy(test_labels),
        num_classes=10,
        augment=PadCropFlip(CIFAR_MEAN, CIFAR_STD),
        files=read,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
    )


# ---------------------------------------------------------------- synthetic


def synthetic_dataset(train: int = 512, test: int = 256, seed: int = 0, classes: int = 10) -> ImageDataset:
    """Fashion-MNIST-shaped (1, 28, 28) images: a smooth class prototype plus unit Gaussian noise.

    The prototypes are white noise blurred by a 5 × 5 box filter (pixel std about 0.2), so one
    image's signal is weak next to its noise but summed over 784 pixels the classes separate:
    a least-squares linear classifier on 512 samples reaches about 80% test accuracy, not 100%.
    Labels are balanced (``arange(n) mod classes``, shuffled). Everything is drawn from one
    generator seeded with ``seed``: prototypes, then the training set, then the test set. For
    smoke tests and CPU-cheap experiments; no download, no files.
    """
    for label, value in (("train", train), ("test", test), ("classes", classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"synthetic dataset: {label} must be a positive integer, got {value!r}")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(classes, 1, 28, 28, generator=generator)
    prototypes = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2)

    def draw(count: int) -> tuple[Tensor, Tensor]:
        labels = (torch.arange(count) % classes)[torch.randperm(count, generator=generator)]
        return prototypes[labels] + torch.randn(count, 1, 28, 28, generator=generator), labels

    train_images, train_labels = draw(train)
    test_images, test_labels = draw(test)
    return ImageDataset("synthetic", train_images, train_labels, test_images, test_labels, num_classes=classes)
