"""Dataset loading checked against independent references.

Fashion-MNIST against a direct IDX parse written here, downloads against a loopback HTTP server
serving Debian's files, corrupted copies on disk and on the server, CIFAR-10 against small
batches written here in the real pickle format, and the synthetic set against a closed-form
least-squares classifier. No test reaches the internet: every test runs with the download URL
pointed at a closed loopback port, and with Debian's path, the cache and $RKFAC_DATA hidden,
unless it sets them itself.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import pickle
import re
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from rkfac.experiments import datasets
from rkfac.experiments.download import ChecksumError, DatasetUnavailableError, download_fashion_mnist, verify
from rkfac.experiments.transforms import PadCropFlip

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
needs_debian = pytest.mark.skipif(
    not all((DEBIAN / name).is_file() for name in FILES),
    reason=f"Fashion-MNIST not in {DEBIAN}: install it with `apt-get install dataset-fashion-mnist` to run this test",
)
MEAN, STD = 0.2860, 0.3530


def closed_port_url() -> str:
    """A loopback URL nothing listens on: bind a free port, then close it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def read_idx(path: Path) -> tuple[tuple[int, ...], bytes]:
    """Reference IDX reader: (dims, data bytes) of a gzipped IDX uint8 file."""
    raw = gzip.decompress(path.read_bytes())
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    assert (zero, type_code) == (0, 8)
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    return dims, raw[4 + 4 * ndim :]


def content_sha256(path: Path) -> str:
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RKFAC_FASHION_MNIST_URL", closed_port_url())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("RKFAC_DATA", raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")


@pytest.fixture(scope="module")
def fashion() -> datasets.ImageDataset:
    if not all((DEBIAN / name).is_file() for name in FILES):
        pytest.skip(f"Fashion-MNIST not in {DEBIAN}: install it with `apt-get install dataset-fashion-mnist`")
    return datasets.load_dataset("fashion-mnist", str(DEBIAN), download=False)


# ---------------------------------------------------------------- Fashion-MNIST from Debian's files


@needs_debian
def test_fashion_mnist_matches_a_direct_parse(fashion: datasets.ImageDataset) -> None:
    assert fashion.name == "fashion-mnist" and fashion.num_classes == 10 and fashion.augment is None
    assert fashion.input_shape == (1, 28, 28)
    assert fashion.train_images.shape == (60000, 1, 28, 28) and fashion.test_images.shape == (10000, 1, 28, 28)
    assert fashion.train_images.dtype == torch.float32 and fashion.test_images.dtype == torch.float32
    assert fashion.train_labels.dtype == torch.int64 and fashion.test_labels.dtype == torch.int64
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class, labels 0..9.
    assert torch.bincount(fashion.train_labels).tolist() == [6000] * 10
    assert torch.bincount(fashion.test_labels).tolist() == [1000] * 10
    assert abs(fashion.train_images.mean().item()) < 0.01 and abs(fashion.train_images.std().item() - 1) < 0.01

    dims, pixels = read_idx(DEBIAN / "train-images-idx3-ubyte.gz")
    assert dims == (60000, 28, 28)
    for index in (0, 12345, 59999):
        raw = pixels[784 * index : 784 * (index + 1)]
        expected = [[(raw[28 * row + col] / 255 - MEAN) / STD for col in range(28)] for row in range(28)]
        torch.testing.assert_close(fashion.train_images[index, 0], torch.tensor(expected), rtol=0, atol=1e-5)
    for name, labels in (
        ("train-labels-idx1-ubyte.gz", fashion.train_labels),
        ("t10k-labels-idx1-ubyte.gz", fashion.test_labels),
    ):
        dims, raw = read_idx(DEBIAN / name)
        assert dims == (len(labels),) and labels.tolist() == list(raw)


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit data_dir (itself or fashion-mnist/) alone; else $RKFAC_DATA (itself or fashion-mnist/), then Debian's
    path, then the cache; first complete one wins."""
    given, env, debian, cache = tmp_path / "given", tmp_path / "env", tmp_path / "debian", tmp_path / "xdg-cache"
    monkeypatch.setenv("RKFAC_DATA", str(env))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", debian)
    folders = [given, env / "fashion-mnist", env, debian, cache / "rkfac" / "fashion-mnist"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            (folder / name).touch()
    assert datasets.fashion_mnist_candidates(str(given)) == [given, given / "fashion-mnist"]
    assert datasets.fashion_mnist_candidates(None) == [env, env / "fashion-mnist", debian, cache / "rkfac" / "fashion-mnist"]
    assert datasets.locate_fashion_mnist(str(given), download=False) == {name: given / name for name in FILES}
    (given / FILES[1]).unlink()  # an incomplete explicit directory is refused, never replaced (issue 17)
    with pytest.raises(DatasetUnavailableError, match=rf"data directory {re.escape(str(given))} .*lacks {FILES[1]};"):
        datasets.locate_fashion_mnist(str(given), download=False)
    expected_order = [env, env / "fashion-mnist", debian, cache / "rkfac" / "fashion-mnist"]
    for winner in expected_order:
        found = datasets.locate_fashion_mnist(None, download=False)
        assert found == {name: winner / name for name in FILES}
        (winner / FILES[1]).unlink()  # an incomplete directory is passed over
    with pytest.raises(DatasetUnavailableError, match="download=False"):
        datasets.locate_fashion_mnist(None, download=False)


def test_gunzipped_files_are_accepted(tmp_path: Path) -> None:
    for name in FILES:
        (tmp_path / name.removesuffix(".gz")).touch()
    found = datasets.locate_fashion_mnist(str(tmp_path), download=False)
    assert found == {name: tmp_path / name.removesuffix(".gz") for name in FILES}


@needs_debian
def test_a_gunzipped_copy_passes_verification(tmp_path: Path) -> None:
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress((DEBIAN / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    assert verify(plain, plain.name) == plain.read_bytes()


# ---------------------------------------------------------------- corrupted files on disk


@needs_debian
@pytest.mark.parametrize("damage", ["wrong-byte", "truncated-gzip", "bad-idx-header", "not-gzip"])
def test_corrupted_file_on_disk_gives_a_clear_error(tmp_path: Path, damage: str) -> None:
    for name in FILES:
        (tmp_path / name).symlink_to(DEBIAN / name)
    victim = tmp_path / "train-labels-idx1-ubyte.gz"
    victim.unlink()
    good = (DEBIAN / victim.name).read_bytes()
    content = bytearray(gzip.decompress(good))
    if damage == "wrong-byte":
        content[5000] = (content[5000] + 1) % 10
        victim.write_bytes(gzip.compress(bytes(content)))
    elif damage == "truncated-gzip":
        victim.write_bytes(good[: len(good) // 2])
    elif damage == "bad-idx-header":
        content[2] = 0x0D  # float32 type code
        victim.write_bytes(gzip.compress(bytes(content)))
    else:
        victim.write_bytes(b"<html>Not Found</html>")
    expected_message = {
        "wrong-byte": "fails its checksum: expected sha256 " + content_sha256(DEBIAN / victim.name) + ".*, got [0-9a-f]{64}",
        "truncated-gzip": "is not a valid gzip file",
        "bad-idx-header": "fails its checksum",
        "not-gzip": "is not a gzip file",
    }[damage]
    with pytest.raises(
        ChecksumError, match=f"{re.escape(str(victim))} {expected_message}.*delete it.*apt-get install dataset-fashion-mnist"
    ):
        datasets.load_dataset("fashion-mnist", str(tmp_path), download=False)


def test_parse_idx_checks_header_and_length(tmp_path: Path) -> None:
    source = tmp_path / "some-file"
    good = b"\x00\x00\x08\x02" + struct.pack(">ii", 2, 3) + bytes(range(6))
    assert datasets.parse_idx(good, source).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert datasets.parse_idx(b"\x00\x00\x08\x01" + struct.pack(">i", 0), source).shape == (0,)
    cases = {
        b"\x01" + good[1:]: "is not an IDX uint8 file",
        good[:2] + b"\x0d" + good[3:]: "is not an IDX uint8 file",
        b"": "is not an IDX uint8 file",
        good[:9]: "ends inside its IDX header",
        good[:-1]: r"holds 5 bytes of data, its header says \[2, 3\]",
        good + b"\x00": r"holds 7 bytes of data, its header says \[2, 3\]",
    }
    for content, message in cases.items():
        with pytest.raises(DatasetUnavailableError, match=f"{re.escape(str(source))} .*{message}"):
            datasets.parse_idx(content, source)


# ---------------------------------------------------------------- downloads from a loopback server


class Server:
    """A loopback HTTP server over a directory that records the paths it was asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def serve_debian_files(self) -> None:
        for name in FILES:
            shutil.copy(DEBIAN / name, self.root / name)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    running = Server(root)
    running.thread.start()
    try:
        yield running
    finally:
        running.httpd.shutdown()
        running.httpd.server_close()
        running.thread.join(timeout=5)


@needs_debian
def test_download_equals_the_debian_files(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fashion: datasets.ImageDataset
) -> None:
    server.serve_debian_files()
    monkeypatch.setenv("RKFAC_FASHION_MNIST_URL", server.url)
    target = tmp_path / "given"
    loaded = datasets.load_dataset("fashion-mnist", str(target))
    assert sorted(server.requests) == sorted(f"/{name}" for name in FILES)
    assert sorted(path.name for path in target.iterdir()) == sorted(FILES)  # and no temporary files
    for name in FILES:
        assert (target / name).read_bytes() == (DEBIAN / name).read_bytes()
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(loaded, field), getattr(fashion, field)), field
    datasets.locate_fashion_mnist(str(target))  # found now: nothing fetched again
    assert len(server.requests) == len(FILES)


@needs_debian
def test_download_without_data_dir_goes_to_the_cache(server: Server, tmp_path: Path) -> None:
    server.serve_debian_files()
    cache = tmp_path / "xdg-cache" / "rkfac" / "fashion-mnist"
    # base_url beats $RKFAC_FASHION_MNIST_URL, which points at a closed port here.
    paths = download_fashion_mnist(datasets.cache_dir(), base_url=server.url.rstrip("/"))
    assert paths == {name: cache / name for name in FILES}
    assert datasets.locate_fashion_mnist(None, download=False) == paths


@needs_debian
def test_a_corrupted_download_is_refused_and_deleted(server: Server, tmp_path: Path) -> None:
    server.serve_debian_files()
    bad = bytearray(gzip.decompress((DEBIAN / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    bad[100] = (bad[100] + 1) % 10
    (server.root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(bad)))
    target = tmp_path / "given"
    expected, actual = content_sha256(DEBIAN / "t10k-labels-idx1-ubyte.gz"), hashlib.sha256(bad).hexdigest()
    with pytest.raises(
        ChecksumError,
        match=rf"{re.escape(server.url)}t10k-labels-idx1-ubyte\.gz \(downloaded\) fails its checksum: "
        rf"expected sha256 {expected}.*got {actual}.*apt-get install dataset-fashion-mnist",
    ):
        download_fashion_mnist(target, base_url=server.url)
    assert sorted(path.name for path in target.iterdir()) == sorted(FILES[:3])  # the bad one is gone, and no temporary file


def test_a_missing_or_non_gzip_file_on_the_server(server: Server, tmp_path: Path) -> None:
    target = tmp_path / "given"
    with pytest.raises(
        DatasetUnavailableError, match=rf"could not download {re.escape(server.url)}train-images-idx3-ubyte\.gz \(.*404"
    ):
        download_fashion_mnist(target, base_url=server.url)
    (server.root / FILES[0]).write_bytes(b"<html>moved</html>")
    with pytest.raises(ChecksumError, match=r"train-images-idx3-ubyte\.gz \(downloaded\) is not a gzip file"):
        download_fashion_mnist(target, base_url=server.url)
    assert list(target.iterdir()) == []


def test_no_network_gives_a_clear_error(tmp_path: Path) -> None:
    given = tmp_path / "given"
    with pytest.raises(DatasetUnavailableError) as caught:
        datasets.load_dataset("fashion-mnist", str(given))
    message = str(caught.value)
    assert str(given) in message  # an explicit data_dir alone is searched (issue 17)
    for hint in ("could not download http://127.0.0.1:", "apt-get install dataset-fashion-mnist", "--data-dir", "$RKFAC_DATA"):
        assert hint in message
    assert list(given.iterdir()) == []


def test_no_download_when_told_not_to(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKFAC_FASHION_MNIST_URL", server.url)
    with pytest.raises(DatasetUnavailableError, match=r"Fashion-MNIST not found in .*download=False.*--data-dir"):
        datasets.load_dataset("fashion-mnist", str(tmp_path / "given"), download=False)
    assert server.requests == []


def test_a_malformed_url_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'ftp\.example/x' is not an http"):
        download_fashion_mnist(tmp_path, base_url="ftp.example/x")


# ---------------------------------------------------------------- CIFAR-10 in the python-pickle format


def cifar_value(batch: int, image: int, channel: int) -> int:
    """The background value of one channel of one image in the batches written below."""
    return (7 * batch + 3 * image + 60 * channel) % 250


def write_cifar(folder: Path, per_batch: int = 20, test: int = 10) -> None:
    """Six batches as the CIFAR-10 archive has them, with known values.

    Batch b (0-4 training, 5 test), image k: channel c holds cifar_value(b, k, c), label (3b + k) mod 10,
    and the planted pixel channel 2, row 5, column 9 holds 255 (flat index 2·1024 + 5·32 + 9).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for batch, name in enumerate([*datasets.CIFAR_TRAIN, datasets.CIFAR_TEST]):
        count = test if name == datasets.CIFAR_TEST else per_batch
        data = np.zeros((count, 3072), dtype=np.uint8)
        for image in range(count):
            for channel in range(3):
                data[image, 1024 * channel : 1024 * (channel + 1)] = cifar_value(batch, image, channel)
            data[image, 2 * 1024 + 5 * 32 + 9] = 255
        labels = [(3 * batch + image) % 10 for image in range(count)]
        with open(folder / name, "wb") as stream:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": []}, stream)


def normalised(value: float, channel: int) -> float:
    means, stds = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    return (value / 255 - means[channel]) / stds[channel]


def test_cifar10_from_batches_in_the_real_format(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    data = datasets.load_dataset("cifar10", str(tmp_path))
    assert data.name == "cifar10" and data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert data.train_images.shape == (100, 3, 32, 32) and data.test_images.shape == (10, 3, 32, 32)
    assert data.train_images.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    assert data.train_labels.tolist() == [(3 * b + k) % 10 for b in range(5) for k in range(20)]
    assert data.test_labels.tolist() == [(15 + k) % 10 for k in range(10)]
    for images, batch, image, index in ((data.train_images, 3, 7, 67), (data.test_images, 5, 4, 4)):
        for channel in range(3):
            expected = torch.full((32, 32), normalised(cifar_value(batch, image, channel), channel))
            if channel == 2:
                expected[5, 9] = normalised(255, 2)
            torch.testing.assert_close(images[index, channel], expected)
    assert isinstance(data.augment, PadCropFlip)
    torch.testing.assert_close(data.augment.fill, torch.tensor([normalised(0, c) for c in range(3)]))


def test_cifar10_is_found_under_rkfac_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py", per_batch=2, test=2)
    monkeypatch.setenv("RKFAC_DATA", str(tmp_path))
    assert datasets.load_dataset("cifar10").train_images.shape == (10, 3, 32, 32)


def test_cifar10_missing_files_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetUnavailableError, match=rf"data_batch_1, .*test_batch\) not found in {re.escape(str(tmp_path))}.*--data-dir"
    ):
        datasets.load_dataset("cifar10", str(tmp_path))
    with pytest.raises(DatasetUnavailableError, match=r"no data_dir given and \$RKFAC_DATA unset"):
        datasets.load_dataset("cifar10")
    write_cifar(tmp_path / "cifar-10-batches-py", per_batch=2, test=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetUnavailableError, match=r"cifar-10-batches-py lacks data_batch_4"):
        datasets.load_dataset("cifar10", str(tmp_path))


@pytest.mark.parametrize("damage", ["not-a-pickle", "truncated", "no-labels", "short-rows", "label-count", "label-range"])
def test_cifar10_corrupt_batch_names_the_file(tmp_path: Path, damage: str) -> None:
    write_cifar(tmp_path, per_batch=4, test=2)
    victim = tmp_path / "data_batch_3"
    batch = {b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    if damage == "not-a-pickle":
        victim.write_bytes(b"not a pickle")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:1000])
    else:
        if damage == "no-labels":
            del batch[b"labels"]
        elif damage == "short-rows":
            batch[b"data"] = np.zeros((4, 3000), dtype=np.uint8)
        elif damage == "label-count":
            batch[b"labels"] = [0, 1, 2]
        else:
            batch[b"labels"] = [0, 1, 2, 10]
        victim.write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetUnavailableError, match=rf"{re.escape(str(victim))}\b"):
        datasets.load_dataset("cifar10", str(tmp_path))


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_balanced_and_shaped_like_fashion_mnist() -> None:
    first = datasets.load_dataset("synthetic", synthetic_train=200, synthetic_test=100, seed=4)
    again = datasets.load_dataset("synthetic", synthetic_train=200, synthetic_test=100, seed=4)
    other = datasets.load_dataset("synthetic", synthetic_train=200, synthetic_test=100, seed=5)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    assert not torch.equal(first.train_images, other.train_images)
    assert first.name == "synthetic" and first.input_shape == (1, 28, 28) and first.augment is None
    assert first.train_images.shape == (200, 1, 28, 28) and first.test_images.shape == (100, 1, 28, 28)
    assert first.train_images.dtype == torch.float32 and first.train_labels.dtype == torch.int64
    assert torch.bincount(first.train_labels, minlength=10).tolist() == [20] * 10
    assert torch.bincount(datasets.synthetic_dataset(205, 10).train_labels).tolist() == [21] * 5 + [20] * 5


def test_synthetic_is_learnable_by_a_linear_model() -> None:
    """Minimum-norm least squares onto one-hot targets (a closed form) beats chance (10%) by far."""
    data = datasets.load_dataset("synthetic", synthetic_train=512, synthetic_test=256, seed=0)

    def features(images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1).double()
        return torch.cat([flat, torch.ones(len(flat), 1, dtype=flat.dtype)], dim=1)

    x, targets = features(data.train_images), torch.nn.functional.one_hot(data.train_labels, 10).double()
    weights = x.T @ torch.linalg.solve(x @ x.T, targets)  # x has more columns than rows: w = xᵀ(xxᵀ)⁻¹y
    accuracy = (features(data.test_images) @ weights).argmax(1).eq(data.test_labels).double().mean().item()
    assert accuracy > 0.5


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of fashion-mnist, cifar10, synthetic"):
        datasets.load_dataset("mnist")
    with pytest.raises(ValueError, match="train must be a positive integer, got 0"):
        datasets.load_dataset("synthetic", synthetic_train=0)
    assert datasets.DATASETS == ("fashion-mnist", "cifar10", "synthetic")
