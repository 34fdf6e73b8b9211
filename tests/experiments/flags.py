"""Command lines for tests that run several optimizers on one set of flags."""

from __future__ import annotations

from rkfac.experiments.config import READERS
from rkfac.experiments.presets import VARIANTS


def read_by(optimizer: str, argv: list[str]) -> list[str]:
    """``argv`` without the ``--flag value`` pairs ``optimizer`` does not read (the CLI refuses those)."""
    base = VARIANTS.get(optimizer, (optimizer, {}))[0]
    kept: list[str] = []
    skip_value = False
    for index, item in enumerate(argv):
        if skip_value:
            skip_value = False
            continue
        name = item.removeprefix("--").replace("-", "_")
        if item.startswith("--") and name in READERS and base not in READERS[name]:
            skip_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
            continue
        kept.append(item)
    return kept
