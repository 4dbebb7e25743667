"""Local client training: SGD/Adam over tensors in memory, with optional Gradient Restriction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one client's local training in one round."""

    epochs: int = 2
    lr: float = 0.1
    batch_size: int = 32
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    gr_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: must be one of {', '.join(OPTIMIZERS)}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.gr_alpha < 0:
            raise ValueError(f"invalid TrainSettings {self}: epochs >= 0, batch_size >= 1, lr > 0, gr_alpha >= 0")


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """The torch optimiser named by the settings."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def gradient_restricted_loss(model: nn.Module, loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """CE + alpha * sum of the L2 norms of the per-tensor gradients (IAU's GR penalty; needs double backprop)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    penalty = sum(g.norm(2) for g in grads)
    return loss + alpha * penalty


def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
) -> float:
    """Train `model` in place for `settings.epochs` epochs; returns the mean training loss.

    Mini-batches are slices of a permutation drawn from `generator`, so a run is
    reproducible from its seeds and no DataLoader is built per call.
    """
    if len(x) == 0:
        return float("nan")
    device = next(model.parameters()).device
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings)
    total_loss, batches = 0.0, 0
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            objective = gradient_restricted_loss(model, loss, settings.gr_alpha) if settings.gr_alpha > 0 else loss
            objective.backward()
            optimizer.step()
            total_loss += float(loss.detach())
            batches += 1
    return total_loss / max(batches, 1)
