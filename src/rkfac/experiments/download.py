"""Fetch Fashion-MNIST when no local copy exists, verifying every file's checksum.

Checksums are SHA-256 of the *decompressed* IDX bytes: Debian's package recompresses the
archives, so hashes of the .gz files differ between sources while the content is identical.
Files are downloaded to a temporary name, verified, then renamed into place; a file that fails
verification is deleted, never left where a later run would find it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
URL_VARIABLE = "RKFAC_FASHION_MNIST_URL"

FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

HOW_TO_GET = (
    "install Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`, or `make data`), "
    "or put the four IDX .gz files in a directory and pass --data-dir or set $RKFAC_DATA"
)


class DatasetUnavailableError(RuntimeError):
    """No usable copy of a dataset could be found or fetched; the message says how to get one."""


class ChecksumError(DatasetUnavailableError):
    """A dataset file whose content is not the expected one."""


def content_bytes(path: Path) -> bytes:
    """The file's decompressed bytes; a file without the gzip magic (1f 8b) is returned as it is."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        if path.name.endswith(".gz"):
            raise ChecksumError(f"{path} is not a gzip file (it starts with {data[:4].hex()}); {HOW_TO_GET}")
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as error:
        raise ChecksumError(f"{path} is not a valid gzip file ({error}); {HOW_TO_GET}") from error


def verify(path: Path, name: str) -> bytes:
    """Return the decompressed content of ``path`` if its SHA-256 is the known one for ``name``."""
    content = content_bytes(path)
    expected = FASHION_MNIST_SHA256[name if name.endswith(".gz") else name + ".gz"]
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected:
        raise ChecksumError(
            f"{path} fails its checksum: expected sha256 {expected} of the decompressed content, got {actual}; {HOW_TO_GET}"
        )
    return content


def download_fashion_mnist(target: Path, base_url: str | None = None, timeout: float = 60.0) -> None:
    """Download the four files into ``target`` (created if needed) and verify them."""
    base = base_url or os.environ.get(URL_VARIABLE) or OFFICIAL_URL
    target.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_SHA256:
        destination = target / name
        if destination.exists():
            verify(destination, name)
            continue
        url = base.rstrip("/") + "/" + name
        handle, temporary = tempfile.mkstemp(dir=target, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as stream, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    stream.write(chunk)
            verify(Path(temporary), name)
            os.replace(temporary, destination)
        except (urllib.error.URLError, OSError) as error:
            raise DatasetUnavailableError(f"could not download {url} ({error}); {HOW_TO_GET}") from error
        finally:
            Path(temporary).unlink(missing_ok=True)
