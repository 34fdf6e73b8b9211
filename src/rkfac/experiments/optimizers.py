"""Build the optimizer a run asks for, with schedules turned into callables of the step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import rkfac
from rkfac.experiments import peers
from rkfac.experiments.config import (
    ADAPTIVE_OPTIMIZERS,
    APPLY_DTYPES,
    EIGENBASIS_ADAM,
    EIGENVALUE_CORRECTED,
    KFAC_OPTIMIZERS,
    RunConfig,
    step_schedule,
    value_at_epoch,
)
from rkfac.experiments.tasks import task_for
from rkfac.timing import PhaseTimer


def decomposition_for(config: RunConfig, steps_per_epoch: int) -> rkfac.Decomposition:
    """The decomposition of a K-FAC optimizer. B-KFAC (b-kfac, b-r-kfac) falls back to SRE with
    the run's settings for the factors it cannot update online; its own rank is the first
    epoch's value of ``rank``. Only b-r-kfac refreshes (every ``refresh_every`` steps): b-kfac
    ignores the field, as it always has."""
    if config.optimizer in ADAPTIVE_OPTIMIZERS:  # the fixed-step method's decomposition
        return decomposition_for(config.updated(optimizer=config.optimizer.removesuffix("-auto")), steps_per_epoch)
    if config.optimizer in (*EIGENBASIS_ADAM, *EIGENVALUE_CORRECTED):  # sre-soap, sre-ekfac: SRE-KFAC's bases
        return decomposition_for(config.updated(optimizer="sre-kfac"), steps_per_epoch)
    if config.optimizer == "kfac":
        return rkfac.ExactEigh()
    if config.optimizer in ("b-kfac", "b-r-kfac"):
        fallback = decomposition_for(config.updated(optimizer="sre-kfac"), steps_per_epoch)
        refresh = config.refresh_every if config.optimizer == "b-r-kfac" else None
        return rkfac.BrandUpdate(rank=int(value_at_epoch(config.rank, 1)), fallback=fallback, refresh_every=refresh)
    method = rkfac.RandomizedSVD if config.optimizer == "rs-kfac" else rkfac.SymmetricRandomizedEVD
    plain = ("oversample", "power_iters", "warm_start", "warm_power_iters", "adaptive_rank", "min_rank")
    return method(rank=step_schedule(config.rank, steps_per_epoch, cast=int), **{name: getattr(config, name) for name in plain})


def build_optimizer(
    config: RunConfig, model: nn.Module, steps_per_epoch: int, timer: PhaseTimer | None = None
) -> torch.optim.Optimizer:
    """The optimizer; K-FAC variants carry their preconditioner as ``.preconditioner``.

    The learning rate is set by the training loop every step (``lr_at``), so the optimizer is
    built with the first epoch's value.
    """
    lr = lr_at(config, 0, steps_per_epoch)
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "muon":
        return peers.MuonWithAdamW(model, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "soap":
        return peers.soap(model, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer in KFAC_OPTIMIZERS:
        if config.optimizer in ADAPTIVE_OPTIMIZERS:
            step: dict[str, Any] = {
                "loss": task_for(config.model).mc_loss,
                "initial_damping": config.initial_damping,
                "min_relative_damping": config.min_relative_damping,
                "damping_every": config.damping_every,
                "curvature_samples": config.curvature_samples,
                "curvature_sampling": config.curvature_sampling,
                "model_every": config.model_every,
                "step_scale": step_schedule(config.step_scale, steps_per_epoch),
            }
        else:
            step = {"lr": lr, "momentum": config.momentum, "damping": step_schedule(config.damping, steps_per_epoch)}
        if config.optimizer in EIGENVALUE_CORRECTED:
            step["carry"] = config.ekfac_carry
        kind = rkfac.LowRankEKFAC if config.optimizer in EIGENVALUE_CORRECTED else rkfac.KFAC
        return kind(
            model,
            **step,
            weight_decay=config.weight_decay,
            weight_decay_start=config.weight_decay_start,
            decomposition=decomposition_for(config, steps_per_epoch),
            damping_mode=config.damping_mode,
            factor_decay=config.factor_decay,
            factor_every=step_schedule(config.factor_every, steps_per_epoch, cast=int),
            inverse_every=step_schedule(config.inverse_every, steps_per_epoch, cast=int),
            clip=config.clip,
            clip_value=config.clip_value,
            fisher=config.fisher,
            mc_loss=task_for(config.model).mc_loss,
            kfac_approx=config.kfac_approx,
            statistics_samples=config.statistics_samples,
            skip=config.skip,
            seed=config.seed,
            apply_dtype=APPLY_DTYPES[config.apply_dtype],
            timer=timer,
        )
    if config.optimizer in EIGENBASIS_ADAM:
        return rkfac.LowRankSOAP(
            model,
            lr=lr,
            weight_decay=config.weight_decay,
            weight_decay_start=config.weight_decay_start,
            carry=config.carry,
            decomposition=decomposition_for(config, steps_per_epoch),
            factor_decay=config.factor_decay,
            factor_every=step_schedule(config.factor_every, steps_per_epoch, cast=int),
            inverse_every=step_schedule(config.inverse_every, steps_per_epoch, cast=int),
            fisher=config.fisher,
            mc_loss=task_for(config.model).mc_loss,
            kfac_approx=config.kfac_approx,
            statistics_samples=config.statistics_samples,
            skip=config.skip,
            seed=config.seed,
            timer=timer,
        )
    if config.optimizer == "seng":
        return rkfac.SENG(
            model,
            lr=lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            damping=step_schedule(config.damping, steps_per_epoch),
            update_freq=config.update_freq,
            col_sample_size=config.col_sample_size,
            sketch_threshold=config.sketch_threshold,
            sketch_rank=config.sketch_rank,
            seed=config.seed,
            timer=timer,
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def lr_at(config: RunConfig, step: int, steps_per_epoch: int) -> float:
    schedule = step_schedule(config.lr, steps_per_epoch)
    return float(schedule(step) if callable(schedule) else schedule)


def damping_at(config: RunConfig, step: int, steps_per_epoch: int) -> float | None:
    if config.optimizer not in KFAC_OPTIMIZERS:
        return None
    schedule = step_schedule(config.damping, steps_per_epoch)
    return float(schedule(step) if callable(schedule) else schedule)
