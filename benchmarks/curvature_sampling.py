"""How many samples does the adaptive step's curvature need? Uniform against importance sampling.

The adaptive step (rkfac/adaptive.py) measures ΔᵀCΔ, C the GGN, on a subset of the batch. Per
sample the term is fᵢ = (JᵢΔ)ᵀ Hᵢ (JᵢΔ), and for cross-entropy Hᵢ = diag(p) − ppᵀ is nearly zero
for a confidently classified sample, so a uniform subset spends most of its samples on terms
near zero. This script trains the quick MLP (784-1536-1536-10, batch 256) with SGD, and at a few
points computes every fᵢ of a batch exactly (one forward-mode pass on the whole batch), then the
relative standard error of the batch mean ΔᵀCΔ estimated from m samples:

- uniform, m of n without replacement: Var = (1 − m/n) σ²/m;
- importance, m draws with replacement, qᵢ = 0.9 wᵢ/Σw + 0.1/n, wᵢ = 1 − Σ p² (Hᵢ's trace, known
  from the forward pass; the uniform share keeps every qᵢ > 0), each weighted 1/(n qᵢ):
  Var = (Σ fᵢ²/(n² qᵢ) − F²)/m.

Δ is the gradient direction (the K-FAC direction differs; the weights' effect is through H).
Prints one table; the numbers are exact variances, not a timing: nothing needs to be quiet.

    .venv/bin/python benchmarks/curvature_sampling.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rkfac.curvature_samples import UNIFORM_SHARE
from rkfac.experiments.datasets import load_fashion_mnist
from rkfac.experiments.models import build_model
from rkfac.quadratic_model import output_tangents


def per_sample_terms(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fᵢ for Δ = −∇h on this batch, and the weights wᵢ = 1 − Σ p²."""
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangent = {name: -p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits, (jvp,) = output_tangents(model, params, [images], [tangent])
    probs = logits.softmax(-1)
    terms = (probs * jvp * jvp).sum(1) - (probs * jvp).sum(1) ** 2
    return terms.double(), (1 - probs.pow(2).sum(1)).double()


def relative_errors(terms: torch.Tensor, weights: torch.Tensor, m: int) -> tuple[float, float]:
    n, mean = terms.numel(), terms.mean()
    uniform = (1 - m / n) * terms.var(unbiased=False) / m
    q = (1 - UNIFORM_SHARE) * weights / weights.sum() + UNIFORM_SHARE / n  # the library's mixture: no qᵢ is 0
    importance = ((terms.pow(2) / (n * n * q)).sum() - mean**2) / m
    return float(uniform.sqrt() / mean), float(importance.clamp_min(0).sqrt() / mean)


def main() -> None:
    torch.manual_seed(0)
    data = load_fashion_mnist()
    model = build_model("mlp", data.input_shape, data.num_classes, widths=[1536, 1536])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    order = torch.randperm(len(data.train_labels))
    batch, probes = 256, {0, 50, 200, 500, 1000}
    columns = [f"uniform m={m}" for m in (128, 64, 32)] + [f"importance m={m}" for m in (64, 32, 16)]
    print("| SGD step | train loss | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for step in range(max(probes) + 1):
        index = order[(step * batch) % (len(order) - batch) :][:batch]
        images, labels = data.train_images[index], data.train_labels[index]
        if step in probes:
            terms, weights = per_sample_terms(model, images, labels)
            loss = float(F.cross_entropy(model(images), labels).detach())
            cells = [relative_errors(terms, weights, m)[0] for m in (128, 64, 32)]
            cells += [relative_errors(terms, weights, m)[1] for m in (64, 32, 16)]
            print(f"| {step} | {loss:.3f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()


if __name__ == "__main__":
    main()
