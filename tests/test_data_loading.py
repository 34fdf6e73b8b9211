"""Dataset loaders against direct parses, a loopback download server, and corrupted files."""

from __future__ import annotations

import gzip
import http.server
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from rkfac.experiments import datasets
from rkfac.experiments.download import FASHION_MNIST_SHA256, ChecksumError, DatasetUnavailableError, download_fashion_mnist
from rkfac.experiments.transforms import PadCropFlip, crop_at, crop_offsets, flip_mask, random_hflip

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)


@pytest.fixture(scope="module")
def fashion() -> datasets.ImageDataset:
    return datasets.load_fashion_mnist(str(DEBIAN), download=False)


@needs_fashion
def test_fashion_mnist_real_files(fashion: datasets.ImageDataset) -> None:
    assert fashion.train_images.shape == (60000, 1, 28, 28) and fashion.test_images.shape == (10000, 1, 28, 28)
    assert fashion.train_images.dtype == torch.float32 and fashion.train_labels.dtype == torch.int64
    assert set(fashion.train_labels.unique().tolist()) == set(range(10))
    assert abs(float(fashion.train_images.mean())) < 0.01 and abs(float(fashion.train_images.std()) - 1) < 0.01
    # Direct parse of one image: 16-byte header, then 784 bytes per image, row-major.
    raw = gzip.decompress((DEBIAN / "t10k-images-idx3-ubyte.gz").read_bytes())
    pixels = torch.tensor(list(raw[16 + 784 * 7 : 16 + 784 * 8]), dtype=torch.float32).reshape(28, 28) / 255
    torch.testing.assert_close(fashion.test_images[7, 0], (pixels - 0.2860) / 0.3530)
    labels = gzip.decompress((DEBIAN / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert fashion.test_labels[:20].tolist() == list(labels[8:28])


@pytest.fixture
def no_local_copies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RKFAC_DATA", raising=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over a directory; yields (base URL, directory)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(root))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler_class = httpd.RequestHandlerClass
    handler_class.log_message = lambda *args: None  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()
    httpd.server_close()


@needs_fashion
def test_download_from_loopback_server_equals_local_files(
    server: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_local_copies: None,
    fashion: datasets.ImageDataset,
) -> None:
    url, root = server
    for name in FASHION_MNIST_SHA256:
        shutil.copy(DEBIAN / name, root / name)
    monkeypatch.setenv("RKFAC_FASHION_MNIST_URL", url)
    target = tmp_path / "downloaded"
    loaded = datasets.load_fashion_mnist(str(target))
    assert sorted(p.name for p in target.iterdir()) == sorted(FASHION_MNIST_SHA256)
    assert torch.equal(loaded.train_images, fashion.train_images) and torch.equal(loaded.test_labels, fashion.test_labels)


@needs_fashion
def test_corrupted_download_is_refused_and_removed(server: tuple[str, Path], tmp_path: Path, no_local_copies: None) -> None:
    url, root = server
    for name in FASHION_MNIST_SHA256:
        shutil.copy(DEBIAN / name, root / name)
    data = bytearray(gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    data[100] ^= 1
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(data)))
    target = tmp_path / "downloaded"
    with pytest.raises(
        ChecksumError, match=r"t10k-labels-idx1-ubyte.gz.* fails its checksum.*apt-get install dataset-fashion-mnist"
    ):
        download_fashion_mnist(target, base_url=url)
    assert not (target / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in target.iterdir() if p.name.endswith(".part")]


def test_offline_gives_a_clear_error(tmp_path: Path, no_local_copies: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKFAC_FASHION_MNIST_URL", "http://127.0.0.1:9/")  # discard port: nothing listens
    with pytest.raises(DatasetUnavailableError, match=r"Fashion-MNIST not found in .*could not download .*--data-dir"):
        datasets.load_fashion_mnist(str(tmp_path / "empty"))


@needs_fashion
@pytest.mark.parametrize("damage", ["truncated-gzip", "bad-header", "wrong-content"])
def test_corrupted_file_on_disk_gives_a_clear_error(tmp_path: Path, damage: str) -> None:
    for name in FASHION_MNIST_SHA256:
        shutil.copy(DEBIAN / name, tmp_path / name)
    victim = tmp_path / "train-labels-idx1-ubyte.gz"
    data = victim.read_bytes()
    if damage == "truncated-gzip":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "bad-header":
        victim.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + gzip.decompress(data)[4:]))
    else:
        victim.write_bytes(gzip.compress(gzip.decompress(data)[:-1] + b"\x09"))
    with pytest.raises(DatasetUnavailableError, match=r"train-labels-idx1-ubyte\.gz"):
        datasets.load_fashion_mnist(str(tmp_path), download=False)


def test_parse_idx_checks_header_and_length(tmp_path: Path) -> None:
    good = b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    assert datasets.parse_idx(good, tmp_path).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(DatasetUnavailableError, match=r"holds 5 bytes of data, its header says \[2, 3\]"):
        datasets.parse_idx(good[:-1], tmp_path)


def write_cifar(folder: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    """Batches in the CIFAR-10 python format with planted pixels: image k of batch b has value 10·b + k."""
    folder.mkdir(parents=True)
    planted = {}
    for index, name in enumerate([*datasets.CIFAR_TRAIN, datasets.CIFAR_TEST]):
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        for k in range(per_batch):
            data[k, :] = 10 * index + k
            data[k, 1 * 1024 + 5 * 32 + 7] = 200  # channel 1 (green), row 5, column 7
        labels = [(index + k) % 10 for k in range(per_batch)]
        with open(folder / name, "wb") as stream:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, stream)
        planted[name] = data
    return planted


def test_cifar10_loader_on_files_in_the_real_format(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    data = datasets.load_cifar10(str(tmp_path))
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    assert data.train_labels.tolist() == [(b + k) % 10 for b in range(5) for k in range(4)]
    mean, std = torch.tensor(datasets.CIFAR_MEAN), torch.tensor(datasets.CIFAR_STD)
    sample = data.train_images[6]  # batch 1, image 2: value 12 everywhere but the planted pixel
    torch.testing.assert_close(sample[:, 0, 0], (12 / 255 - mean) / std)
    torch.testing.assert_close(sample[1, 5, 7], (200 / 255 - mean[1]) / std[1])
    assert data.augment is not None and data.input_shape == (3, 32, 32)


def test_cifar10_missing_or_corrupt_batches(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match=r"CIFAR-10 python batches .* not found"):
        datasets.load_cifar10(str(tmp_path))
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetUnavailableError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        datasets.load_cifar10(str(tmp_path / "c"))


def test_random_crop_equals_explicit_padding_and_slicing() -> None:
    images = torch.randn(6, 3, 8, 8)
    fill = torch.tensor([-1.0, 0.5, 2.0])
    rows, cols = crop_offsets(6, 2, torch.Generator().manual_seed(0), images.device)
    cropped = crop_at(images, 2, rows, cols, fill)
    for b in range(6):
        padded = fill.reshape(3, 1, 1).expand(3, 12, 12).clone()
        padded[:, 2:10, 2:10] = images[b]
        torch.testing.assert_close(cropped[b], padded[:, rows[b] : rows[b] + 8, cols[b] : cols[b] + 8])
    assert int(rows.min()) >= 0 and int(rows.max()) <= 4


def test_flip_flips_exactly_the_drawn_samples_and_augment_is_deterministic() -> None:
    images = torch.randn(10, 3, 4, 5)
    mask = flip_mask(10, torch.Generator().manual_seed(3), images.device)
    flipped = random_hflip(images, torch.Generator().manual_seed(3))
    for b in range(10):
        torch.testing.assert_close(flipped[b], images[b].flip(-1) if mask[b] else images[b])
    augment = PadCropFlip(datasets.CIFAR_MEAN, datasets.CIFAR_STD)
    first = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(1))) and first.shape == images.shape


def test_synthetic_is_deterministic_and_balanced() -> None:
    a, b = datasets.synthetic_dataset(200, 100, seed=4), datasets.synthetic_dataset(200, 100, seed=4)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.input_shape == (1, 28, 28) and torch.bincount(a.train_labels).tolist() == [20] * 10
    assert not torch.equal(a.train_images, datasets.synthetic_dataset(200, 100, seed=5).train_images)
