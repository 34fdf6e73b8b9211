"""One training run: data order, the loop, evaluation, checkpoints, resume.

What each step and evaluation records (the time split, collective traffic, health, the
summary) is :mod:`rkfac.experiments.metrics`. Training time is the sum of each step's split;
evaluation (on the test set, and on a fixed training subset when the run has training-loss
targets or reconstructs, at each epoch's end and ``evals_per_epoch - 1`` evenly spaced points
inside it) is never counted, runs in eval mode and draws no random numbers, so it never changes
the trajectory. A target is timed at the first evaluation that reaches it. What the run learns
(its loss, what it evaluates) is its task, :mod:`rkfac.experiments.tasks`.

Reproducibility: the data order of epoch e is a permutation drawn from a generator seeded by
(seed, "order", e), the augmentation of step s from (seed, "augment", s), and the model's own
randomness (dropout) from the global torch generator, whose state goes into each checkpoint.
A resumed run therefore continues the uninterrupted trajectory exactly (bitwise on CPU).
The last incomplete batch of an epoch is dropped, so every step sees ``batch_size`` samples.

Under ``torchrun`` (see :mod:`rkfac.experiments.distributed`) each rank trains on its share of
every global batch, the logged loss is the global batch's, rank 0 alone evaluates and writes,
and each step records the bytes its collectives carried.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from rkfac.experiments import metrics
from rkfac.experiments.config import (
    ADAPTIVE_OPTIMIZERS,
    EIGENBASIS_ADAM,
    KFAC_FACTORS,
    PRECONDITIONED,
    EpochSchedule,
    RunConfig,
    step_schedule,
)
from rkfac.experiments.datasets import ImageDataset, load_dataset
from rkfac.experiments.distributed import mean_over_ranks, placement_from_environment, start
from rkfac.experiments.metrics import Progress, StepClock, TrafficLedger, preconditioner_of
from rkfac.experiments.models import build_model
from rkfac.experiments.optimizers import build_optimizer
from rkfac.experiments.resume import RESUMES, check_resume, record_resume, run_config
from rkfac.experiments.rundir import RunDirectory, environment
from rkfac.experiments.tasks import TRAIN_EVAL_SAMPLES, Classification, Reconstruction, task_for
from rkfac.seeding import keyed_generator
from rkfac.timing import PhaseTimer


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the last checkpoint is kept intact."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    return torch.device(name)


class Trainer:
    """Owns the model, optimizer and run directory of one run; :meth:`run` trains it."""

    def __init__(self, config: RunConfig, out: str | Path, *, quiet: bool = False, dataset: ImageDataset | None = None) -> None:
        self.config = config.validate()
        self.quiet = quiet
        self.placement = placement_from_environment()
        self._shard = self.placement.shard(config.batch_size)
        # a process group this trainer creates is destroyed by train() when the run ends
        self.owns_process_group = self.placement.active and not torch.distributed.is_initialized()
        self.device = start(self.placement, resolve_device(config.device))
        self.run_dir = RunDirectory(out, writer=self.placement.is_main).create()
        data = dataset or load_dataset(
            config.dataset,
            config.data_dir,
            synthetic_train=config.synthetic_train,
            synthetic_test=config.synthetic_test,
            seed=config.seed,
        )
        self.data = data
        self.task = task_for(config.model, data.mean, data.std)
        self.train_images, self.train_labels = data.train_images.to(self.device), data.train_labels.to(self.device)
        self.test_images, self.test_labels = data.test_images.to(self.device), data.test_labels.to(self.device)
        self.steps_per_epoch = len(self.train_images) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {config.batch_size} is larger than the training set ({len(self.train_images)} samples)")
        torch.manual_seed(config.seed)
        self.net = build_model(
            config.model, data.input_shape, data.num_classes, width_scale=config.width_scale, widths=config.widths
        ).to(self.device)
        self.model: nn.Module = self.net
        if self.placement.active:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=device_ids)
        self.timer = PhaseTimer(synchronize=self.device.type == "cuda") if config.optimizer in PRECONDITIONED else None
        self.optimizer = build_optimizer(config, self.model, self.steps_per_epoch, self.timer)
        self.preconditioner = preconditioner_of(self.optimizer)
        self._adaptive = config.optimizer in ADAPTIVE_OPTIMIZERS
        # with the MC Fisher, the preconditioner samples targets from each forward's outputs
        self._label_sampler = self.preconditioner if config.fisher == "mc" and config.optimizer in KFAC_FACTORS else None
        gradient_bytes = sum(p.numel() * p.element_size() for p in self.net.parameters() if p.requires_grad)
        self.traffic = TrafficLedger(self.preconditioner, gradient_bytes if self.placement.active else 0)
        self.progress = Progress()
        # batches (counted within the epoch) after which to evaluate, besides the epoch's end
        self._eval_batches = {i * self.steps_per_epoch // config.evals_per_epoch for i in range(1, config.evals_per_epoch)} - {0}
        # Schedules as callables of the step, built once (the loop reads them every step).
        self._lr = step_schedule(config.lr, self.steps_per_epoch)
        damped = config.optimizer in PRECONDITIONED and config.optimizer not in EIGENBASIS_ADAM
        self._damping = step_schedule(config.damping, self.steps_per_epoch) if damped else None
        # Called with the step number after the backward, before optimizer.step(): the raw
        # gradients are in .grad. Its time is excluded from training time (analysis, not training).
        self.after_backward: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        state = {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "progress": asdict(self.progress),
            "config": self.config.to_json(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.progress = Progress(**state["progress"])
        self.run_dir.truncate_metrics(after_step=self.progress.step)

    # ------------------------------------------------------------------ the loop

    @property
    def total_steps(self) -> int:
        """The steps the run takes in all: its epochs, cut at ``max_steps``."""
        total = self.config.epochs * self.steps_per_epoch
        return total if self.config.max_steps is None else min(total, self.config.max_steps)

    def environment(self) -> dict[str, Any]:
        """env.json's contents: versions, hardware, world size, and the data files read (path, SHA-256)."""
        files = [{"path": file.path, "sha256": file.sha256} for file in self.data.files]
        return {**environment(self.device), "world_size": self.placement.world_size, "data_files": files}

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train (or, with ``resume``, continue the run in the run directory) to the end.

        A fresh run writes config.json and env.json; a resume writes neither: it refuses a
        config other than the run's, except a longer one, and records itself in resumes.json
        (:mod:`rkfac.experiments.resume`).
        """
        config = self.config
        if resume:
            given = {field.name: getattr(config, field.name) for field in fields(config)}
            changes = check_resume(run_config(self.run_dir.path), given, where=self.run_dir.path)
            self.restore(self.run_dir.load_checkpoint())
            record_resume(
                self.run_dir, step=self.progress.step, epoch=self.progress.epoch, changes=changes, env=self.environment()
            )
        else:
            for stale in ("metrics.jsonl", RESUMES):  # of an earlier run in this directory
                if self.run_dir.writer:
                    (self.run_dir.path / stale).unlink(missing_ok=True)
            self.run_dir.write_json("config.json", config.to_json())
            self.run_dir.write_json("env.json", self.environment())
        total_steps = self.total_steps
        status = "completed"
        bar = tqdm(
            total=total_steps,
            initial=self.progress.step,
            disable=self.quiet or not self.placement.is_main,
            desc=config.optimizer,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            while self.progress.epoch < config.epochs and self.progress.step < total_steps:
                self._run_epoch(total_steps, bar)
            if self.progress.step >= total_steps and self.progress.epoch < config.epochs:
                status = "max_steps"
        except TrainingDivergedError:
            status = "diverged"
            bar.close()
            self._write_summary(status)
            raise
        bar.close()
        if config.checkpoint_every:
            self.run_dir.save_checkpoint(self.checkpoint_state())
        return self._write_summary(status)

    def _run_epoch(self, total_steps: int, bar: tqdm) -> None:
        config, progress = self.config, self.progress
        order = torch.randperm(
            len(self.train_images), generator=keyed_generator(torch.device("cpu"), config.seed, "order", progress.epoch)
        )
        order = order.to(self.device)
        records = []
        while progress.batch < self.steps_per_epoch and progress.step < total_steps:
            index = order[progress.batch * config.batch_size : (progress.batch + 1) * config.batch_size][self._shard]
            record = self._train_step(index)
            records.append(record)
            bar.update(1)
            if not math.isfinite(record["loss"]):
                self.run_dir.append_metrics(records)
                raise TrainingDivergedError(
                    f"training loss is {record['loss']} at step {record['step']} (epoch {progress.epoch + 1}); "
                    f"the last checkpoint in {self.run_dir.path} is intact. Lower --lr or raise --damping."
                )
            if progress.step % 20 == 0:
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            if progress.batch in self._eval_batches:
                records.append(self._evaluate_inside_epoch())
        self.run_dir.append_metrics(records)
        if progress.batch == self.steps_per_epoch:
            self._end_epoch(bar)

    def _train_step(self, index: Tensor) -> dict[str, Any]:
        config, progress = self.config, self.progress
        step = progress.step
        lr = _at(self._lr, step)
        if not self._adaptive:  # the adaptive step's group lr is its step scale s, which it sets itself
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        clock = StepClock(self.device)
        clock.start = clock.now()
        images, labels = self.train_images[index], self.train_labels[index]
        if self.data.augment is not None:
            images = self.data.augment(images, keyed_generator(self.device, config.seed, "augment", step))
        clock.data_done = clock.now()
        self.traffic.begin()
        self.optimizer.zero_grad(set_to_none=True)
        inputs, targets = self.task.batch(images, labels)
        outputs = self.model(inputs)
        if self._label_sampler is not None:
            self._label_sampler.sample_fisher(outputs)
        loss = self.task.loss(outputs, targets)
        loss.backward()
        clock.backward_done = clock.optimizer_start = clock.now()
        if self.after_backward is not None:
            self.after_backward(step)
            clock.optimizer_start = clock.now(synchronize=False)
        if self._adaptive:  # the adaptive step measures its quadratic model on this batch
            self.optimizer.step(inputs=inputs, targets=targets)  # type: ignore[call-overload]
        else:
            self.optimizer.step()
        clock.step_done = clock.now()

        traffic = self.traffic.end(progress.traffic)
        times = clock.split(self.timer.reset() if self.timer is not None else {})
        loss_value = mean_over_ranks(float(loss.detach()), self.placement, self.device)
        progress.add_step(loss_value, times, clock.elapsed())
        progress.step += 1
        progress.batch += 1
        damping = None if self._damping is None else _at(self._damping, step)
        if self._adaptive:  # what the adaptive step chose: α as the lr, λ as the damping, μ and ρ
            chosen = self.optimizer.adaptive.last  # type: ignore[attr-defined]
            record = metrics.step_record(step, progress.epoch + 1, loss_value, chosen.alpha, chosen.damping, times, traffic)
            return {**record, "mu": chosen.momentum, "rho": chosen.rho, "skipped": chosen.skipped, "scale": chosen.scale}
        return metrics.step_record(step, progress.epoch + 1, loss_value, lr, damping, times, traffic)

    def _evaluate(self) -> dict[str, float]:
        """The evaluation's values by name: ``test_loss``, and ``test_acc`` for a classifier,
        ``train_eval_loss`` (on the first TRAIN_EVAL_SAMPLES training images) when the run has
        training-loss targets or reconstructs. Rank 0 alone evaluates in a distributed run
        (the others get NaN for each)."""
        on_train = bool(self.config.target_loss) or isinstance(self.task, Reconstruction)
        names = [
            "test_loss",
            *(["test_acc"] if isinstance(self.task, Classification) else []),
            *(["train_eval_loss"] if on_train else []),
        ]
        if not self.placement.is_main:
            return dict.fromkeys(names, math.nan)
        test = self.task.evaluate(self.net, self.test_images, self.test_labels)
        values = {"test_loss": test["loss"], **({"test_acc": test["acc"]} if "acc" in test else {})}
        if on_train:
            subset = slice(0, TRAIN_EVAL_SAMPLES)
            values["train_eval_loss"] = self.task.evaluate(self.net, self.train_images[subset], self.train_labels[subset])["loss"]
        return values

    def _evaluate_inside_epoch(self) -> dict[str, Any]:
        evaluation = self._evaluate()
        epoch = self.progress.step / self.steps_per_epoch
        self.progress.note_targets(self.config.targets, evaluation, epoch)
        return metrics.eval_record(self.progress, epoch, evaluation)

    def _end_epoch(self, bar: tqdm) -> None:
        config, progress = self.config, self.progress
        evaluation = self._evaluate()
        epoch = progress.epoch + 1
        progress.note_targets(config.targets, evaluation, epoch)
        self.run_dir.append_metrics([metrics.epoch_record(progress, epoch, evaluation, self.preconditioner)])
        shown = {"test_acc": "acc", "train_eval_loss": "train"}
        postfix = {"loss": f"{progress.epoch_loss:.3f}", **{shown[k]: f"{v:.4f}" for k, v in evaluation.items() if k in shown}}
        bar.set_postfix(postfix)
        progress.start_epoch(epoch)
        if config.checkpoint_every and epoch % config.checkpoint_every == 0:
            self.run_dir.save_checkpoint(self.checkpoint_state())

    def _write_summary(self, status: str) -> dict[str, Any]:
        epochs = list(self.run_dir.metrics("epoch"))
        if epochs and epochs[-1]["step"] == self.progress.step:
            final: dict[str, float] = {
                name: epochs[-1][name] for name in ("test_loss", "test_acc", "train_eval_loss") if name in epochs[-1]
            }
        else:  # stopped inside an epoch (max_steps, divergence): evaluate where it stopped
            final = self._evaluate()
        summary = metrics.build_summary(
            self.progress,
            optimizer=self.config.optimizer,
            preset=self.config.preset,
            status=status,
            targets=self.config.targets,
            epochs=epochs,
            final=final,
            steps_per_epoch=self.steps_per_epoch,
            world_size=self.placement.world_size,
            pre=self.preconditioner,
            objective=_objective(final, status),
        )
        self.run_dir.write_json("summary.json", summary)
        return summary


def _objective(final: dict[str, float], status: str) -> float | None:
    """What tuning minimises: the final test error 1 − accuracy of a classifier, the final
    training-subset loss of a reconstruction; None (JSON null) for a diverged or non-finite run."""
    value = 1.0 - final["test_acc"] if "test_acc" in final else final.get("train_eval_loss", math.inf)
    return value if status != "diverged" and math.isfinite(value) else None


def _at(schedule: EpochSchedule | Callable[[int], float], step: int) -> float:
    return float(schedule(step) if callable(schedule) else schedule)  # type: ignore[arg-type]


def train(config: RunConfig, out: str | Path, *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) one training run into ``out``; returns the summary.

    Under torchrun the process group is created here and, after a barrier, destroyed when the
    run ends: leaving gloo's threads to interpreter shutdown aborted a rank now and then. After
    an error there is no barrier (the other ranks may never reach it): the process just exits.
    """
    trainer = Trainer(config, out, quiet=quiet)
    summary = trainer.run(resume=resume)
    if trainer.owns_process_group and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()
    return summary
