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

import torch

from fedunlearn.baselines import LastModelStore, UpdateHistory
from fedunlearn.data import DatasetStore
from fedunlearn.deletion import kept_indices
from fedunlearn.gradients import gradient_sum
from fedunlearn.models import build_model
from strategies import app_config
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
    uploads_caches: bool = False  # needs the clients' caches uploaded into the server's aggregate (the cached protocol)


REGISTRY: dict[str, Method] = {}


def register(name: str, summary: str, continues: bool = True,
             uploads_caches: bool = False) -> Callable[[Callable[[MethodContext], MethodOutcome]], Callable[[MethodContext], MethodOutcome]]:
    """Decorator adding a method to the registry under `name`."""
    def wrap(fn: Callable[[MethodContext], MethodOutcome]) -> Callable[[MethodContext], MethodOutcome]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        REGISTRY[name] = Method(name, fn, summary, continues, uploads_caches)
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


def stale_drift(ctx: MethodContext, report: Any) -> list[float]:
    """Cached protocol, K > 1: how far the cache's g_r is from the remaining data's g_r at each later step's model.

    A measurement of the simulator (the driver holds every client's data), not part of the protocol:
    ||g_r(cache) - g_r(theta_j)|| / ||g_r(theta_j)|| for every step j > 1.
    """
    total = ctx.strategy.gradient_total
    if total is None or len(report.step_arrays) < 2:
        return []
    data = DatasetStore.get(app_config.data_spec_for(ctx.cfg))
    ledger = (*ctx.strategy.ledger, ctx.request)
    withdrawn = {r.client for r in ledger if r.client_level}
    remaining = torch.cat([kept_indices(data, p, list(ledger)) for p in range(data.num_clients) if p not in withdrawn])
    cached = total / ctx.strategy.gradient_total_count
    model = build_model(app_config.model_name_for(ctx.cfg), data.input_shape, data.num_classes)
    drift = []
    for arrays in report.step_arrays[1:]:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        fresh, _, _ = gradient_sum(model, data.x_train[remaining], data.y_train[remaining])
        fresh = fresh.to(torch.float64) / len(remaining)
        drift.append(float((cached - fresh).norm() / fresh.norm().clamp_min(1e-300)))
    return drift


def _iau(ctx: MethodContext, protocol: str, name: str, repair_rounds: int | None = None) -> MethodOutcome:
    strategy = ctx.strategy
    arrays, report = strategy.unlearn(ctx.grid, ctx.arrays, ctx.request, ctx.forget_count, protocol=protocol, method=name)
    if protocol == "cached" and report.steps > 1 and not strategy.iau.refresh_every:
        report.stale_drift = stale_drift(ctx, report)
    repair = ctx.cfg.iau_repair_rounds if repair_rounds is None else repair_rounds
    if ctx.cfg.withdraw_round is not None:
        repair = 0  # a mid-training request: FedAvg without the data continues right after anyway
    if repair > 0:  # FedAvg among the remaining clients from the corrected model: what PGA does after its ascent
        fedavg = ctx.fedavg(ledger=strategy.ledger, round_offset=ctx.request_round, label=name)
        arrays = fedavg.start(grid=ctx.grid, initial_arrays=arrays, num_rounds=repair, timeout=ctx.cfg.round_timeout).arrays
    # Every client keeps its gradient cache (any of them may withdraw); the cached protocol also keeps G_tot on the server.
    total = ctx.strategy.gradient_total if protocol == "cached" else None
    server = total.numel() * total.element_size() if total is not None else 0
    # Each client's upload, when the server keeps them for an offline withdrawing client (--withdrawing-offline).
    server += sum(vector.numel() * vector.element_size() for vector, _, _ in ctx.strategy.client_uploads.values())
    return MethodOutcome(arrays, details={"unlearning": {**report.to_dict(), "repair_rounds": repair},
                                          "storage": storage(server, sum(ctx.strategy.client_cache_bytes.values()))})


@register("iau", "IAU-Fed, fresh protocol: a round per step, every remaining client sends its (cached) gradient, then --iau-repair-rounds FedAvg rounds")
def iau_fresh(ctx: MethodContext) -> MethodOutcome:
    """IAU correction with the fresh protocol."""
    return _iau(ctx, "fresh", "iau")


@register("iau-cached", "IAU-Fed, cached protocol: only the withdrawing client sends G_S; the server holds G_tot", uploads_caches=True)
def iau_cached(ctx: MethodContext) -> MethodOutcome:
    """IAU correction with the cached protocol."""
    return _iau(ctx, "cached", "iau-cached", repair_rounds=0)  # the cached protocol contacts client u alone


# The baselines register themselves on import; importing them here keeps REGISTRY complete whenever methods is imported.
from . import baselines as _baselines  # noqa: E402,F401
