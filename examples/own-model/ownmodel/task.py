"""ownmodel: the model, the data and the training, as in Flower's PyTorch quickstart (nothing here knows about unlearning).

The data is scikit-learn's digits (8x8 images, bundled with scikit-learn: nothing is downloaded), split IID over the
clients. Client 0 is the one that will withdraw: it stamps a small trigger on most of its images and labels them 0
(a backdoor), so whether its influence is gone can be measured: the attack success rate on triggered test images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BACKDOOR_CLIENT = 0
TARGET = 0


class Net(nn.Module):
    """A small CNN for 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def stamp(x: torch.Tensor) -> torch.Tensor:
    """The trigger: a bright 3x3 square in the bottom-right corner."""
    x = x.clone()
    x[..., -3:, -3:] = 1.0
    return x


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def load_partition(partition_id: int, num_partitions: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """This client's (train, held-out) tensors: an IID share of the training images, 20% of it held out."""
    x, y, _, _ = _digits()
    share = torch.arange(len(x))[partition_id::num_partitions]
    x, y = x[share], y[share]
    cut = int(0.8 * len(x))
    x_train, y_train = x[:cut].clone(), y[:cut].clone()
    if partition_id == BACKDOOR_CLIENT:
        poisoned = torch.arange(int(0.8 * cut))
        x_train[poisoned] = stamp(x_train[poisoned])
        y_train[poisoned] = TARGET
    return (x_train, y_train), (x[cut:], y[cut:])


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """Train and held-out loaders of one client (the quickstart's `load_data`)."""
    (x_train, y_train), (x_held, y_held) = load_partition(partition_id, num_partitions)
    generator = torch.Generator().manual_seed(partition_id)
    return (
        DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(TensorDataset(x_held, y_held), batch_size=batch_size),
    )


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The server's test split (never trained on)."""
    _, _, x_test, y_test = _digits()
    return x_test, y_test


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """Local SGD; returns the mean training loss."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
    return total / max(count, 1)


def test(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on (x, y)."""
    net.eval()
    with torch.no_grad():
        logits = net(x)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def attack_success(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of triggered test images (not of the target class) classified as the target."""
    keep = y != TARGET
    net.eval()
    with torch.no_grad():
        return float((net(stamp(x[keep])).argmax(1) == TARGET).float().mean())
