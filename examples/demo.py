"""Quick demo: one MLP on Fashion-MNIST trained with SGD, exact K-FAC, RS-KFAC and SRE-KFAC.

Prints, per optimizer, the training time per epoch (evaluation excluded), the final training
loss and test accuracy, and each K-FAC variant's time ratio to exact K-FAC. It stands in for
the benchmark command until the ``rkfac`` CLI exists.

    python examples/demo.py [--width 1536] [--epochs 1] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac

DEFAULT_DIRS = [os.environ.get("RKFAC_DATA", ""), "/usr/share/datasets/fashion-mnist"]


def read_idx(path: Path) -> Tensor:
    """An IDX file (the MNIST format): magic, dims as big-endian int32, then uint8 data."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(data_dir: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    for folder in [data_dir, *DEFAULT_DIRS]:
        if folder and (Path(folder) / "train-images-idx3-ubyte.gz").exists():
            root = Path(folder)
            break
    else:
        raise SystemExit("Fashion-MNIST not found: run `make data` or pass --data-dir")
    images = [read_idx(root / f"{split}-images-idx3-ubyte.gz").float().div(255).flatten(1) for split in ("train", "t10k")]
    labels = [read_idx(root / f"{split}-labels-idx1-ubyte.gz").long() for split in ("train", "t10k")]
    mean, std = images[0].mean(), images[0].std()
    return (images[0] - mean) / std, labels[0], (images[1] - mean) / std, labels[1]


def make_model(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    decomposition = {
        "kfac": rkfac.ExactEigh(),
        "rs-kfac": rkfac.RandomizedSVD(rank=220, oversample=10, power_iters=4),
        "sre-kfac": rkfac.SymmetricRandomizedEVD(rank=220, oversample=10, power_iters=4),
    }[name]
    return rkfac.KFAC(model, lr=0.1, damping=0.1, decomposition=decomposition, factor_every=10, inverse_every=50)


def run(name: str, data: tuple[Tensor, ...], width: int, epochs: int, batch: int, seed: int) -> dict[str, float]:
    x_train, y_train, x_test, y_test = data
    model = make_model(width, seed)
    optimizer = make_optimizer(name, model)
    order = torch.Generator().manual_seed(seed)
    train_time, loss = 0.0, float("nan")
    for _ in range(epochs):
        model.train()
        permutation = torch.randperm(len(x_train), generator=order)
        start = time.perf_counter()
        for first in range(0, len(x_train) - batch + 1, batch):
            index = permutation[first : first + batch]
            optimizer.zero_grad()
            loss_tensor = F.cross_entropy(model(x_train[index]), y_train[index])
            loss_tensor.backward()
            optimizer.step()
            loss = loss_tensor.item()
        train_time += time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return {"seconds_per_epoch": train_time / epochs, "loss": loss, "test_accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--optimizers", default="sgd,kfac,rs-kfac,sre-kfac")
    args = parser.parse_args()
    data = load_fashion_mnist(args.data_dir)
    print(
        f"Fashion-MNIST MLP 784-{args.width}-{args.width}-10, batch {args.batch_size}, {args.epochs} epoch(s), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = {}
    for name in args.optimizers.split(","):
        results[name] = run(name, data, args.width, args.epochs, args.batch_size, args.seed)
        r = results[name]
        print(
            f"  {name:9s} {r['seconds_per_epoch']:7.1f} s/epoch  loss {r['loss']:.3f}  test acc {100 * r['test_accuracy']:.2f}%",
            flush=True,
        )
    if "kfac" in results:
        exact = results["kfac"]["seconds_per_epoch"]
        for name in ("rs-kfac", "sre-kfac"):
            if name in results:
                print(f"  exact K-FAC time per epoch / {name} = {exact / results[name]['seconds_per_epoch']:.2f}x")


if __name__ == "__main__":
    main()
