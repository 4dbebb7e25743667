"""An independent single-process reference of the IAU-Fed update, written from ALGORITHMS.md section 4.

Nothing here calls the code under test (fedunlearn.iau, fedunlearn.gradients, the strategies): gradients are
per-example gradients of a float64 copy of the model (torch.func), summed; the direction is
d = lambda G_r / (n - |S|) - G_S / |S| in plain arithmetic; the step rules are written out:
  sgd              theta - eta d
  adam-first-step  theta - eta d / (|d| + 1e-8)    (a fresh Adam's first step: bias-corrected m / sqrt(v) = d / |d|)
  normalised       theta - rho ||theta|| d / ||d||

Tolerance (float32 precision, stated once): the clients compute their gradients with the float32 model and may
store and send them as float32, and the parameters travel as float32. Each entry of a float32 gradient sum over
the examples carries a rounding error below K * eps32 * sum_i |g_i| (eps32 = 2^-23; K = 64 covers the roundings of
one forward and backward pass of the MLP and the accumulation over a batch, and the one rounding of a float32
cache), so an entry of d is exact to within K * eps32 * (A + mean(A)), A = lambda sum_kept |g_i| / (n - |S|) + sum_S |g_i| / |S|
(the mean: a floor for entries whose terms are tiny), and of the stepped parameters to within eta * that (sgd), plus half an ulp of the float32 parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

EPS32 = float(torch.finfo(torch.float32).eps)  # 2^-23
ROUNDING = 64  # K above
ADAM_EPS = 1e-8  # torch.optim.Adam's default eps, which the reference code uses


@dataclass(frozen=True)
class PooledSums:
    """Sum of the per-example gradients over a set of examples, the sum of their absolute values, and the count."""

    total: torch.Tensor
    absolute: torch.Tensor
    count: int


def parameters_at(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """theta cut into the model's named parameters (named_parameters() order, float64)."""
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[offset : offset + p.numel()].reshape(p.shape).to(torch.float64)
        offset += p.numel()
    assert offset == theta.numel(), (offset, theta.numel())
    return out


def pooled_sums(model: nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 64) -> PooledSums:
    """sum_i grad CE(z_i, theta) over (x, y), by per-example autograd of a float64 copy in eval mode."""
    reference = copy.deepcopy(model).double().eval()
    params = parameters_at(reference, theta)

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(reference, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    total = torch.zeros(theta.numel(), dtype=torch.float64)
    absolute = torch.zeros_like(total)
    for start in range(0, len(x), chunk):
        grads = per_example(params, x[start : start + chunk].to(torch.float64), y[start : start + chunk])
        flat = torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in params], dim=1)
        total += flat.sum(dim=0)
        absolute += flat.abs().sum(dim=0)
    return PooledSums(total, absolute, len(x))


@dataclass(frozen=True)
class Direction:
    """d = lambda g_r - g_f and the bound on each entry's float32 rounding error."""

    d: torch.Tensor
    error: torch.Tensor
    remaining_count: int
    forget_count: int


def direction(remaining: PooledSums, forget: PooledSums, weight: float = 1.0, correction: bool = True) -> Direction:
    """lambda G_r / (n - |S|) - G_S / |S| (only -G_S / |S| without the correction)."""
    d = -forget.total / forget.count
    scale = forget.absolute / forget.count
    if correction:
        d = d + weight * remaining.total / remaining.count
        scale = scale + weight * remaining.absolute / remaining.count
    # The mean scale is a floor for entries whose terms are all tiny: float32 may round a pre-activation across
    # a ReLU's kink, which changes such an entry by more than its own terms' rounding.
    return Direction(d, ROUNDING * EPS32 * (scale + scale.mean()), remaining.count, forget.count)


def step(theta: torch.Tensor, d: torch.Tensor, rule: str, *, eta: float = 0.0, radius: float = 0.0) -> torch.Tensor:
    """One step of `rule` along -d, written out (float64)."""
    theta, d = theta.to(torch.float64), d.to(torch.float64)
    if rule == "sgd":
        return theta - eta * d
    if rule == "adam-first-step":
        return theta - eta * d / (d.abs() + ADAM_EPS)
    if rule == "normalised":
        return theta - radius * theta.norm() * d / d.norm()
    raise AssertionError(f"no reference for step rule {rule!r}")


def step_error(theta: torch.Tensor, direction_: Direction, rule: str, *, eta: float = 0.0, radius: float = 0.0) -> torch.Tensor:
    """The bound on each stepped entry's error: the direction's error through the rule, plus float32 parameter rounding.

    adam-first-step: where |d| is within its own error its sign is undefined, and the entry may move by up to 2 eta.
    """
    theta64 = theta.to(torch.float64)
    ulp = EPS32 * theta64.abs()
    if rule == "sgd":
        return eta * direction_.error + ulp
    if rule == "adam-first-step":
        undefined = direction_.d.abs() <= direction_.error
        return (
            torch.where(undefined, torch.full_like(theta64, 2 * eta), eta * direction_.error / direction_.d.abs().clamp_min(1e-300)) + ulp
        )
    if rule == "normalised":
        size = radius * float(theta64.norm())
        relative = float(direction_.error.norm() / direction_.d.norm())
        return size * (direction_.error / direction_.d.norm() + relative * direction_.d.abs() / direction_.d.norm()) + ulp
    raise AssertionError(f"no reference for step rule {rule!r}")


def assert_within(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str = "update") -> None:
    """Every entry of `got` within its bound of `expected` (atol 1e-12 for entries that are exactly zero)."""
    gap = (got.to(torch.float64) - expected.to(torch.float64)).abs()
    worst = int(torch.argmax(gap - bound))
    assert bool((gap <= bound + 1e-12).all()), (
        f"{what}: entry {worst} differs by {float(gap[worst]):.3g}, bound {float(bound[worst]):.3g} "
        f"({int((gap > bound + 1e-12).sum())} of {gap.numel()} entries outside)"
    )
