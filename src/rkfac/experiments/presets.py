"""Named experiment settings: the paper's CIFAR-10 run and CPU-sized Fashion-MNIST runs.

Hyperparameters per optimizer family (used by every preset unless it says otherwise):

- SGD: lr 0.05, momentum 0.9 — the usual strong baseline for these MLP/CNN sizes.
- Adam: lr 1e-3, the default that works across these models.
- AdamW: lr 1e-3, decoupled weight decay 0.05 (the usual ViT/DeiT value) on every parameter,
  norms and biases included (no exclusion list: at a few epochs it hardly matters). It is the
  transformer baseline, so only fashion-vit runs it by default; the MLP and CNN presets keep Adam.
- Muon (``rkfac.experiments.peers``): lr 1e-3 and weight decay 0.05 shared with its AdamW part
  (Muon's update matched to AdamW's RMS), Muon on hidden matrices, AdamW on the rest.
- SOAP (pytorch-optimizer, optional extra): lr 1e-3, weight decay 0.01, the package's betas and
  preconditioning frequency. Muon and SOAP are issue 19's peers: untuned starting points until
  its tuning grid has run.
- K-FAC family (exact, RS, SRE, B, B-R): the library's defaults, which are the paper's
  recipe — lr 0.1, momentum 0, damping δ = 0.1 relative, rms clip κ = 0.07, factors every 10
  steps with ρ = 0.95, inverses every 50 (RS/SRE) with r = 220, p = 10, q = 4; B-R-KFAC
  refreshes every 50 steps. A one-epoch sweep of SRE-KFAC on the quick model (lr 0.3; lr 0.1
  with momentum 0.9; clip 0.3) diverged or ended worse, so the paper's values stay.
- SENG: the reference settings of spec section 5 — lr 0.05·(1 − epoch/75)⁶ (as an epoch
  schedule, epochs counted from 0 in the formula), momentum 0.9, weight decay 1e-2, damping
  λ = 2.0, curvature rebuilt every 200 steps, layers above 7·10⁵ weights sketched with 128
  rows per side and rank-16 convolution maps.

The Fashion-MNIST presets are sized so that the widest factors reach d ≥ 2048 (the MLP's
2048-wide hidden layers; the CNN's first Linear, A = 3137), where the O(d³)
eigendecomposition is real work on a 2-core CPU. fashion-vit is the exception, there for its
layer types rather than its sizes: a small pre-norm transformer (``nn.TransformerEncoderLayer``,
so ``nn.MultiheadAttention``) whose widest factor is only 257 (the feed-forward's second Linear).
Its targets (0.85, 0.87) are provisional: an AdamW run was at a training loss of about 0.6 a third
of the way into its first epoch, no full run has been timed yet; the K-FAC family runs it with
the library's defaults, untuned for transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rkfac.experiments.config import (
    ADAPTIVE_OPTIMIZERS,
    EIGENBASIS_ADAM,
    EIGENVALUE_CORRECTED,
    FIXED_STEP_KFAC,
    KFAC_OPTIMIZERS,
    OPTIMIZERS,
    RunConfig,
)
from rkfac.options import SENGOptions
from rkfac.schema import default_of, from_options
from rkfac.soap import LowRankSOAP


def seng_lr_schedule(epochs: int = 75) -> dict[int, float]:
    """SENG's reference 0.05·(1 − e/75)⁶ for 0-based epoch e, as a 1-based epoch schedule."""
    return {epoch + 1: 0.05 * (1 - epoch / 75) ** 6 for epoch in range(epochs)}


# Beyond RunConfig's defaults, which are the library's. The K-FAC family needs nothing: the
# library's defaults are the paper's recipe. b-r-kfac is B-KFAC with a refresh period, so it
# gives one (B-KFAC has none: BrandUpdate's and RunConfig's refresh_every default to None).
# SENG's curvature options are RunConfig's defaults (SENGOptions'), except damping: RunConfig
# has one damping field, and its default is K-FAC's δ.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.05, "momentum": 0.9},
    "adam": {"lr": 1e-3},
    "adamw": {"lr": 1e-3, "weight_decay": 0.05},
    "muon": {"lr": 1e-3, "weight_decay": 0.05},
    "soap": {"lr": 1e-3, "weight_decay": 0.01},
    **{name: {} for name in KFAC_OPTIMIZERS},
    # the adaptive step sets the length itself (no clip) and models the true Fisher's curvature
    **{name: {"clip": "none", "fisher": "mc", "damping_mode": "pi"} for name in ADAPTIVE_OPTIMIZERS},
    "b-r-kfac": {"refresh_every": 50},
    # rkfac.LowRankSOAP's own defaults, read from the class (soap.py says why): SOAP's lr, decay and
    # basis period, warm-started SRE at its rank, its factor period; no clip (Adam sets the scale)
    "sre-soap": {
        **LowRankSOAP.update_defaults,
        **LowRankSOAP.basis_defaults,
        "rank": LowRankSOAP.default_rank,
        "warm_start": True,
        "clip": "none",
    },
    "seng": {"lr": seng_lr_schedule(), "momentum": 0.9, "weight_decay": 1e-2, "damping": default_of(SENGOptions, "damping")},
}


# What a preset benches unless it names its own: every optimizer but the issue-19 peers (AdamW,
# Muon, SOAP), which the presets that want them name.
DEFAULT_OPTIMIZERS = tuple(
    name
    for name in OPTIMIZERS
    if name not in ("adamw", "muon", "soap", *ADAPTIVE_OPTIMIZERS, *EIGENBASIS_ADAM, *EIGENVALUE_CORRECTED)
)

# A preset's settings for these optimizers, where it names none of their own, are those of the
# method they change: sre-ekfac is SRE-KFAC with measured scales, so it runs at SRE-KFAC's recipe.
SETTINGS_OF = {"sre-ekfac": "sre-kfac"}


@dataclass(frozen=True)
class Preset:
    description: str
    common: dict[str, Any]
    per_optimizer: dict[str, dict[str, Any]] = field(default_factory=dict)
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    seeds: tuple[int, ...] = (0,)
    # printed after the bench's table: what the table does not show (where the method loses)
    note: str = ""


_PAPER_KFAC = {
    "lr": {1: 0.3, 2: 0.2, 3: 0.1, 13: 0.03, 18: 0.01, 27: 0.003, 40: 0.001},
    "damping": {1: 0.1, 25: 0.05, 35: 0.01},
    "momentum": 0.0,
    "weight_decay": 7e-4,
    "weight_decay_start": 200,
    "clip": "rms",
    "clip_value": 0.07,
    "factor_every": 10,
    "factor_decay": 0.95,
}
_PAPER_RANDOMIZED = {
    **_PAPER_KFAC,
    "rank": {1: 220, 15: 230},
    "oversample": 10,
    "power_iters": 4,
    "inverse_every": {1: 50, 20: 30},
}

# The autoencoder's K-FAC settings (issue 20's hand-set ones, which beat tuned Adam there): the
# paper's (lr 0.1, momentum 0, rms clip 0.07) diverge within 25 steps on it with either Fisher.
_AUTOENCODER_KFAC = {"lr": 0.03, "momentum": 0.9, "fisher": "mc", "clip": "kl", "clip_value": 0.001}

DEMO_NOTE = """\
Where rkfac stands on this workload (fashion-autoencoder, medians of 3 seeds; BENCHMARKS.md,
issues 20 and 21): sre-soap and sre-kfac-auto run at their defaults, AdamW and SOAP at the lr
rkfac tune chose for them (sre-soap's tuned lr is its default).
- sre-soap (Adam in the eigenbasis of K-FAC's rank-64 factors) reaches every loss target first:
  15 and 12 at 18 s, 10 at 29 s, against AdamW's 23 s to 15 (AdamW never reaches 12) and SOAP's
  43 / 67 / 106 s. Its epoch costs 30 s against SOAP's 103 and AdamW's 14; over 8 epochs it
  reaches SOAP's 8-epoch final loss (7.14) in 0.40x SOAP's time.
- sre-kfac-auto (no lr, momentum or damping chosen) reaches 12 at 43 s, but loses 15 to AdamW
  (25 s against 23 s) and ends above SOAP (9.6 against 7.1 after 4 epochs): after epoch 1 its
  damping sits at its floor. Its adaptation costs 37% of a K-FAC step here.
- Classifiers: at batch 2048, every optimizer tuned, sre-soap reaches each target first but
  ends below SOAP: fashion-mlp-wide-2048 (3 seeds) 86% and 88% 1.6x sooner than AdamW and 2.8x
  than SGD, final 89.2% against 90.1%; fashion-cnn-2048 (seed 0) 89% and 90% in 0.65x and 0.71x
  SOAP's time, final 91.7% against 92.4%. At batch 256, fashion-cnn (3 seeds, every peer tuned):
  89% and 90% 1.3x sooner than AdamW, final 91.5% against SOAP's 91.9%; on fashion-vit
  (3 seeds, batch 256) SOAP reaches 85% and 87% first (sre-soap 1.3x its time, final 88.0%
  against 88.2%).
Curves: runs/bench-demo/bench-curves.png (median smoothed step loss against time and steps) and
bench-adaptive.png (the adaptive step's alpha, mu, lambda and rho)."""

# The winners of `rkfac tune --preset fashion-autoencoder` (lr × 0.1, 0.3, 1, 3 of each
# optimizer's own; SGD diverged at every point): AdamW ×1, SOAP ×3, sre-soap ×1 (SRE-KFAC ×3, lr 0.09).
_TUNED_AUTOENCODER: dict[str, dict[str, Any]] = {"adamw": {"lr": 1e-3}, "soap": {"lr": 3e-3}, "sre-soap": {"lr": 3e-3}}

# fashion-autoencoder's workload: 4 epochs at batch 256, timed at training losses 15, 12, 10
_AUTOENCODER_COMMON: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "model": "autoencoder",
    "epochs": 4,
    "batch_size": 256,
    "target_loss": [15.0, 12.0, 10.0],
    "evals_per_epoch": 5,
}

PRESETS: dict[str, Preset] = {
    "paper-vgg16-cifar10": Preset(
        "The paper's experiment (spec section 6): VGG16_bn on CIFAR-10, batch 256, 50 epochs. Needs the "
        "CIFAR-10 python batches (--data-dir) and, realistically, a GPU.",
        {"dataset": "cifar10", "model": "vgg16_bn", "epochs": 50, "batch_size": 256, "target_acc": [0.91, 0.92]},
        {
            "kfac": {**_PAPER_KFAC, "inverse_every": 30},
            "rs-kfac": _PAPER_RANDOMIZED,
            "sre-kfac": _PAPER_RANDOMIZED,
            "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        },
        optimizers=("kfac", "rs-kfac", "sre-kfac", "seng"),
    ),
    "fashion-mlp-wide": Preset(
        "Fashion-MNIST, MLP 784-2048-2048-10 (factors up to 2049), batch 256, 5 epochs.",
        {
            "dataset": "fashion-mnist",
            "model": "mlp",
            "widths": [2048, 2048],
            "epochs": 5,
            "batch_size": 256,
            "target_acc": [0.86, 0.88],
            "evals_per_epoch": 4,
        },
    ),
    "fashion-cnn": Preset(
        "Fashion-MNIST, CNN conv32-conv64-fc512 (first Linear factor A = 3137), batch 256, 5 epochs.",
        {
            "dataset": "fashion-mnist",
            "model": "cnn",
            "epochs": 5,
            "batch_size": 256,
            "target_acc": [0.89, 0.90],
            "evals_per_epoch": 4,
        },
    ),
    "fashion-vit": Preset(
        "Fashion-MNIST, ViT: 7×7 patches (16 tokens), width 128, 4 pre-norm blocks of 4 heads and "
        "MLP 256, mean-pooled; batch 256, 5 epochs.",
        {
            "dataset": "fashion-mnist",
            "model": "vit",
            "epochs": 5,
            "batch_size": 256,
            "target_acc": [0.85, 0.87],
            "evals_per_epoch": 4,
        },
        optimizers=("adamw", "kfac", "sre-kfac"),
    ),
    "fashion-vgg": Preset(
        "Fashion-MNIST, VGG-style CNN 64-128-256-512-512 with BatchNorm (widest factors A = 2305 and 4609, "
        "like VGG16_bn's deep layers), batch 256, 2 epochs: the paper's regime, where exact K-FAC's "
        "decompositions dominate. Heavy on a CPU (seconds per step).",
        {
            "dataset": "fashion-mnist",
            "model": "vgg_fashion",
            "epochs": 2,
            "batch_size": 256,
            "target_acc": [0.88, 0.90],
            "evals_per_epoch": 4,
        },
        optimizers=("sgd", "adamw", "kfac", "sre-kfac"),
    ),
    "fashion-autoencoder": Preset(
        "Fashion-MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784 (tanh, linear code and "
        "output), pixels in [0, 1], squared error per image; batch 256, 4 epochs; targets are "
        "training-loss levels on a fixed 10,000-image training subset (the classic K-FAC benchmark).",
        _AUTOENCODER_COMMON,
        {name: _AUTOENCODER_KFAC for name in FIXED_STEP_KFAC},
        optimizers=("sgd", "adamw", "muon", "soap", "kfac", "sre-kfac"),
    ),
    "fashion-autoencoder-auto": Preset(
        "fashion-autoencoder (4 epochs), the adaptive SRE-KFAC at its defaults against AdamW and SOAP at "
        "the settings rkfac tune chose for them, 3 seeds (issue 20's bench).",
        _AUTOENCODER_COMMON,
        _TUNED_AUTOENCODER,
        optimizers=("adamw", "soap", "sre-kfac-auto"),
        seeds=(0, 1, 2),
    ),
    **{
        f"{name}-2048": Preset(
            f"{name} at batch 2048 (issue 19's large-batch workload: K-FAC's per-step cost is spread over "
            "more samples), same settings otherwise, 10 epochs.",
            {**base, "batch_size": 2048, "epochs": 10},
        )
        for name, base in (
            ("fashion-cnn", {"dataset": "fashion-mnist", "model": "cnn", "target_acc": [0.89, 0.90], "evals_per_epoch": 4}),
            (
                "fashion-mlp-wide",
                {
                    "dataset": "fashion-mnist",
                    "model": "mlp",
                    "widths": [2048, 2048],
                    "target_acc": [0.86, 0.88],
                    "evals_per_epoch": 4,
                },
            ),
        )
    },
    "demo": Preset(
        "README demo (make demo): the fashion-autoencoder for 2 epochs, sre-soap and the adaptive SRE-KFAC at their "
        "defaults against AdamW and SOAP at the settings rkfac tune chose (BENCHMARKS.md, issues 19-21), about 8 min on 2 cores.",
        {
            "dataset": "fashion-mnist",
            "model": "autoencoder",
            "epochs": 2,
            "batch_size": 256,
            "target_loss": [15.0, 12.0],
            "evals_per_epoch": 4,
        },
        _TUNED_AUTOENCODER,
        optimizers=("adamw", "soap", "sre-kfac-auto", "sre-soap"),
        note=DEMO_NOTE,
    ),
    "quick": Preset(
        "README demo: Fashion-MNIST, MLP 784-1536-1536-10, 2 epochs, SGD, Adam and the three K-FACs (about 6 min on 2 cores).",
        {
            "dataset": "fashion-mnist",
            "model": "mlp",
            "widths": [1536, 1536],
            "epochs": 2,
            "batch_size": 256,
            "target_acc": [0.84, 0.86],
        },
        optimizers=("sgd", "adam", "kfac", "rs-kfac", "sre-kfac"),
    ),
}


# Named variants of an optimizer, usable wherever an optimizer name is (``rkfac bench
# --optimizers sre-kfac,sre-kfac-adaptive``) so that one bench can interleave them by seed.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sre-kfac-adaptive": ("sre-kfac", {"adaptive_rank": True}),
    "sre-kfac-adaptive-bf16": ("sre-kfac", {"adaptive_rank": True, "apply_dtype": "bfloat16"}),
    "sre-kfac-bf16": ("sre-kfac", {"apply_dtype": "bfloat16"}),
    "sre-kfac-auto-k2": ("sre-kfac-auto", {"model_every": 2}),  # the curvature measured every 2nd step
    "sre-kfac-auto-k4": ("sre-kfac-auto", {"model_every": 4}),
    # the curvature samples before importance sampling (the batch's first 128), and 32 draws
    "sre-kfac-auto-first": ("sre-kfac-auto", {"curvature_sampling": "first"}),
    "sre-kfac-auto-is32": ("sre-kfac-auto", {"curvature_sampling": "importance", "curvature_samples": 32}),
}
RUNNABLE = (*OPTIMIZERS, *VARIANTS)


def variant_name(config: dict[str, Any]) -> str:
    """The name a resolved config (as saved in config.json) runs under: the most specific
    variant whose settings it holds, else its optimizer (used to label plots)."""
    matching = [
        name
        for name, (optimizer, settings) in VARIANTS.items()
        if optimizer == config["optimizer"] and all(config.get(key) == value for key, value in settings.items())
    ]
    return max(matching, key=lambda name: len(VARIANTS[name][1]), default=config["optimizer"])


def resolve_config(name: str, preset: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults ← optimizer family defaults ← preset common ← preset per-optimizer ← variant ← overrides.

    ``name`` is an optimizer or one of :data:`VARIANTS` (an optimizer plus settings).
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    optimizer, variant = VARIANTS.get(name, (name, {}))
    if optimizer not in FAMILY_DEFAULTS:
        raise ValueError(f"optimizer must be one of {RUNNABLE}, got {name!r}")
    values: dict[str, Any] = dict(FAMILY_DEFAULTS[optimizer])
    if preset is not None:
        values.update(PRESETS[preset].common)
        per_optimizer = PRESETS[preset].per_optimizer
        values.update(per_optimizer.get(optimizer, per_optimizer.get(SETTINGS_OF.get(optimizer, optimizer), {})))
        values["preset"] = preset
    values.update(variant)
    fixed = {key: value for key, value in (overrides or {}).items() if key in ("lr", "momentum", "damping")}
    if optimizer in ADAPTIVE_OPTIMIZERS and fixed:
        raise ValueError(
            f"{optimizer} chooses lr, momentum and damping itself; drop {fixed} "
            "(--initial-damping sets its first λ; rkfac tune has nothing to search for it)"
        )
    not_read = ("momentum", "damping", "damping_mode", "clip", "clip_value", "apply_dtype")  # K-FAC's step
    unused = {key: value for key, value in (overrides or {}).items() if key in not_read}
    if optimizer in EIGENBASIS_ADAM and unused:
        raise ValueError(f"{optimizer} is Adam in K-FAC's eigenbasis: it has no {sorted(unused)} to set; drop {unused}")
    apply_dtype = (overrides or {}).get("apply_dtype", "float32")
    if optimizer in EIGENVALUE_CORRECTED and apply_dtype != "float32":
        raise ValueError(f"{optimizer} has no damped solve for apply_dtype={apply_dtype!r}: drop it")
    values.update(overrides or {})
    values["optimizer"] = optimizer
    return from_options(RunConfig, values, "resolve_config")  # validated as it is made
