"""Fine-tuning: FedAvg on the remaining clients from the trained model (no client-side step of its own)."""

from __future__ import annotations

from flwr.app import ArrayRecord

from ..fedavg import UpdateRecorder
from .base import MethodContext, MethodOutcome, register, storage


def remaining_fedavg_rounds(
    ctx: MethodContext, rounds: int, label: str, recorder: UpdateRecorder | None = None, arrays: ArrayRecord | None = None
) -> tuple[ArrayRecord, int]:
    """FedAvg for `rounds` rounds among the remaining clients from `arrays` (default ctx.arrays); round numbers go on after the request.

    `recorder`, if given, sees every round's client models (PGA keeps the last local models for the next request).
    """
    start = ctx.arrays if arrays is None else arrays
    if rounds == 0:
        return start, 0
    strategy = ctx.fedavg(ledger=(*ctx.strategy.ledger, ctx.request), round_offset=ctx.request_round, label=label)
    strategy.update_recorder = recorder
    return strategy.start(grid=ctx.grid, initial_arrays=start, num_rounds=rounds, timeout=ctx.cfg.round_timeout).arrays, rounds


@register("finetune", "continue FedAvg for --finetune-rounds rounds on the remaining clients")
def finetune(ctx: MethodContext) -> MethodOutcome:
    """k FedAvg rounds without the forgotten data, from the trained model (k = 0 returns it unchanged)."""
    arrays, rounds = remaining_fedavg_rounds(ctx, ctx.cfg.finetune_rounds, "finetune")
    return MethodOutcome(arrays, details={"unlearning": {"rounds": rounds}, "storage": storage()})
