"""A run directory: everything a run writes, and the only thing plots read.

    config.json     every setting, resolved (rkfac.experiments.config.RunConfig); written once,
                    when the run starts, never rewritten
    env.json        versions, device, CPU/GPU model, git revision if any, and ``data_files``:
                    path and SHA-256 of each file the data was read from (``[]``: synthetic)
    resumes.json    one entry per resume: the step it continued from, what it extended
                    (epochs, max_steps) and its environment (rkfac.experiments.resume)
    metrics.jsonl   one JSON object per line: {"kind": "step", ...} and {"kind": "epoch", ...}
    summary.json    final numbers (written at the end of the run)
    checkpoint.pt   model, optimizer (with the preconditioner), RNG state, counters, behind a
                    header with the SHA-256 of the torch.save payload (read with
                    :meth:`RunDirectory.load_checkpoint`)

Files are replaced atomically (written to a temporary file in the same directory, flushed,
then renamed), so a run killed at any moment leaves the previous version intact. A checkpoint
that was truncated or altered afterwards (a copy cut short, a flipped byte in tensor data that
``torch.load`` would read without complaint) fails its checksum and is refused with a clear
error, never resumed from silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_MAGIC = b"rkfac-checkpoint-v1 sha256="


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message says which file and why."""


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through a temporary sibling file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class RunDirectory:
    """A run's files. With ``writer=False`` (ranks other than 0 of a distributed run) every
    write is skipped and only reads happen."""

    def __init__(self, path: str | Path, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    def create(self) -> RunDirectory:
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_json(self, name: str, data: Any) -> None:
        if not self.writer:
            return
        text = json.dumps(data, indent=2, default=str).encode()
        atomic_write(self.path / name, lambda stream: stream.write(text))

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def append_metrics(self, records: list[dict[str, Any]]) -> None:
        if not self.writer:
            return
        with open(self.path / "metrics.jsonl", "a") as stream:
            for record in records:
                stream.write(json.dumps(record) + "\n")

    def metrics(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        # Every record ends in a newline: text after the last one is a record rank 0 is still
        # appending (another rank of a distributed run reads meanwhile), not one to parse.
        complete, _, _ = path.read_text().rpartition("\n")
        for line in complete.splitlines():
            if line.strip():
                record = json.loads(line)
                if kind is None or record.get("kind") == kind:
                    yield record

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past ``after_step`` (a resumed run rewrites what came after its checkpoint).

        A step record holds the 0-based index of its step; an epoch or evaluation record holds
        the number of steps done when it was taken, so the one taken at the checkpoint stays.
        """
        path = self.path / "metrics.jsonl"
        if not self.writer or not path.exists():
            return

        def before_checkpoint(record: dict[str, Any]) -> bool:
            step = record.get("step", -1)
            return step < after_step if record.get("kind") == "step" else step <= after_step

        kept = [r for r in self.metrics() if before_checkpoint(r)]
        text = "".join(json.dumps(r) + "\n" for r in kept).encode()
        atomic_write(path, lambda stream: stream.write(text))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if not self.writer:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        header = CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
        atomic_write(self.path / CHECKPOINT, lambda stream: (stream.write(header), stream.write(payload)))

    def load_checkpoint(self) -> dict[str, Any]:
        path = self.path / CHECKPOINT
        if not path.exists():
            raise CheckpointError(
                f"no checkpoint in {self.path}: nothing to resume (was the run started with --checkpoint-every 0?)"
            )
        payload = _verified_payload(path, path.read_bytes())
        try:
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
        except Exception as error:  # truncated or corrupted: never restart silently
            raise CheckpointError(
                f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); it may be truncated or corrupted"
            ) from error
        if not isinstance(state, dict) or "model" not in state:
            raise CheckpointError(f"checkpoint {path} does not hold an rkfac training state")
        return state


def _verified_payload(path: Path, data: bytes) -> bytes:
    """The torch.save bytes after the header, if their SHA-256 matches it.

    A file without the header (written before checksums existed) is passed on unverified:
    ``torch.load`` then reports a truncated one.
    """
    newline = data.find(b"\n")
    if not data.startswith(CHECKPOINT_MAGIC) or newline < 0:
        return data
    expected = data[len(CHECKPOINT_MAGIC) : newline].decode(errors="replace")
    payload = data[newline + 1 :]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} fails its checksum ({len(payload)} payload bytes, SHA-256 {actual[:12]}… instead of "
            f"{expected[:12]}…): it is truncated or corrupted; resume from a good copy or start the run again"
        )
    return payload


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, for env.json."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "git_revision": _git_revision(),
    }
    from rkfac import __version__

    info["rkfac"] = __version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=False)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
