"""Flat parameter vectors and sums of per-example gradients (the raw material of every cache)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a model's trainable parameters, in order; maps between dicts and flat vectors."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        """Layout of the trainable parameters of `model`."""
        named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(s for _, s in named))

    @property
    def numel(self) -> int:
        """Total number of scalars P."""
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the named tensors into one flat float vector (float64 kept if given)."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"tensors lack parameter(s) {missing[:3]}: expected the keys of the model's named_parameters()")
        return torch.cat([torch.as_tensor(tensors[n]).reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector back into named tensors of the right shapes."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat vector has {flat.numel()} entries, the model has {self.numel} parameters")
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape))
            out[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return out


def model_vector(model: nn.Module) -> torch.Tensor:
    """The model's trainable parameters as one flat detached CPU vector."""
    layout = ParamLayout.of(model)
    params = dict(model.named_parameters())
    return layout.flatten({n: params[n].detach().cpu() for n in layout.names})


def load_model_vector(model: nn.Module, flat: torch.Tensor) -> None:
    """Write a flat vector into the model's trainable parameters, in place."""
    layout = ParamLayout.of(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in layout.unflatten(flat).items():
            params[name].copy_(value.to(params[name].dtype))


def gradient_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, float, int]:
    """SUM over examples of grad CE(z, theta), as a flat float64 CPU vector, plus (summed loss, correct count).

    Computed in eval mode with no augmentation, as the caches are defined (ALGORITHMS.md section 3).
    Summing per-batch `reduction="sum"` losses gives exactly the sum of per-example gradients.
    The loss and the correct count come from the same forward pass, which is why a final
    evaluation can fill the cache without an extra pass over the data.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, reduction="sum")
            grads = torch.autograd.grad(loss, params)
            for acc, g in zip(total, grads, strict=True):
                acc += g.to(torch.float64)
            loss_sum += float(loss.detach())
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    flat = torch.cat([t.reshape(-1) for t in total]).cpu()
    return flat, loss_sum, correct
