"""What an unlearning strategy holds between requests, as plain comparable values (for "state unchanged" checks)."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord


def raw(value: Any) -> Any:
    """`value` with tensors and ArrayRecords as (dtype, shape, bytes), so that an in-place change shows."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, tuple(value.shape), value.detach().cpu().numpy().tobytes())
    if isinstance(value, ArrayRecord):
        return {name: array.numpy().tobytes() for name, array in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(raw(v) for v in value)
    if isinstance(value, dict):
        return {k: raw(v) for k, v in value.items()}
    return value


def strategy_state(iau: Any) -> dict[str, Any]:
    """An IAUFed's state: the ledger and example counts, the aggregate cache and the model it is at, the uploaded caches."""
    return {
        "ledger": iau.ledger,
        "examples": iau.current_examples(),
        "active": list(iau.active_partitions()),
        "excluded": raw(iau._excluded_counts),
        "total": raw(iau.gradient_total),
        "total_count": iau.gradient_total_count,
        "total_version": iau.gradient_total_version,
        "total_arrays": raw(iau.gradient_total_arrays),
        "uploads": raw(iau.client_uploads),
    }
