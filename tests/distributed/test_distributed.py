"""Data-parallel K-FAC on 2 gloo processes against one process over the concatenated batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rkfac
from rkfac.experiments.cli import main
from rkfac.experiments.rundir import RunDirectory
from tests.gloo import run_ranks

GLOBAL_BATCH = 12
STEPS = 5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double()


DECOMPOSED: list[int] = []  # factor widths decomposed in this process


class CountingEigh(rkfac.ExactEigh):
    def decompose(self, factor, generator, step):  # type: ignore[no-untyped-def]
        DECOMPOSED.append(factor.shape[0])
        return super().decompose(factor, generator, step)


class CountingSRE(rkfac.SymmetricRandomizedEVD):
    def decompose(self, factor, generator, step):  # type: ignore[no-untyped-def]
        DECOMPOSED.append(factor.shape[0])
        return super().decompose(factor, generator, step)


def make_decomposition(name: str) -> rkfac.Decomposition:
    if name == "brand":  # batch 6 per rank, 12 global: fc1's factors (101, 16) and fc2's A (17) go online
        return rkfac.BrandUpdate(rank=6, fallback=CountingSRE(rank=6, oversample=2, power_iters=2))
    if name == "exact":
        return CountingEigh()
    return CountingSRE(rank=6, oversample=2, power_iters=2)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 2, 5, 5, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def train(model: nn.Module, decomposition: str, rank: int, world_size: int) -> torch.optim.Optimizer:
    optimizer: torch.optim.Optimizer
    if decomposition == "seng":  # sketched (16·101 > 50): sampled columns and rank-2 conv maps
        optimizer = rkfac.SENG(model, lr=0.1, update_freq=2, sketch_threshold=50, col_sample_size=5, sketch_rank=2)
    elif decomposition == "sre-soap":  # Adam in the SRE bases: computed from the averaged gradient on every rank
        optimizer = rkfac.LowRankSOAP(model, lr=0.01, decomposition=make_decomposition("sre"), factor_every=1, inverse_every=2)
    elif decomposition == "sre-ekfac":  # the measured scales: all-reduced with the statistics
        optimizer = rkfac.LowRankEKFAC(
            model, lr=0.1, momentum=0.5, decomposition=make_decomposition("sre"), factor_every=1, inverse_every=2
        )
    else:
        optimizer = rkfac.KFAC(
            model, lr=0.1, momentum=0.5, decomposition=make_decomposition(decomposition), factor_every=1, inverse_every=2
        )
    share = GLOBAL_BATCH // world_size
    for x, y in batches():
        optimizer.zero_grad()
        part = slice(rank * share, (rank + 1) * share)
        F.cross_entropy(model(x[part]), y[part]).backward()
        optimizer.step()
    return optimizer


def _worker(rank: int, world_size: int, decomposition: str) -> dict:
    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = train(model, decomposition, rank, world_size)
    params = [p.detach().clone() for p in model.module.parameters()]
    return {"params": params, "traffic": optimizer.preconditioner.traffic, "decomposed": DECOMPOSED}  # type: ignore[attr-defined]


@pytest.mark.parametrize("decomposition", ["exact", "sre", "seng", "brand", "sre-soap", "sre-ekfac"])
def test_two_ranks_match_one_process_over_the_global_batch(tmp_path: Path, decomposition: str):
    ranks = run_ranks(_worker, 2, tmp_path, decomposition)
    for mine, theirs in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(mine, theirs)  # identical on both ranks, bit for bit

    if decomposition in ("seng", "brand", "sre-soap", "sre-ekfac"):
        single = make_model()
        train(single, decomposition, rank=0, world_size=1)
        # The all-reduce sums the gradient in another order than one process does (≈ 1e-16
        # relative); Adam's 1/√v divides that rounding by the root of a near-null mode's moment
        # (the output layer's G has rows summing to zero), so sre-soap agrees to about 1e-9 of the
        # entry (measured: 1.6e-9 on one bias), where seng and brand stay within 1e-9.
        rtol = 1e-8 if decomposition == "sre-soap" else 1e-9
        for distributed, alone in zip(ranks[0]["params"], single.parameters(), strict=True):
            torch.testing.assert_close(distributed, alone.detach(), rtol=rtol, atol=1e-11)
        assert ranks[0]["traffic"].statistics_bytes > 0
        return
    # the work was split: each factor decomposed by one rank per round, the big one alone
    decomposed = [sorted(result["decomposed"]) for result in ranks]
    assert sorted(decomposed[0] + decomposed[1]) == sorted(3 * [19, 4, 101, 16, 17, 3])
    assert all(decomposed) and (101 in decomposed[0]) != (101 in decomposed[1])

    single = make_model()
    single_optimizer = train(single, decomposition, rank=0, world_size=1)
    for distributed, alone in zip(ranks[0]["params"], single.parameters(), strict=True):
        torch.testing.assert_close(distributed, alone.detach(), rtol=1e-9, atol=1e-11)
    assert single_optimizer.preconditioner.traffic.statistics_bytes == 0  # type: ignore[attr-defined]

    # statistics: every factor's upper triangle, float64, on each of the 5 factor steps
    dims = [2 * 9 + 1, 4, 100 + 1, 16, 16 + 1, 3]
    assert ranks[0]["traffic"].statistics_bytes == STEPS * 8 * sum(d * (d + 1) // 2 for d in dims)
    # decompositions: each pair (d·k + k + 2 float64 numbers, and its k as an int64) once per
    # inverse round (steps 0, 2, 4), whoever owns it
    keep = [d if decomposition == "exact" else min(6, d) for d in dims]
    per_round = sum(8 * (d * k + k + 2) + 8 for d, k in zip(dims, keep, strict=True))
    assert ranks[0]["traffic"].decomposition_bytes == ranks[1]["traffic"].decomposition_bytes == 3 * per_round


def test_the_command_under_torchrun_matches_one_process(tmp_path: Path):
    common = [
        "train", "--optimizer", "sre-kfac", "--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32",
        "--model", "mlp", "--widths", "24", "--batch-size", "16", "--epochs", "2", "--rank", "8", "--oversample", "2",
        "--factor-every", "1", "--inverse-every", "2", "--quiet",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rkfac"]
    subprocess.run([*run, *common, "--out", str(tmp_path / "two")], check=True, env=environment, timeout=300)
    assert main([*common, "--out", str(tmp_path / "one")]) == 0

    two = RunDirectory(tmp_path / "two").load_checkpoint()["model"]
    one = RunDirectory(tmp_path / "one").load_checkpoint()["model"]
    for key, tensor in one.items():
        torch.testing.assert_close(two[key], tensor, rtol=1e-4, atol=1e-5)
    steps = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in steps if record["kind"] == "step"]
    assert len(steps) == 8  # rank 0 alone wrote: one record per step
    assert all(record["bytes"]["statistics"] > 0 and record["bytes"]["gradients"] > 0 for record in steps)
    assert [record["bytes"]["decomposition"] > 0 for record in steps] == [step % 2 == 0 for step in range(8)]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["bytes_per_inverse_step"] > 0


class TokenModel(nn.Module):
    """An embedding (diagonal A, averaged across ranks as a vector) and a Linear over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(1))


def _inputs(model: str, generator: torch.Generator) -> torch.Tensor:
    if model == "tokens":
        return torch.randint(0, 9, (GLOBAL_BATCH, 5), generator=generator)
    return torch.randn(GLOBAL_BATCH, 5, 8, generator=generator, dtype=torch.float64)


def _train_sequence_model(rank: int, world_size: int, model: str, method: str = "kfac") -> dict[str, torch.Tensor]:
    """Three steps of K-FAC ("kfac") or the EKFAC form ("ekfac": its measured scales, an
    embedding's by token, all-reduced with the statistics) on TokenModel ("tokens") or
    AttentionModel ("attention"), on this rank's share."""
    torch.manual_seed(0)
    net = (TokenModel() if model == "tokens" else AttentionModel()).double()
    wrapped = nn.parallel.DistributedDataParallel(net) if world_size > 1 else net
    kind = rkfac.LowRankEKFAC if method == "ekfac" else rkfac.KFAC
    optimizer = kind(wrapped, lr=0.1, factor_every=1, inverse_every=2)
    generator = torch.Generator().manual_seed(2)
    share = GLOBAL_BATCH // world_size
    for _ in range(3):
        inputs, labels = _inputs(model, generator), torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)
        optimizer.zero_grad()
        part = slice(rank * share, (rank + 1) * share)
        F.cross_entropy(wrapped(inputs[part]), labels[part]).backward()
        optimizer.step()
    if method == "ekfac":  # the embedding's scales were measured (not K-FAC's products carried along)
        assert "embed" in optimizer._rule.layers  # type: ignore[attr-defined]
    return {name: p.detach().clone() for name, p in net.state_dict().items()}


class AttentionModel(nn.Module):
    """A routed nn.MultiheadAttention (four projection blocks, q/k/v rows of one packed weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.attn(x, x, x, need_weights=False)[0]).mean(1))


@pytest.mark.parametrize(("model", "method"), [("tokens", "kfac"), ("attention", "kfac"), ("tokens", "ekfac")])
def test_sequence_models_on_two_ranks_match_one_process(tmp_path: Path, model: str, method: str) -> None:
    """An embedding (diagonal A, averaged across ranks as a vector) and a routed attention (q/k/v
    rows of one packed weight, sharded like any other layer)."""
    one = _train_sequence_model(0, 1, model, method)
    ranks = run_ranks(_train_sequence_model, 2, tmp_path, model, method)
    for name, value in one.items():
        torch.testing.assert_close(ranks[0][name], value)
        assert torch.equal(ranks[0][name], ranks[1][name])
