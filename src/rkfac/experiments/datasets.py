"""Datasets held in memory as normalised tensors: Fashion-MNIST, CIFAR-10, synthetic.

Where Fashion-MNIST is looked for, in order: ``data_dir``; ``$RKFAC_DATA`` (the directory or
its ``fashion-mnist/``); Debian's ``/usr/share/datasets/fashion-mnist``; the cache
``$XDG_CACHE_HOME/rkfac/fashion-mnist`` (default ``~/.cache/rkfac/fashion-mnist``). When none
holds the four files, they are downloaded (into ``data_dir`` if given, else the cache) and
verified (:mod:`rkfac.experiments.download`). Files found on disk are verified too.

CIFAR-10 comes from the python-pickle batch directory (``data_batch_1`` … ``_5``,
``test_batch``) in ``data_dir``, ``data_dir/cifar-10-batches-py`` or
``$RKFAC_DATA/cifar-10-batches-py``; it cannot be downloaded here.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rkfac.experiments.download import FASHION_MNIST_SHA256, HOW_TO_GET, DatasetUnavailableError, download_fashion_mnist, verify
from rkfac.experiments.transforms import PadCropFlip, normalize

DATASETS = ("fashion-mnist", "cifar10", "synthetic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class ImageDataset:
    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
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
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download=download)
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name == "synthetic":
        return synthetic_dataset(synthetic_train, synthetic_test, seed)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


# ---------------------------------------------------------------- Fashion-MNIST


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rkfac" / "fashion-mnist"


def fashion_mnist_candidates(data_dir: str | None) -> list[Path]:
    places = []
    if data_dir:
        places += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    if os.environ.get("RKFAC_DATA"):
        places += [Path(os.environ["RKFAC_DATA"]), Path(os.environ["RKFAC_DATA"]) / "fashion-mnist"]
    return [*places, DEBIAN_FASHION_MNIST, cache_dir()]


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def locate_fashion_mnist(data_dir: str | None, download: bool = True) -> dict[str, Path]:
    searched = fashion_mnist_candidates(data_dir)
    for folder in searched:
        found = {name: _find(folder, name) for name in FASHION_MNIST_SHA256}
        if all(found.values()):
            return {name: path for name, path in found.items() if path is not None}
    if not download:
        raise DatasetUnavailableError(f"Fashion-MNIST not found in {[str(p) for p in searched]}; {HOW_TO_GET}")
    target = Path(data_dir) if data_dir else cache_dir()
    try:
        download_fashion_mnist(target)
    except DatasetUnavailableError as error:
        raise DatasetUnavailableError(f"Fashion-MNIST not found in {[str(p) for p in searched]}, and {error}") from error
    return {name: target / name for name in FASHION_MNIST_SHA256}


def parse_idx(content: bytes, source: Path) -> np.ndarray:
    """An IDX array: 0x00 0x00, type 0x08 (uint8), ndim, big-endian int32 dims, then the data."""
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] != 0x08:
        raise DatasetUnavailableError(f"{source} is not an IDX uint8 file (header {content[:4].hex()}); {HOW_TO_GET}")
    ndim = content[3]
    dims = [int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(content) - offset != int(np.prod(dims)):
        raise DatasetUnavailableError(
            f"{source} holds {len(content) - offset} bytes of data, its header says {dims}; {HOW_TO_GET}"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(data_dir: str | None = None, *, download: bool = True) -> ImageDataset:
    files = locate_fashion_mnist(data_dir, download)
    arrays = {name: parse_idx(verify(path, name), path) for name, path in files.items()}

    def images(name: str) -> Tensor:
        pixels = torch.from_numpy(arrays[name].copy()).float().div_(255).unsqueeze(1)
        return normalize(pixels, FASHION_MEAN, FASHION_STD)

    def labels(name: str) -> Tensor:
        return torch.from_numpy(arrays[name].astype(np.int64))

    return ImageDataset(
        "fashion-mnist",
        images("train-images-idx3-ubyte.gz"),
        labels("train-labels-idx1-ubyte.gz"),
        images("t10k-images-idx3-ubyte.gz"),
        labels("t10k-labels-idx1-ubyte.gz"),
        num_classes=10,
    )


# ---------------------------------------------------------------- CIFAR-10

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"


def locate_cifar10(data_dir: str | None) -> Path:
    places = []
    if data_dir:
        places += [Path(data_dir), Path(data_dir) / "cifar-10-batches-py"]
    if os.environ.get("RKFAC_DATA"):
        places.append(Path(os.environ["RKFAC_DATA"]) / "cifar-10-batches-py")
    for folder in places:
        if all((folder / name).is_file() for name in (*CIFAR_TRAIN, CIFAR_TEST)):
            return folder
    raise DatasetUnavailableError(
        f"CIFAR-10 python batches ({', '.join(CIFAR_TRAIN)}, {CIFAR_TEST}) not found in {[str(p) for p in places]}: "
        "download cifar-10-python.tar.gz from the dataset's site, unpack it, pass --data-dir or set $RKFAC_DATA"
    )


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from one pickled batch."""
    try:
        with open(path, "rb") as stream:
            batch = pickle.load(stream, encoding="bytes")
        data, labels = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as error:
        raise DatasetUnavailableError(f"{path} is not a readable CIFAR-10 batch ({type(error).__name__}: {error})") from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetUnavailableError(
            f"{path}: data shape {data.shape} with {len(labels)} labels; expected (N, 3072) and N labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | None = None) -> ImageDataset:
    folder = locate_cifar10(data_dir)
    train = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN]
    test_images, test_labels = read_cifar_batch(folder / CIFAR_TEST)

    def to_tensor(pixels: np.ndarray) -> Tensor:
        return normalize(torch.from_numpy(pixels.copy()).float().div_(255), CIFAR_MEAN, CIFAR_STD)

    return ImageDataset(
        "cifar10",
        to_tensor(np.concatenate([images for images, _ in train])),
        torch.from_numpy(np.concatenate([labels for _, labels in train])),
        to_tensor(test_images),
        torch.from_numpy(test_labels),
        num_classes=10,
        augment=PadCropFlip(CIFAR_MEAN, CIFAR_STD),
    )


# ---------------------------------------------------------------- synthetic


def synthetic_dataset(train: int = 512, test: int = 256, seed: int = 0, classes: int = 10) -> ImageDataset:
    """Fashion-MNIST-shaped (1, 28, 28) images: a smooth class prototype plus Gaussian noise.

    Learnable but not trivially: a small MLP reaches about 85-90% test accuracy in three short
    epochs, 100% never. For smoke tests and CPU-cheap experiments.
    """
    generator = torch.Generator().manual_seed(seed)
    prototypes = (
        torch.nn.functional.avg_pool2d(torch.randn(classes, 1, 28, 28, generator=generator), 5, stride=1, padding=2) * 1.0
    )

    def draw(count: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(count) % classes
        labels = labels[torch.randperm(count, generator=generator)]
        return prototypes[labels] + torch.randn(count, 1, 28, 28, generator=generator), labels

    train_images, train_labels = draw(train)
    test_images, test_labels = draw(test)
    return ImageDataset("synthetic", train_images, train_labels, test_images, test_labels, num_classes=classes)
