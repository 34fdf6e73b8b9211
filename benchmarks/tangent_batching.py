"""Would one vmapped forward-mode pass beat the adaptive step's two? (issue 20's cost)

The adaptive step (rkfac/adaptive.py) needs J·Δ and J·δ₀ on its curvature samples, and
:func:`rkfac.quadratic_model.output_tangents` runs one ``forward_ad`` pass per tangent, each
recomputing the primal. ``torch.func.vmap`` over ``torch.func.jvp`` computes the primal once and
pushes both tangents through batched kernels. This script times the two side by side on 64
samples (the cross-entropy default) of four preset models in training mode (dropout, batch
norm as in the step), interleaved, 20 repeats each, and prints the medians, their ratio and the
largest difference of the tangents (bitwise equal or not).

    .venv/bin/python benchmarks/tangent_batching.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.func import functional_call, jvp, vmap

from rkfac.experiments.models import build_model
from rkfac.quadratic_model import differentiable_attention, output_tangents

MODELS = {
    "mlp (quick: 784-1536-1536-10)": ("mlp", {"widths": (1536, 1536)}),
    "autoencoder": ("autoencoder", {}),
    "cnn": ("cnn", {}),
    "vit": ("vit", {}),
}
SAMPLES, REPEATS = 64, 20


def passes(model: torch.nn.Module, x: torch.Tensor) -> tuple[Callable[[], list[torch.Tensor]], Callable[[], list[torch.Tensor]]]:
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangents = [{name: torch.randn_like(p) for name, p in params.items()} for _ in range(2)]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    names = list(params)

    def looped() -> list[torch.Tensor]:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            return output_tangents(model, params, [x], tangents)[1]

    def outputs_at(*values: torch.Tensor) -> torch.Tensor:
        with differentiable_attention():
            return functional_call(model, {**dict(zip(names, values, strict=True)), **buffers}, (x,))

    def batched() -> list[torch.Tensor]:
        stacked = [torch.stack([t[name] for t in tangents]) for name in names]
        primals = tuple(params[name] for name in names)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            _, derivatives = vmap(lambda *t: jvp(outputs_at, primals, t), out_dims=(None, 0), randomness="same")(*stacked)
        return list(derivatives)

    return looped, batched


def main() -> None:
    torch.manual_seed(0)
    print("| model | two passes (ms) | one vmapped pass (ms) | vmapped / two | max tangent difference |\n|---|---|---|---|---|")
    for label, (name, options) in MODELS.items():
        model = build_model(name, (1, 28, 28), 10, **options).train()
        looped, batched = passes(model, torch.randn(SAMPLES, 1, 28, 28))
        difference = max(float((a - b).abs().max()) for a, b in zip(looped(), batched(), strict=True))
        times: dict[str, list[float]] = {"looped": [], "batched": []}
        for _ in range(REPEATS):
            for key, run in (("looped", looped), ("batched", batched)):
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
        two, one = (statistics.median(times[key]) * 1e3 for key in ("looped", "batched"))
        print(f"| {label} | {two:.1f} | {one:.1f} | {one / two:.2f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
