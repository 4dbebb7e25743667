"""Gradient ascent: IAU's ascent step on the forget set without the correction (an ablation of IAU-Fed)."""

from __future__ import annotations

from .. import app_config
from .base import MethodContext, MethodOutcome, register, storage
from .iau import HANDLERS


@register(
    "gradient-ascent",
    "IAU's ascent step on the forget set without the correction (ablation): only the withdrawing client is asked",
    handlers=HANDLERS,
)
def gradient_ascent(ctx: MethodContext) -> MethodOutcome:
    """theta + eta * g_f through IAUFed.unlearn with correction=False (same eta, steps and step rule as iau)."""
    strategy = ctx.strategy
    strategy.iau = app_config.iau_settings_for(ctx.cfg, correction=False)
    arrays, report = strategy.unlearn(ctx.grid, ctx.arrays, ctx.request, ctx.forget_count, protocol="fresh", method="gradient-ascent")
    # Needs nothing stored: client u can compute G_S in one pass over S (it answers from its cache when that is current).
    return MethodOutcome(arrays, details={"unlearning": report.to_dict(), "storage": storage()})
