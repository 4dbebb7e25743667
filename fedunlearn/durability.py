"""Does forgetting last? The relearning probe (arXiv 2406.17216: unlearning that hides rather than removes).

Fine-tune a model on the forget set itself and count the SGD steps until the removed behaviour is
back (the backdoor's success rate, or the forget set's accuracy, at a threshold). A model that got there
in fewer steps than the retrained model needs was suppressed, not cleaned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RelearnResult", "relearn_steps"]


@dataclass(frozen=True)
class RelearnResult:
    """Steps until `measure` reached `threshold` (None: not within `max_steps`), and the measure after each step."""

    steps: int | None
    threshold: float
    max_steps: int
    curve: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        """The JSON form (the curve is kept short: it is the evidence behind `steps`)."""
        return {
            "steps": self.steps,
            "threshold": self.threshold,
            "max_steps": self.max_steps,
            "reached": self.steps is not None,
            "curve": list(self.curve),
        }


def relearn_steps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    measure: Callable[[nn.Module], float],
    threshold: float,
    lr: float,
    batch_size: int,
    max_steps: int,
    momentum: float = 0.0,
    seed: int = 0,
) -> RelearnResult:
    """SGD on (x, y) from a copy of `model`, measuring after every step; 0 steps if it is already at the threshold.

    The batches are drawn from a generator seeded by `seed` alone, so every model sees the same batches.
    """
    if len(x) == 0:
        raise ValueError("relearn_steps needs a non-empty forget set")
    probe = copy.deepcopy(model)
    device = next(probe.parameters()).device
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    curve = [float(measure(probe))]
    if curve[0] >= threshold:
        return RelearnResult(0, threshold, max_steps, tuple(curve))
    order = torch.randperm(len(x), generator=generator)
    position = 0
    for step in range(1, max_steps + 1):
        if position >= len(order):
            order, position = torch.randperm(len(x), generator=generator), 0
        idx = order[position : position + batch_size]
        position += batch_size
        probe.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(probe(x[idx].to(device)), y[idx].to(device)).backward()
        optimizer.step()
        curve.append(float(measure(probe)))
        if curve[-1] >= threshold:
            return RelearnResult(step, threshold, max_steps, tuple(curve))
    return RelearnResult(None, threshold, max_steps, tuple(curve))
