"""Unlearning methods as registered, swappable pieces: each turns the trained model into an unlearned one.

A method gets a `MethodContext` (the metered grid, the strategy state at request time, the
model, the request) and returns a `MethodOutcome`. The runner meters its cost, continues
training when the request came mid-training, and evaluates the result. Register a new method
with `@register("name")`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedunlearn.baselines import LastModelStore, UpdateHistory
from fedunlearn.config import ExperimentConfig
from fedunlearn.deletion import DeletionRequest
from fedunlearn.errors import UnknownMethodError
from strategies.fedavg import UnlearningFedAvg
from strategies.iau_fed import IAUFed


@dataclass
class MethodContext:
    """What a method may use: the experiment, the (metered) grid and the state when the request arrives."""

    cfg: ExperimentConfig
    grid: Grid
    strategy: IAUFed                 # this method's own branch of the training strategy (after cache filling): its ledger
                                     # holds the requests it served before this one; the method may mutate it
    initial_arrays: ArrayRecord      # the weights training started from (retraining starts here too)
    arrays: ArrayRecord              # the global model when the request arrives (in a stream: this method's previous output)
    request: DeletionRequest
    forget_count: int                # |S|
    fedavg: Callable[..., UnlearningFedAvg]  # factory: fedavg(ledger=..., round_offset=..., label=...) with progress
    request_round: int = 0                   # rounds trained when the request arrived
    update_history: UpdateHistory | None = None  # FedEraser: client updates stored during training (when it was selected)
    last_models: LastModelStore | None = None    # PGA: every client's latest local model, stored during training
    round_hook: Callable[[str], Callable[..., None]] | None = None  # round_hook(label) -> per-round progress/curve callback


@dataclass
class MethodOutcome:
    """The unlearned model and what the method wants recorded beside it."""

    arrays: ArrayRecord
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method: `run` does the work; `continues` says whether mid-training requests resume FedAvg after it."""

    name: str
    run: Callable[[MethodContext], MethodOutcome]
    summary: str
    continues: bool = True


REGISTRY: dict[str, Method] = {}


def register(name: str, summary: str, continues: bool = True) -> Callable[[Callable[[MethodContext], MethodOutcome]], Callable[[MethodContext], MethodOutcome]]:
    """Decorator adding a method to the registry under `name`."""
    def wrap(fn: Callable[[MethodContext], MethodOutcome]) -> Callable[[MethodContext], MethodOutcome]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        REGISTRY[name] = Method(name, fn, summary, continues)
        return fn
    return wrap


def get_method(name: str) -> Method:
    """The registered method `name`; unknown names raise UnknownMethodError listing the valid ones."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}{hint}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def check_methods(names: tuple[str, ...] | list[str]) -> list[Method]:
    """Resolve every name before anything runs, so a typo costs nothing."""
    return [get_method(n) for n in names]


@register("retrain", "gold standard: FedAvg from the same initial weights without the forgotten data", continues=False)
def retrain(ctx: MethodContext) -> MethodOutcome:
    """Retrain from scratch: same initial weights, seeds, rounds and client sampling, forgotten data left out."""
    strategy = ctx.fedavg(ledger=(*ctx.strategy.ledger, ctx.request), round_offset=0, label="retrain")
    result = strategy.start(grid=ctx.grid, initial_arrays=ctx.initial_arrays, num_rounds=ctx.cfg.rounds, timeout=ctx.cfg.round_timeout)
    # The server must keep the initial weights to retrain from them.
    return MethodOutcome(result.arrays, details={"storage": storage(server_bytes=arrays_nbytes(ctx.initial_arrays))})


def arrays_nbytes(arrays: ArrayRecord) -> int:
    """Bytes of the tensors an ArrayRecord holds (what storing it costs)."""
    return sum(int(array.numpy().nbytes) for array in arrays.values())


def storage(server_bytes: int = 0, client_bytes: int = 0, **notes: Any) -> dict[str, Any]:
    """The `storage` entry of a method's results: bytes the server and all clients together must keep for it."""
    return {"server_bytes": int(server_bytes), "client_bytes": int(client_bytes), **notes}


def _iau(ctx: MethodContext, protocol: str, name: str) -> MethodOutcome:
    strategy = ctx.strategy
    arrays, report = strategy.unlearn(ctx.grid, ctx.arrays, ctx.request, ctx.forget_count, protocol=protocol, method=name)
    # Every client keeps its gradient cache (any of them may withdraw); the cached protocol also keeps G_tot on the server.
    total = ctx.strategy.gradient_total if protocol == "cached" else None
    server = total.numel() * total.element_size() if total is not None else 0
    # Each client's upload, when the server keeps them for an offline withdrawing client (--withdrawing-offline).
    server += sum(vector.numel() * vector.element_size() for vector, _, _ in ctx.strategy.client_uploads.values())
    return MethodOutcome(arrays, details={"unlearning": report.to_dict(),
                                          "storage": storage(server, sum(ctx.strategy.client_cache_bytes.values()))})


@register("iau", "IAU-Fed, fresh protocol: one round, every remaining client sends its (cached) gradient")
def iau_fresh(ctx: MethodContext) -> MethodOutcome:
    """IAU correction with the fresh protocol."""
    return _iau(ctx, "fresh", "iau")


@register("iau-cached", "IAU-Fed, cached protocol: only the withdrawing client sends G_S; the server holds G_tot")
def iau_cached(ctx: MethodContext) -> MethodOutcome:
    """IAU correction with the cached protocol."""
    return _iau(ctx, "cached", "iau-cached")


# The baselines register themselves on import; importing them here keeps REGISTRY complete whenever methods is imported.
from . import baselines as _baselines  # noqa: E402,F401
