"""The method registry: a method is one registered unit (server step, client handlers, training recorder, settings).

A `Method` bundles what the runner and the ClientApp need of one unlearning method, so neither names a method:
the runner asks `method.continues`, `method.uploads_caches` and `method.recorder`; `build_client_app` and
`add_unlearning` attach every registered method's `handlers`. Register with `@register(name, summary, ...)` in
the method's own file (modelled on Opacus's accountant registry; unknown names answer with "did you mean").
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedunlearn.config import ExperimentConfig
from fedunlearn.deletion import DeletionRequest
from fedunlearn.errors import UnknownMethodError

from ..fedavg import UnlearningFedAvg, UpdateRecorder
from ..iau_fed import IAUFed
from ..runtime import ClientHandler
from ..wire import WireSettings


@dataclass
class MethodContext:
    """What a method may use: the experiment, the (metered) grid and the state when the request arrives."""

    cfg: ExperimentConfig
    grid: Grid
    strategy: IAUFed  # this method's own branch of the training strategy (after cache filling): its ledger
    # holds the requests it served before this one; the method may mutate it
    initial_arrays: ArrayRecord  # the weights training started from (retraining starts here too)
    arrays: ArrayRecord  # the global model when the request arrives (in a stream: this method's previous output)
    request: DeletionRequest
    forget_count: int  # |S|
    fedavg: Callable[..., UnlearningFedAvg]  # factory: fedavg(ledger=..., round_offset=..., label=...) with progress
    request_round: int = 0  # rounds trained when the request arrived
    recorded: Any = None  # what this method's recorder kept during training (None: it has none)
    round_hook: Callable[[str], Callable[..., None]] | None = None  # round_hook(label) -> per-round progress/curve callback


@dataclass
class MethodOutcome:
    """The unlearned model and what the method wants recorded beside it."""

    arrays: ArrayRecord
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method.

    `run` is the server step; `continues`: mid-training requests resume FedAvg after it; `uploads_caches`: it needs
    the clients' caches uploaded into the server's aggregate (the cached protocol); `handlers`: its client steps by
    query name (`query.<name>` messages reach them); `recorder(cfg)`: a training-round recorder installed on the
    training strategy when the method is selected, handed back to `run` as `ctx.recorded`.
    """

    name: str
    run: Callable[[MethodContext], MethodOutcome]
    summary: str
    continues: bool = True
    uploads_caches: bool = False
    handlers: Mapping[str, ClientHandler] = field(default_factory=dict)
    recorder: Callable[[ExperimentConfig], UpdateRecorder] | None = None


REGISTRY: dict[str, Method] = {}
_HANDLERS: dict[str, ClientHandler] = {}


def register(
    name: str,
    summary: str,
    continues: bool = True,
    uploads_caches: bool = False,
    handlers: Mapping[str, ClientHandler] | None = None,
    recorder: Callable[[ExperimentConfig], UpdateRecorder] | None = None,
) -> Callable[[Callable[[MethodContext], MethodOutcome]], Callable[[MethodContext], MethodOutcome]]:
    """Decorator adding a method (its server step, and its client handlers if any) to the registry under `name`."""
    handlers = dict(handlers or {})

    def wrap(fn: Callable[[MethodContext], MethodOutcome]) -> Callable[[MethodContext], MethodOutcome]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        for query, handler in handlers.items():
            if not query.isidentifier():
                raise ValueError(
                    f"method {name!r}: client handler name {query!r} must be a Python identifier (Flower's rule for "
                    f"query.<name> handlers), e.g. {query.replace('-', '_')!r}"
                )
            if _HANDLERS.get(query, handler) is not handler:
                raise ValueError(f"method {name!r}: client handler 'query.{query}' is already registered by another method")
        _HANDLERS.update(handlers)
        REGISTRY[name] = Method(name, fn, summary, continues, uploads_caches, handlers, recorder)
        return fn

    return wrap


@contextlib.contextmanager
def registry_scope() -> Iterator[None]:
    """Methods (and their handlers) registered inside are unregistered after it: for tests and docs pages."""
    methods, handlers = dict(REGISTRY), dict(_HANDLERS)
    try:
        yield
    finally:
        REGISTRY.clear()
        REGISTRY.update(methods)
        _HANDLERS.clear()
        _HANDLERS.update(handlers)


def client_handlers() -> dict[str, ClientHandler]:
    """Every registered method's client handlers by query name (several methods may share one)."""
    return dict(_HANDLERS)


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


def arrays_nbytes(arrays: ArrayRecord) -> int:
    """Bytes of the tensors an ArrayRecord holds (what storing it costs)."""
    return sum(int(array.numpy().nbytes) for array in arrays.values())


def storage(server_bytes: int = 0, client_bytes: int = 0, **notes: Any) -> dict[str, Any]:
    """The `storage` entry of a method's results: bytes the server and all clients together must keep for it."""
    return {"server_bytes": int(server_bytes), "client_bytes": int(client_bytes), **notes}


__all__ = [
    "REGISTRY",
    "Method",
    "MethodContext",
    "MethodOutcome",
    "WireSettings",
    "arrays_nbytes",
    "check_methods",
    "client_handlers",
    "get_method",
    "register",
    "registry_scope",
    "storage",
]
