"""Fault injection around any ClientApp: dropouts, crashes, slow clients, an offline withdrawing client, a malicious one.

`with_faults(app, plan)` returns a ClientApp that behaves like `app` except where the plan
injects a fault; the handlers themselves are untouched. How each fault shows to the server:

- dropout (`dropout_prob`): the client answers the round with an error reply instead of its
  result, which the server treats as no answer (on Ray a real dropout is a reply that never
  arrives before the round timeout; the server handles both alike). Drawn from a seeded
  generator keyed by (seed, partition, the client's message counter), so a run is reproducible
  and a retried message is a fresh draw. The counter lives in the node's `context.state`.
- crash (`crash_client`, `crash_round`): the ClientApp raises while serving the training
  message of that absolute round (in every training run that reaches it); the engine turns the
  exception into an error reply (LocalGrid does the same with `capture_errors=True`).
- slow (`slow_clients`, `slow_seconds`): the client sleeps before serving each message; past
  the round timeout its reply is missing.
- offline withdrawing client (`offline_client`): that client never answers unlearning queries
  (`query.*` other than `query.info`): the server falls back to the cache it uploaded, if it
  kept one, or fails clearly (strategies/iau_fed.py).
- malicious client (`malicious_client`, `malicious_norm`): its `query.gradient` replies carry
  its true gradient rescaled to norm `malicious_norm` (what the norm bound must contain).

`FaultyClientApp.log` lists the faults it injected; it is filled in the process that runs the
app (in-process runs; on Ray each worker has its own copy, and the server's own records count).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from . import keys
from .wire import as_int

FAULT_PREFIX = "fault-injection"
STATE_RECORD = "fault-injection"  # context.state record holding the node's message counter
DROPOUT_TYPES = (
    keys.TRAIN,
    keys.EVALUATE,
    keys.QUERY_GRADIENT,
    keys.QUERY_SECAGG_SETUP,
    keys.QUERY_SECAGG_SHARE_KEYS,
    keys.QUERY_SECAGG_COLLECT,
    keys.QUERY_SECAGG_UNMASK,
)
# Error code of an injected dropout (Flower's ErrorCode.UNKNOWN: nothing more specific fits "did not answer").
DROPOUT_ERROR_CODE = 0


class InjectedCrash(RuntimeError):
    """The exception an injected crash raises inside the ClientApp."""


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject in a run; the defaults inject none."""

    seed: int = 0
    dropout_prob: float = 0.0
    dropout_types: tuple[str, ...] = DROPOUT_TYPES
    crash_client: int | None = None
    crash_round: int | None = None
    slow_clients: tuple[int, ...] = ()
    slow_seconds: float = 0.0
    offline_client: int | None = None
    malicious_client: int | None = None
    malicious_norm: float = 1e6

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout_prob < 1.0:
            raise ValueError(f"dropout_prob={self.dropout_prob}: must be in [0, 1)")
        if (self.crash_client is None) != (self.crash_round is None):
            raise ValueError("crash_client and crash_round go together: give both or neither")
        if self.slow_seconds < 0:
            raise ValueError(f"slow_seconds={self.slow_seconds}: must be >= 0")
        if not self.malicious_norm > 0:
            raise ValueError(f"malicious_norm={self.malicious_norm}: must be > 0")

    @property
    def active(self) -> bool:
        """True when the plan injects anything."""
        return (
            self.dropout_prob > 0
            or self.crash_client is not None
            or (bool(self.slow_clients) and self.slow_seconds > 0)
            or self.offline_client is not None
            or self.malicious_client is not None
        )


def dropout_draw(seed: int, partition: int, counter: int) -> float:
    """The uniform draw deciding whether message number `counter` of `partition` is dropped (reproducible)."""
    return float(np.random.default_rng([seed, partition, counter]).random())


def scaled_gradient(record: ArrayRecord, norm: float) -> ArrayRecord:
    """The same tensors rescaled so their joint L2 norm is `norm` (a zero vector becomes all ones first), dtypes kept."""
    tensors = OrderedDict((name, torch.from_numpy(np.array(array.numpy(), dtype=np.float64))) for name, array in record.items())
    total = float(torch.sqrt(sum(((t**2).sum() for t in tensors.values()), torch.zeros((), dtype=torch.float64))))
    if total == 0.0:
        tensors = OrderedDict((n, torch.ones_like(t)) for n, t in tensors.items())
        total = float(torch.sqrt(sum(((t**2).sum() for t in tensors.values()), torch.zeros((), dtype=torch.float64))))
    dtypes = {name: array.numpy().dtype for name, array in record.items()}
    return ArrayRecord(
        OrderedDict((n, Array(np.ascontiguousarray((t * (norm / total)).numpy().astype(dtypes[n])))) for n, t in tensors.items())
    )


class FaultyClientApp(ClientApp):
    """A ClientApp that serves messages with `inner` and injects the faults of `plan`."""

    def __init__(self, inner: ClientApp, plan: FaultPlan, clock: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        self.inner = inner
        self.plan = plan
        self.sleep = clock
        self.log: list[dict[str, Any]] = []

    def _note(self, kind: str, partition: int, message: Message, **extra: Any) -> str:
        entry = {"fault": kind, "partition": partition, "message_type": message.metadata.message_type, **extra}
        self.log.append(entry)
        return f"{FAULT_PREFIX}: {kind} of client {partition}" + "".join(f", {k} {v}" for k, v in extra.items())

    def _next_counter(self, context: Context) -> int:
        record = context.state.config_records.get(STATE_RECORD)
        counter = as_int(record["messages"]) if record is not None else 0
        context.state[STATE_RECORD] = ConfigRecord({"messages": counter + 1})
        return counter

    def __call__(self, message: Message, context: Context) -> Message:
        """Serve `message`, injecting this plan's faults."""
        plan = self.plan
        partition = int(context.node_config["partition-id"])
        message_type = message.metadata.message_type
        if partition in plan.slow_clients and plan.slow_seconds > 0:
            self._note("slow", partition, message, seconds=plan.slow_seconds)
            self.sleep(plan.slow_seconds)
        unlearning_query = message_type.startswith("query.") and message_type != keys.QUERY_INFO
        if plan.offline_client == partition and unlearning_query:
            reason = self._note("offline", partition, message)
            return Message(Error(code=DROPOUT_ERROR_CODE, reason=reason), reply_to=message)
        if plan.crash_client == partition and message_type == keys.TRAIN:
            config = message.content.config_records.get(keys.CONFIG)
            server_round = as_int(config[keys.SERVER_ROUND]) if config is not None and keys.SERVER_ROUND in config else None
            if server_round == plan.crash_round:
                raise InjectedCrash(self._note("crash", partition, message, round=server_round))
        if plan.dropout_prob > 0 and message_type in plan.dropout_types:
            counter = self._next_counter(context)
            if dropout_draw(plan.seed, partition, counter) < plan.dropout_prob:
                reason = self._note("dropout", partition, message, counter=counter)
                return Message(Error(code=DROPOUT_ERROR_CODE, reason=reason), reply_to=message)
        reply = self.inner(message, context)
        if plan.malicious_client == partition and message_type == keys.QUERY_GRADIENT and not reply.has_error():
            if keys.GRADIENT in reply.content.array_records:
                content = RecordDict({name: record for name, record in reply.content.items()})
                content[keys.GRADIENT] = scaled_gradient(reply.content.array_records[keys.GRADIENT], plan.malicious_norm)
                self._note("malicious", partition, message, norm=plan.malicious_norm)
                reply = Message(content, reply_to=message)
        return reply


def with_faults(app: ClientApp, plan: FaultPlan | None) -> ClientApp:
    """`app` itself when the plan injects nothing, else `app` wrapped in a FaultyClientApp."""
    if plan is None or not plan.active:
        return app
    return FaultyClientApp(app, plan)
