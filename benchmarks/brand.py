"""One Brand update (B-KFAC) against one SymmetricRandomizedEVD of the dense factor, interleaved.

For each width d: a factor averaged from a few batch statistics (m = 256 columns each,
decaying feature scales), its rank-220 pairs, and a fresh statistic C (d × m). Timed, in turn
within every repeat: ``brand_update(pairs, C, ρ, r)`` (O(d (r + m)²)), the dense fold
``ρ F + (1 − ρ) C Cᵀ`` that the refreshing variants keep paying (O(d² m)), and
``SymmetricRandomizedEVD(rank=220).decompose(F)`` (q + 1 = 5 products of O(d² k)).
Medians of the repeats; ratios against the Brand update.

    python benchmarks/brand.py [--sizes 1024,2048,4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

import rkfac
from rkfac.brand import batch_columns, brand_update

RANK, BATCH, DECAY = 220, 256, 0.95


def statistic_columns(dim: int, generator: torch.Generator) -> torch.Tensor:
    """C = aᵀ/√N of a batch of inputs with feature scales falling from 1 to 10⁻³."""
    rows = torch.randn(BATCH, dim, generator=generator) * torch.logspace(0, -3, dim)
    return batch_columns(rows, "A", samples=BATCH, loss_reduction="mean")


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def bench(dim: int, repeats: int, updates: int = 4) -> dict[str, float]:
    generator = torch.Generator().manual_seed(dim)
    factor = torch.zeros(dim, dim)
    for step in range(updates):
        columns = statistic_columns(dim, generator)
        statistic = columns @ columns.T
        factor = statistic if step == 0 else factor.mul_(DECAY).add_(statistic, alpha=1 - DECAY)
    sre = rkfac.SymmetricRandomizedEVD(rank=RANK)
    pairs = sre.decompose(factor, torch.Generator().manual_seed(0))
    columns = statistic_columns(dim, generator)

    variants: dict[str, Callable[[], object]] = {
        "brand": lambda: brand_update(pairs, columns, DECAY, RANK),
        "dense fold": lambda: factor.clone().mul_(DECAY).addmm_(columns, columns.T, alpha=1 - DECAY),
        "sre": lambda: sre.decompose(factor, torch.Generator().manual_seed(0)),
    }
    for function in variants.values():  # warm-up
        function()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            samples[name].append(timed(function))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"float32, r={RANK}, m={BATCH}, SRE p=10 q=4, medians of {args.repeats} interleaved repeats"
    )
    print("| d | brand (s) | dense fold (s) | sre (s) | sre / brand | dense fold / brand |")
    print("|---|---|---|---|---|---|")
    for dim in (int(s) for s in args.sizes.split(",")):
        result = bench(dim, args.repeats)
        brand = result["brand"]
        print(
            f"| {dim} | {brand:.4f} | {result['dense fold']:.4f} | {result['sre']:.4f} | "
            f"{result['sre'] / brand:.1f} | {result['dense fold'] / brand:.2f} |"
        )


if __name__ == "__main__":
    main()
