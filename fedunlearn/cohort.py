"""Local training of a cohort of clients as one vectorised computation (torch.func), equal to training them in turn.

`cohort_local_train` trains K clients that start from the same parameters, each on its own data
with its own torch.Generator, and returns what `fedunlearn.training.local_train` would have left
in the model for each of them (up to float rounding). The batch schedule is local_train's
exactly: per epoch one `torch.randperm(len(x), generator=g)`, then slices of `batch_size`.
Clients hold different numbers of examples, so every client's step list is padded to the
longest and every batch to `batch_size` with a mask: the masked mean loss is the unpadded mean,
and a padded step changes neither the parameters nor the optimiser state.

The optimisers follow torch.optim's update rules: SGD with momentum and weight decay (the first
step sets the momentum buffer to the gradient, dampening 0, no Nesterov) and Adam (betas 0.9,
0.999, eps 1e-8, L2 weight decay, no amsgrad). Gradient Restriction (`gr_alpha > 0`) adds
alpha * sum over tensors of ||grad||_2 to the loss and differentiates through it (nested grad).

Models with buffers or with modules whose training behaviour differs per call (BatchNorm,
dropout: resnet18 has BatchNorm) are trained one client after another with local_train instead:
the same results, just not vectorised (`is_vectorisable` says which path a model takes).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap
from torch.nn import functional as F

from .training import TrainSettings, local_train

__all__ = ["CohortResult", "cohort_local_train", "is_vectorisable", "DEFAULT_CHUNK_SIZE"]

# Clients trained in one vmap: bounds memory (each client adds its parameters, gradients, optimiser state and activations).
DEFAULT_CHUNK_SIZE = 64
# torch.optim.Adam's defaults (TrainSettings does not expose them).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class CohortResult:
    """Per client, in input order: its trained state dict and its mean training loss (nan without data)."""

    states: list[OrderedDict[str, torch.Tensor]]
    losses: list[float]
    vectorised: bool


def is_vectorisable(model: nn.Module) -> bool:
    """True when the model trains as a pure function of its parameters (no buffers, no BatchNorm/dropout)."""
    if any(True for _ in model.buffers()):
        return False
    if any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)) for m in model.modules()):
        return False
    named = dict(model.named_parameters())
    return set(model.state_dict()) == set(named)  # no tied or unregistered tensors


def cohort_local_train(
    model: nn.Module,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    settings: TrainSettings,
    generators: Sequence[torch.Generator],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> CohortResult:
    """Train one client per (x, y, generator) from `model`'s current parameters; `model` itself is left unchanged."""
    if not len(xs) == len(ys) == len(generators):
        raise ValueError(
            f"cohort_local_train: {len(xs)} inputs, {len(ys)} label sets and {len(generators)} generators: give one of each per client"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (clients trained in one vectorised call)")
    if not is_vectorisable(model):
        return _sequential(model, xs, ys, settings, generators)
    states: list[OrderedDict[str, torch.Tensor]] = []
    losses: list[float] = []
    for start in range(0, len(xs), chunk_size):
        end = start + chunk_size
        chunk_states, chunk_losses = _train_chunk(model, xs[start:end], ys[start:end], settings, generators[start:end])
        states.extend(chunk_states)
        losses.extend(chunk_losses)
    return CohortResult(states, losses, vectorised=True)


def _sequential(
    model: nn.Module, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], settings: TrainSettings, generators: Sequence[torch.Generator]
) -> CohortResult:
    """local_train for each client in turn, each from the same starting parameters."""
    initial = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    states, losses = [], []
    for x, y, generator in zip(xs, ys, generators, strict=True):
        model.load_state_dict(initial, strict=True)
        losses.append(local_train(model, x, y, settings, generator))
        states.append(OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items()))
    model.load_state_dict(initial, strict=True)
    return CohortResult(states, losses, vectorised=False)


def _schedule(n: int, settings: TrainSettings, generator: torch.Generator) -> list[torch.Tensor]:
    """local_train's mini-batches for a client with n examples: index tensors, in order (consumes `generator` alike)."""
    if n == 0:
        return []
    batches: list[torch.Tensor] = []
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        batches.extend(order[start : start + settings.batch_size] for start in range(0, n, settings.batch_size))
    return batches


def _train_chunk(
    model: nn.Module, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], settings: TrainSettings, generators: Sequence[torch.Generator]
) -> tuple[list[OrderedDict[str, torch.Tensor]], list[float]]:
    device = next(model.parameters()).device
    k_clients = len(xs)
    batch = settings.batch_size
    schedules = [_schedule(len(x), settings, g) for x, g in zip(xs, generators, strict=True)]
    steps = max((len(s) for s in schedules), default=0)
    n_max = max((len(x) for x in xs), default=0)

    # Padded data [K, n_max, ...] and the per-step index/mask tables [S, K, B]; padding points at example 0 with mask 0.
    sample_shape = next((tuple(x.shape[1:]) for x in xs if len(x)), tuple(xs[0].shape[1:]))
    dtype = next((x.dtype for x in xs if len(x)), torch.float32)
    data_x = torch.zeros((k_clients, max(n_max, 1), *sample_shape), dtype=dtype, device=device)
    data_y = torch.zeros((k_clients, max(n_max, 1)), dtype=torch.long, device=device)
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if len(x):
            data_x[k, : len(x)] = x.to(device)
            data_y[k, : len(y)] = y.to(device)
    index = torch.zeros((steps, k_clients, batch), dtype=torch.long)
    mask = torch.zeros((steps, k_clients, batch), dtype=data_x.dtype if data_x.is_floating_point() else torch.float32)
    for k, schedule in enumerate(schedules):
        for s, idx in enumerate(schedule):
            index[s, k, : len(idx)] = idx
            mask[s, k, : len(idx)] = 1.0
    index, mask = index.to(device), mask.to(device)
    active_steps = torch.tensor([len(s) for s in schedules], device=device)

    trainable = OrderedDict((n, p.detach()) for n, p in model.named_parameters() if p.requires_grad)
    frozen = OrderedDict((n, p.detach()) for n, p in model.named_parameters() if not p.requires_grad)
    params = OrderedDict((n, p.unsqueeze(0).expand(k_clients, *p.shape).clone()) for n, p in trainable.items())

    def batch_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**p, **frozen}, (x,))
        return (F.cross_entropy(logits, y, reduction="none") * m).sum() / m.sum().clamp_min(1.0)

    if settings.gr_alpha > 0:
        alpha = settings.gr_alpha

        def objective(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            inner, loss = grad_and_value(batch_loss)(p, x, y, m)
            penalty = sum(g.norm(2) for g in inner.values())
            return loss + alpha * penalty, loss

        gradients = vmap(grad(objective, has_aux=True))
    else:
        gradients = vmap(grad_and_value(batch_loss))

    momentum, weight_decay, lr = settings.momentum, settings.weight_decay, settings.lr
    first_moment = {n: torch.zeros_like(p) for n, p in params.items()}
    second_moment = {n: torch.zeros_like(p) for n, p in params.items()} if settings.optimizer == "adam" else {}
    loss_sum = torch.zeros(k_clients, dtype=torch.float64, device=device)
    rows = torch.arange(k_clients, device=device).unsqueeze(1)
    was_training = model.training
    model.train()
    try:
        for s in range(steps):
            active = active_steps > s  # padded steps lie at the tail of each client's list
            xb, yb = data_x[rows, index[s]], data_y[rows, index[s]]
            grads, loss = gradients(params, xb, yb, mask[s])
            loss_sum += torch.where(active, loss.detach().to(torch.float64), 0.0)
            for name, p in params.items():
                keep = active.view(-1, *([1] * (p.dim() - 1)))
                g = grads[name]
                if weight_decay != 0:
                    g = g + weight_decay * p
                if settings.optimizer == "adam":
                    t = s + 1  # every active client is at its (s+1)-th step: padding only trails
                    m1 = torch.where(keep, first_moment[name].lerp(g, 1 - ADAM_BETAS[0]), first_moment[name])
                    m2 = torch.where(keep, second_moment[name] * ADAM_BETAS[1] + (1 - ADAM_BETAS[1]) * g * g, second_moment[name])
                    first_moment[name], second_moment[name] = m1, m2
                    step_size = lr / (1 - ADAM_BETAS[0] ** t)
                    denom = m2.sqrt() / math.sqrt(1 - ADAM_BETAS[1] ** t) + ADAM_EPS
                    update = step_size * m1 / denom
                else:
                    if momentum != 0:
                        buffer = g if s == 0 else momentum * first_moment[name] + g  # torch.optim.SGD: first buffer = g
                        first_moment[name] = torch.where(keep, buffer, first_moment[name])
                        g = buffer
                    update = lr * g
                params[name] = torch.where(keep, p - update, p)
    finally:
        model.train(was_training)
    counts = active_steps.clamp_min(1).to(torch.float64)
    mean_losses = (loss_sum / counts).tolist()
    losses = [float("nan") if len(x) == 0 else loss for x, loss in zip(xs, mean_losses, strict=True)]
    names = list(model.state_dict())
    states = []
    for k in range(k_clients):
        state = OrderedDict()
        for name in names:
            state[name] = params[name][k].clone() if name in params else frozen[name].clone()
        states.append(state)
    return states, losses
