"""Retraining, the gold standard every distance and speedup is measured against (no client-side step of its own)."""

from __future__ import annotations

from .base import MethodContext, MethodOutcome, arrays_nbytes, register, storage

REFERENCE = "retrain"  # the method every distance and speedup is measured against


@register(REFERENCE, "gold standard: FedAvg from the same initial weights without the forgotten data", continues=False)
def retrain(ctx: MethodContext) -> MethodOutcome:
    """Retrain from scratch: same initial weights, seeds, rounds and client sampling, forgotten data left out."""
    strategy = ctx.fedavg(ledger=(*ctx.strategy.ledger, ctx.request), round_offset=0, label=REFERENCE)
    result = strategy.start(grid=ctx.grid, initial_arrays=ctx.initial_arrays, num_rounds=ctx.cfg.rounds, timeout=ctx.cfg.round_timeout)
    # The server must keep the initial weights to retrain from them.
    return MethodOutcome(result.arrays, details={"storage": storage(server_bytes=arrays_nbytes(ctx.initial_arrays))})
