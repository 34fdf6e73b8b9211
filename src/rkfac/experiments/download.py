"""Fetch Fashion-MNIST when no local copy exists, and verify every copy, fetched or found.

Checksums are SHA-256 of the *decompressed* IDX bytes. Debian's ``dataset-fashion-mnist``
recompresses the archives, so hashes of the ``.gz`` files differ between sources while the
content is identical; hashing the content lets one table serve every source, and also accepts
files that were gunzipped by hand.

A download goes to a temporary file in the destination directory, is verified, and only then
renamed into place with :func:`os.replace` (atomic within one file system). A file that fails
verification is deleted, so a later run never finds half a file or a wrong one under the real
name. Only :mod:`urllib.request` is used: no extra dependency, and ``file://`` URLs work too.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
URL_VARIABLE = "RKFAC_FASHION_MNIST_URL"

# SHA-256 of the decompressed IDX content, computed from Debian's /usr/share/datasets/fashion-mnist
# (gzip.decompress + hashlib.sha256); the sizes are 47040016, 60008, 7840016 and 10008 bytes.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_MNIST_FILES = tuple(FASHION_MNIST_SHA256)

HOW_TO_GET = (
    "install Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`, or `make data`), "
    "or put the four IDX .gz files in a directory and pass --data-dir or set $RKFAC_DATA"
)

GZIP_MAGIC = b"\x1f\x8b"


class DatasetUnavailableError(RuntimeError):
    """No usable copy of a dataset could be found or fetched; the message says how to get one."""


class ChecksumError(DatasetUnavailableError):
    """A dataset file is readable but its content is not the expected one (or it is not readable at all)."""


def canonical_name(name: str) -> str:
    """The ``.gz`` name under which ``name`` is listed in :data:`FASHION_MNIST_SHA256`."""
    canonical = name if name.endswith(".gz") else name + ".gz"
    if canonical not in FASHION_MNIST_SHA256:
        raise ValueError(f"{name!r} is not a Fashion-MNIST file; expected one of {FASHION_MNIST_FILES} (with or without .gz)")
    return canonical


def _subject(path: Path, origin: str | None) -> tuple[str, str]:
    """How an error names the file, and the start of its advice: a found file is to be deleted, a downloaded one already is."""
    return (f"{origin} (downloaded)", "") if origin else (str(path), "delete it and ")


def content_bytes(path: Path, *, origin: str | None = None) -> bytes:
    """The file's decompressed bytes.

    Compression is recognised by the gzip magic (1f 8b), not by the name, so a hand-gunzipped
    file keeps working. A ``.gz`` name without the magic is an error (an HTML error page saved
    under the file's name is the usual cause). ``origin``: see :func:`verify`.
    """
    what, fix = _subject(path, origin)
    data = path.read_bytes()
    if data[:2] != GZIP_MAGIC:
        if (origin or path.name).endswith(".gz"):
            raise ChecksumError(f"{what} is not a gzip file (it starts with bytes {data[:4].hex() or 'none'}); {fix}{HOW_TO_GET}")
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise ChecksumError(f"{what} is not a valid gzip file ({error}); {fix}{HOW_TO_GET}") from error


def verify(path: Path, name: str, *, origin: str | None = None) -> bytes:
    """Return the decompressed content of ``path`` if its SHA-256 is the known one for ``name``.

    ``origin`` (a URL) says where a downloaded file came from; errors name it instead of ``path``,
    which is then a temporary file that is about to be deleted.
    """
    expected = FASHION_MNIST_SHA256[canonical_name(name)]
    content = content_bytes(path, origin=origin)
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected:
        what, fix = _subject(path, origin)
        raise ChecksumError(
            f"{what} fails its checksum: expected sha256 {expected} of the decompressed content, got {actual}; {fix}{HOW_TO_GET}"
        )
    return content


def resolve_base_url(base_url: str | None = None) -> str:
    """``base_url``, else ``$RKFAC_FASHION_MNIST_URL``, else the official location; checked to be a URL."""
    base = base_url or os.environ.get(URL_VARIABLE) or OFFICIAL_URL
    if urllib.parse.urlsplit(base).scheme not in ("http", "https", "file"):
        raise ValueError(
            f"Fashion-MNIST base URL {base!r} is not an http://, https:// or file:// URL; "
            f"fix the base_url argument or ${URL_VARIABLE}"
        )
    return base if base.endswith("/") else base + "/"


def describe(error: Exception) -> str:
    """A short reason: an HTTPError's text has the status code; a URLError's wraps its reason in "<urlopen error …>"."""
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        return str(error.reason)
    return str(error) or type(error).__name__


def fetch(url: str, destination: Path, name: str, timeout: float) -> None:
    """Download ``url`` to ``destination`` atomically: temporary file, verify, rename; never a bad file left."""
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        try:
            with os.fdopen(handle, "wb") as stream, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    stream.write(chunk)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            raise DatasetUnavailableError(f"could not download {url} ({describe(error)}); {HOW_TO_GET}") from error
        verify(Path(temporary), name, origin=url)
        os.replace(temporary, destination)
    finally:
        Path(temporary).unlink(missing_ok=True)


def download_fashion_mnist(target: Path, base_url: str | None = None, timeout: float = 60.0) -> dict[str, Path]:
    """Download the four files into ``target`` (created if needed), verify them, and return their paths.

    A file already present under its final name is verified instead of fetched again, so an
    interrupted download resumes file by file. ``base_url`` overrides ``$RKFAC_FASHION_MNIST_URL``,
    which overrides the official location.
    """
    base = resolve_base_url(base_url)
    target = Path(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetUnavailableError(
            f"cannot create the download directory {target} ({error}); pass --data-dir with a writable directory"
        ) from error
    paths = {}
    for name in FASHION_MNIST_FILES:
        destination = target / name
        if destination.is_file():
            verify(destination, name)
        else:
            fetch(base + name, destination, name, timeout)
        paths[name] = destination
    return paths
