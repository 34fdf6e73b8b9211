"""Deterministic random generators keyed by (seed, purpose, layer, factor, step).

Every sketch is drawn from a fresh ``torch.Generator`` seeded from a hash of these keys, so a
run is reproducible bit for bit, a resumed run draws the same sketches as an uninterrupted
one without storing generator state, and every rank of a distributed run draws the same
sketch for the same layer and step.
"""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends on every key (stable across processes and Python versions)."""
    text = "/".join(str(key) for key in keys).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def keyed_generator(device: torch.device, *keys: int | str) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(*keys))
    return generator
