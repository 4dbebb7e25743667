"""IAU-Fed math (ALGORITHMS.md section 4): the remaining/forget gradients and the correction step.

Symbols follow the paper: S is the forget set of client u, n the total number of training
examples, G_k a client's gradient SUM, g_r the remaining-data mean gradient, g_f the
forget-data mean gradient, d = g_r - g_f the direction, eta the step size, K the steps.
Everything here is torch tensors in and out; nothing knows about Flower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PROTOCOLS = ("fresh", "cached")
CALIBRATIONS = ("off", "heldout-loss")


@dataclass(frozen=True)
class IAUSettings:
    """The IAU correction: step rule and its size, steps K, weight lambda on g_r, and who chooses the step length.

    d = lambda * g_r - g_f. `eta` is the step size of `sgd` and `adam-first-step`; `radius` is the
    length of each `normalised` step as a fraction of ||theta|| (a relative trust region: the same
    fraction means the same relative change of any model, where an absolute length would not
    transfer between architectures). `calibrate='heldout-loss'` lets the withdrawing client choose the
    first step's length from its own data (`choose_radius`).
    """

    # Defaults: the best measured variant of docs/reports/iau-ablation.md over six presets x three seeds (two normalised
    # steps of 4% of ||theta||, lambda 3; the runner adds one FedAvg repair round for the fresh protocol).
    eta: float = 0.045
    steps: int = 2
    step_rule: str = "normalised"
    correction: bool = True  # False = gradient ascent only (the ablation baseline)
    radius: float = 0.04
    correction_weight: float = 3.0
    per_layer: bool = False
    calibrate: str = "off"
    refresh_every: int = 0  # cached protocol: refresh g_r with a fresh round every k steps (0 = never: the cache's g_r)

    def __post_init__(self) -> None:
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"step_rule={self.step_rule!r}: must be one of {', '.join(STEP_RULES)}")
        if not self.eta > 0:
            raise ValueError(f"eta={self.eta}: must be > 0 (typical 1e-3 .. 1e-2 for adam-first-step)")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be >= 1")
        if not self.radius > 0:
            raise ValueError(f"radius={self.radius}: must be > 0 (a fraction of ||theta||, e.g. 0.02)")
        if not self.correction_weight >= 0:
            raise ValueError(f"correction_weight={self.correction_weight}: must be >= 0")
        if self.calibrate not in CALIBRATIONS:
            raise ValueError(f"calibrate={self.calibrate!r}: must be one of {', '.join(CALIBRATIONS)}")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every={self.refresh_every}: must be >= 0 (0 = never)")


class StepRule:
    """One rule theta -> theta_new given the direction d (the update moves along -d); one instance per request."""

    def __init__(self, theta: torch.Tensor, settings: IAUSettings, segments: tuple[int, ...] | None = None) -> None:
        self.settings = settings
        self.segments = segments

    def step(self, theta: torch.Tensor, direction: torch.Tensor, length: float | None = None) -> torch.Tensor:
        """The new parameters (float64); `length` overrides a normalised rule's step length (a calibrated one)."""
        raise NotImplementedError


STEP_RULES: dict[str, type[StepRule]] = {}


def register_step_rule(name: str) -> Callable[[type[StepRule]], type[StepRule]]:
    """Class decorator adding a step rule under `name` (what --iau-step-rule accepts)."""

    def add(cls: type[StepRule]) -> type[StepRule]:
        if name in STEP_RULES:
            raise ValueError(f"step rule {name!r} is registered twice")
        STEP_RULES[name] = cls
        return cls

    return add


@register_step_rule("sgd")
class SGDStep(StepRule):
    """theta - eta * d."""

    def step(self, theta: torch.Tensor, direction: torch.Tensor, length: float | None = None) -> torch.Tensor:
        """theta - eta d."""
        return theta.to(torch.float64) - self.settings.eta * direction.to(torch.float64)


@register_step_rule("adam-first-step")
class AdamFirstStep(StepRule):
    """The reference code's rule: a torch Adam(lr = eta) created for the request; its first step is about -eta * sign(d)."""

    def __init__(self, theta: torch.Tensor, settings: IAUSettings, segments: tuple[int, ...] | None = None) -> None:
        super().__init__(theta, settings, segments)
        self.theta = theta.detach().clone().to(torch.float64).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.theta], lr=settings.eta)

    def step(self, theta: torch.Tensor, direction: torch.Tensor, length: float | None = None) -> torch.Tensor:
        """One step of the request's Adam with d as the gradient."""
        with torch.no_grad():
            self.theta.copy_(theta.to(torch.float64))
        self.optimizer.zero_grad(set_to_none=True)
        self.theta.grad = direction.to(torch.float64).clone()
        self.optimizer.step()
        return self.theta.detach().clone()


@register_step_rule("normalised")
class NormalisedStep(StepRule):
    """theta - rho ||theta|| d / ||d|| (a step of fixed relative length); per layer: each layer's slice normalised alone,
    weighted so that the whole step still has length rho ||theta|| (layer l moves by rho ||theta|| sqrt(P_l / P))."""

    def step(self, theta: torch.Tensor, direction: torch.Tensor, length: float | None = None) -> torch.Tensor:
        """theta moved by the relative length along -d (whole, or layer by layer)."""
        theta = theta.to(torch.float64)
        d = direction.to(torch.float64)
        size = (self.settings.radius if length is None else length) * float(theta.norm())
        if not self.settings.per_layer or not self.segments:
            return theta - size * d / d.norm().clamp_min(1e-300)
        out, offset, total = theta.clone(), 0, float(theta.numel())
        for count in self.segments:
            part = d[offset : offset + count]
            out[offset : offset + count] -= size * (count / total) ** 0.5 * part / part.norm().clamp_min(1e-300)
            offset += count
        return out


def remaining_contribution(gradient_sum: torch.Tensor, remaining_count: int, weight: float = 1.0) -> torch.Tensor:
    """What a remaining client k sends in the fresh protocol: lambda G_k / (n - |S|)."""
    return weight * gradient_sum.to(torch.float64) / remaining_count


def withdrawing_contribution(
    kept_sum: torch.Tensor | None,
    forget_sum: torch.Tensor,
    remaining_count: int,
    forget_count: int,
    correction: bool = True,
    weight: float = 1.0,
) -> torch.Tensor:
    """What client u sends: lambda G_{u without S}/(n - |S|) - G_S/|S| (only -G_S/|S| without correction)."""
    out = -forget_sum.to(torch.float64) / forget_count
    if correction and kept_sum is not None:
        out = out + weight * kept_sum.to(torch.float64) / remaining_count
    return out


def direction_from_parts(
    remaining_sum: torch.Tensor,
    remaining_count: int,
    forget_sum: torch.Tensor,
    forget_count: int,
    correction: bool = True,
    weight: float = 1.0,
) -> torch.Tensor:
    """d = lambda g_r - g_f from the pooled sums."""
    if forget_count < 1:
        raise ValueError(f"forget_count={forget_count}: the forget set must not be empty")
    g_f = forget_sum.to(torch.float64) / forget_count
    if not correction:
        return -g_f
    if remaining_count < 1:
        raise ValueError(f"remaining_count={remaining_count}: nothing would remain after deletion")
    return weight * remaining_sum.to(torch.float64) / remaining_count - g_f


def direction_from_total(
    total_sum: torch.Tensor, total_count: int, forget_sum: torch.Tensor, forget_count: int, correction: bool = True, weight: float = 1.0
) -> torch.Tensor:
    """Cached protocol: g_r = (G_tot - G_S) / (n - |S|), d = lambda g_r - G_S/|S|."""
    return direction_from_parts(
        total_sum.to(torch.float64) - forget_sum.to(torch.float64), total_count - forget_count, forget_sum, forget_count, correction, weight
    )


class CorrectionStepper:
    """Applies the configured step rule to theta, request after step; one instance per unlearning request."""

    def __init__(self, theta: torch.Tensor, settings: IAUSettings, segments: tuple[int, ...] | None = None) -> None:
        self.settings = settings
        self.theta = theta.detach().clone().to(torch.float64)
        self.rule = STEP_RULES[settings.step_rule](self.theta, settings, segments)
        self.length: float | None = None  # a calibrated step length (normalised rule), once chosen

    def step(self, direction: torch.Tensor) -> torch.Tensor:
        """One step along -direction; returns the new parameters (float64, detached)."""
        if direction.shape != self.theta.shape:
            raise ValueError(f"direction has shape {tuple(direction.shape)}, parameters {tuple(self.theta.shape)}")
        if not torch.isfinite(direction).all():
            raise ValueError("direction has non-finite entries: a client sent NaN/inf or the forget set is empty")
        self.theta = self.rule.step(self.theta, direction, self.length).detach().clone()
        return self.theta.clone()


def iau_update(theta: torch.Tensor, direction: torch.Tensor, settings: IAUSettings) -> torch.Tensor:
    """theta after K steps along the same direction d (the single-step cached protocol, and a reference)."""
    stepper = CorrectionStepper(theta, settings)
    out = theta
    for _ in range(settings.steps):
        out = stepper.step(direction)
    return out.to(theta.dtype)


def choose_radius(
    loss_after: Callable[[float], tuple[float, float]], grid: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08)
) -> tuple[float, list[dict[str, float]]]:
    """The withdrawing client's rule: the shortest step of the grid after which its forget set looks unseen.

    `loss_after(radius)` returns (mean loss on S, mean loss on the client's held-out data) at the model one
    normalised step of that relative length away. The first radius whose forget-set loss reaches the
    held-out loss is chosen (the largest if none does). Only the client's own data enters: never the test
    split, never a retrained model.
    """
    trail = []
    for radius in grid:
        forget_loss, heldout_loss = loss_after(radius)
        trail.append({"radius": radius, "forget_loss": forget_loss, "heldout_loss": heldout_loss})
        if forget_loss >= heldout_loss:
            return radius, trail
    return grid[-1], trail
