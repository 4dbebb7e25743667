"""IAU-Fed math (ALGORITHMS.md section 4): the remaining/forget gradients and the correction step.

Symbols follow the paper: S is the forget set of client u, n the total number of training
examples, G_k a client's gradient SUM, g_r the remaining-data mean gradient, g_f the
forget-data mean gradient, d = g_r - g_f the direction, eta the step size, K the steps.
Everything here is torch tensors in and out; nothing knows about Flower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STEP_RULES = ("adam-first-step", "sgd")
PROTOCOLS = ("fresh", "cached")


@dataclass(frozen=True)
class IAUSettings:
    """Step size, number of steps and step rule of the IAU correction."""

    eta: float = 3e-3
    steps: int = 1
    step_rule: str = "adam-first-step"
    correction: bool = True  # False = gradient ascent only (the ablation baseline)

    def __post_init__(self) -> None:
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"step_rule={self.step_rule!r}: must be one of {', '.join(STEP_RULES)}")
        if not self.eta > 0:
            raise ValueError(f"eta={self.eta}: must be > 0 (typical 1e-3 .. 1e-2 for adam-first-step)")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be >= 1")


def remaining_contribution(gradient_sum: torch.Tensor, remaining_count: int) -> torch.Tensor:
    """What a remaining client k sends in the fresh protocol: G_k / (n - |S|)."""
    return gradient_sum.to(torch.float64) / remaining_count


def withdrawing_contribution(
    kept_sum: torch.Tensor | None,
    forget_sum: torch.Tensor,
    remaining_count: int,
    forget_count: int,
    correction: bool = True,
) -> torch.Tensor:
    """What client u sends: G_{u without S}/(n - |S|) - G_S/|S| (only -G_S/|S| without correction)."""
    out = -forget_sum.to(torch.float64) / forget_count
    if correction and kept_sum is not None:
        out = out + kept_sum.to(torch.float64) / remaining_count
    return out


def direction_from_parts(
    remaining_sum: torch.Tensor,
    remaining_count: int,
    forget_sum: torch.Tensor,
    forget_count: int,
    correction: bool = True,
) -> torch.Tensor:
    """d = g_r - g_f from the pooled sums (the single-process reference)."""
    if forget_count < 1:
        raise ValueError(f"forget_count={forget_count}: the forget set must not be empty")
    g_f = forget_sum.to(torch.float64) / forget_count
    if not correction:
        return -g_f
    if remaining_count < 1:
        raise ValueError(f"remaining_count={remaining_count}: nothing would remain after deletion")
    return remaining_sum.to(torch.float64) / remaining_count - g_f


def direction_from_total(
    total_sum: torch.Tensor, total_count: int, forget_sum: torch.Tensor, forget_count: int, correction: bool = True
) -> torch.Tensor:
    """Cached protocol: g_r = (G_tot - G_S) / (n - |S|), d = g_r - G_S/|S|."""
    return direction_from_parts(
        total_sum.to(torch.float64) - forget_sum.to(torch.float64), total_count - forget_count, forget_sum, forget_count, correction
    )


class CorrectionStepper:
    """Applies theta <- theta - eta * step(d); one instance per unlearning request.

    `adam-first-step` is a freshly created torch Adam(lr=eta), the reference code's rule: its
    first step moves every coordinate by about eta in the direction of -sign(d).
    """

    def __init__(self, theta: torch.Tensor, settings: IAUSettings) -> None:
        self.settings = settings
        self.theta = theta.detach().clone().to(torch.float64).requires_grad_(True)
        self._optimizer: torch.optim.Optimizer
        if settings.step_rule == "adam-first-step":
            self._optimizer = torch.optim.Adam([self.theta], lr=settings.eta)
        else:
            self._optimizer = torch.optim.SGD([self.theta], lr=settings.eta)

    def step(self, direction: torch.Tensor) -> torch.Tensor:
        """One step along -direction; returns the new parameters (float64, detached)."""
        if direction.shape != self.theta.shape:
            raise ValueError(f"direction has shape {tuple(direction.shape)}, parameters {tuple(self.theta.shape)}")
        if not torch.isfinite(direction).all():
            raise ValueError("direction has non-finite entries: a client sent NaN/inf or the forget set is empty")
        self._optimizer.zero_grad(set_to_none=True)
        self.theta.grad = direction.to(torch.float64).clone()
        self._optimizer.step()
        return self.theta.detach().clone()


def iau_update(theta: torch.Tensor, direction: torch.Tensor, settings: IAUSettings) -> torch.Tensor:
    """theta after K steps along the same direction d (the cached protocol, and the reference)."""
    stepper = CorrectionStepper(theta, settings)
    out = theta
    for _ in range(settings.steps):
        out = stepper.step(direction)
    return out.to(theta.dtype)
