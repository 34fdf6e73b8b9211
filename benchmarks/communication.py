"""Bytes sent per inverse round: rkfac's low-rank pairs against dense inverses (the KAISA scheme).

For every preconditioned layer of a model, both factors (d_A, d_G) are decomposed once per
inverse round. rkfac broadcasts each pair (U, D) from its owner: d·k + k + 2 numbers with
k = min(r, d) (the layout of ``rkfac.communication``). KAISA-style data parallel K-FAC
broadcasts each factor's dense inverse (or its d × d eigenbasis and d eigenvalues): d²
numbers at least. The factor statistics all-reduced on factor steps are reported too:
d(d+1)/2 per factor with rkfac's symmetric packing against d² unpacked. float32 throughout.

    python benchmarks/communication.py --rank 220
"""

from __future__ import annotations

import argparse

from rkfac.experiments.models import build_model
from rkfac.layers import kind_for

MODELS = {
    "fashion-mlp-wide": ("mlp", (1, 28, 28), 10, {"widths": [2048, 2048]}),
    "fashion-cnn": ("cnn", (1, 28, 28), 10, {}),
    "vgg16_bn (CIFAR-10)": ("vgg16_bn", (3, 32, 32), 10, {}),
}


def factor_widths(name: str) -> list[int]:
    model_name, shape, classes, options = MODELS[name]
    model = build_model(model_name, shape, classes, **options)
    return [d for module in model.modules() if (kind := kind_for(module)) is not None for d in kind.factor_dims]


def mib(numbers: int) -> float:
    return 4 * numbers / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=220)
    args = parser.parse_args()
    r = args.rank
    print(f"float32, k = min({r}, d); MiB per round, all factors of the model")
    print("| model | factors | widest d | low-rank pairs | dense inverses | dense / low-rank | statistics packed | unpacked |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(name, factor_widths(name)) for name in MODELS]
    rows.append(("one factor, d = 4096", [4096]))
    for name, dims in rows:
        low_rank = sum(d * min(r, d) + min(r, d) + 2 for d in dims)
        dense = sum(d * d for d in dims)
        packed = sum(d * (d + 1) // 2 for d in dims)
        print(
            f"| {name} | {len(dims)} | {max(dims)} | {mib(low_rank):.2f} | {mib(dense):.2f} | {dense / low_rank:.1f}× "
            f"| {mib(packed):.2f} | {mib(dense):.2f} |"
        )


if __name__ == "__main__":
    main()
