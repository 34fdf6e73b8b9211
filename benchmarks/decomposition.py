"""Decomposition and preconditioner-step timings, interleaved, medians of repeats.

Part 1: ExactEigh, RandomizedSVD and SymmetricRandomizedEVD (r = 220, p = 10, q = 1, 2, 4) on
exponentially averaged factors of width 512 … 4096, each against its floor: the time of
the method's own d × d by d × k products, run alone (2(q+1) of them for RSVD, q+1 for SRE).

Part 2: KFACPreconditioner.step() on one 3072 → 3072 Linear layer (A: 3073², G: 3072²) with
statistics and a decomposition on every step: exact against the randomized methods. This
shows the O(d_G d_A (k_G + k_A)) application: exact K-FAC also pays k = d there.

    python benchmarks/decomposition.py [--sizes 512,1024,2048,4096] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import rkfac

RANK, OVERSAMPLE = 220, 10


def averaged_factor(dim: int, batch: int = 256, updates: int = 20, decay: float = 0.95, seed: int = 0) -> torch.Tensor:
    """ρ-average of batch statistics aᵀa/n with decaying feature scales, like a layer's A factor."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, dim)
    factor = torch.zeros(dim, dim)
    for step in range(updates):
        rows = torch.randn(batch, dim, generator=generator) * scales
        statistic = rows.T @ rows / batch
        factor = statistic if step == 0 else factor.mul_(decay).add_(statistic, alpha=1 - decay)
    return factor


def methods() -> dict[str, rkfac.Decomposition]:
    table: dict[str, rkfac.Decomposition] = {"exact": rkfac.ExactEigh()}
    for q in (4, 2, 1):
        table[f"rsvd q={q}"] = rkfac.RandomizedSVD(rank=RANK, oversample=OVERSAMPLE, power_iters=q)
        table[f"sre q={q}"] = rkfac.SymmetricRandomizedEVD(rank=RANK, oversample=OVERSAMPLE, power_iters=q)
    return table


def product_count(method: rkfac.Decomposition) -> int:
    if isinstance(method, rkfac.RandomizedSVD):
        return 2 * (method.power_iters + 1)
    if isinstance(method, rkfac.SymmetricRandomizedEVD):
        return method.power_iters + 1
    return 0


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def bench_decompositions(sizes: list[int], repeats: int) -> list[dict[str, float | str | int]]:
    rows: list[dict[str, float | str | int]] = []
    table = methods()
    for dim in sizes:
        factor = averaged_factor(dim)
        block = torch.randn(dim, RANK + OVERSAMPLE)
        products = sorted({product_count(m) for m in table.values()} - {0})
        samples: dict[str, list[float]] = {name: [] for name in table}
        floors: dict[int, list[float]] = {count: [] for count in products}

        def run_products(count: int, factor: torch.Tensor = factor, block: torch.Tensor = block) -> None:
            for _ in range(count):
                factor @ block

        table["exact"].decompose(factor)  # warm-up (allocations, thread pool)
        for _ in range(repeats):  # interleaved: each repeat runs every variant once
            for name, method in table.items():
                samples[name].append(timed(lambda m=method, f=factor: m.decompose(f, torch.Generator().manual_seed(0))))
            for count in products:
                floors[count].append(timed(lambda c=count: run_products(c)))
        exact = statistics.median(samples["exact"])
        for name, method in table.items():
            seconds = statistics.median(samples[name])
            count = product_count(method)
            floor = statistics.median(floors[count]) if count else float("nan")
            rows.append(
                {
                    "dim": dim,
                    "method": name,
                    "seconds": seconds,
                    "exact_over_method": exact / seconds,
                    "floor_seconds": floor,
                    "method_over_floor": seconds / floor if count else float("nan"),
                }
            )
    return rows


def bench_preconditioner_step(width: int, repeats: int, batch: int = 256) -> list[dict[str, float | str]]:
    """Time pre.step() alone (statistics folded in, both factors decomposed, the solve, the clip)."""
    torch.manual_seed(0)
    template = nn.Linear(width, width)
    x, target = torch.randn(batch, width), torch.randn(batch, width)
    variants = {
        "exact": rkfac.ExactEigh(),
        "rsvd q=4": rkfac.RandomizedSVD(rank=RANK, oversample=OVERSAMPLE, power_iters=4),
        "sre q=4": rkfac.SymmetricRandomizedEVD(rank=RANK, oversample=OVERSAMPLE, power_iters=4),
    }
    layers = {name: nn.Linear(width, width) for name in variants}
    preconditioners = {}
    for name, decomposition in variants.items():
        layers[name].load_state_dict(template.state_dict())
        preconditioners[name] = rkfac.KFACPreconditioner(
            layers[name], decomposition=decomposition, factor_every=1, inverse_every=1
        )
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats + 1):  # interleaved; round 0 is a warm-up
        for name, pre in preconditioners.items():
            layers[name].zero_grad()
            F.mse_loss(layers[name](x), target).backward()
            seconds = timed(pre.step)
            if repeat > 0:
                samples[name].append(seconds)
    exact = statistics.median(samples["exact"])
    return [
        {"method": name, "seconds": statistics.median(s), "exact_over_method": exact / statistics.median(s)}
        for name, s in samples.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-width", type=int, default=3072)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"r={RANK} p={OVERSAMPLE}, medians of {args.repeats} interleaved repeats"
    )

    rows = bench_decompositions(sizes, args.repeats)
    print("\n| d | method | seconds | exact / method | product floor (s) | method / floor |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['dim']} | {row['method']} | {row['seconds']:.4f} | {row['exact_over_method']:.1f} | "
            f"{row['floor_seconds']:.4f} | {row['method_over_floor']:.2f} |"
        )
    by = {(r["dim"], r["method"]): float(r["seconds"]) for r in rows}
    if len(sizes) > 1:
        small, large = sizes[-2], sizes[-1]
        ratio = large / small
        print(f"\nGrowth {small} -> {large} (x{ratio:.0f} width; d² gives x{ratio**2:.0f}, d³ x{ratio**3:.0f}):")
        for name in methods():
            print(f"  {name}: x{by[(large, name)] / by[(small, name)]:.2f}")

    step_rows = bench_preconditioner_step(args.step_width, args.repeats)
    print(f"\nKFACPreconditioner.step() on Linear({args.step_width}, {args.step_width}), statistics + decomposition every step:")
    print("| method | seconds per step | exact / method |")
    print("|---|---|---|")
    for row in step_rows:
        print(f"| {row['method']} | {row['seconds']:.3f} | {row['exact_over_method']:.1f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"decompositions": rows, "preconditioner_step": step_rows}, handle, indent=1)


if __name__ == "__main__":
    main()
