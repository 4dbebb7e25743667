"""A Grid wrapper that counts rounds, participations, bytes and client compute from the real messages."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedunlearn.costs import CostMeter

from . import keys
from .grid_wrapper import GridWrapper
from .wire import as_float, as_int


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message payload: the sum of its records' sizes (Flower's own `count_bytes`)."""
    return sum(record.count_bytes() for record in content.values())


def reply_bytes(content: RecordDict) -> int:
    """Bytes a reply is charged: its payload, or for a client inside a cohort's partial sum (strategies/partial_sums.py)
    the bytes its own reply would have carried, which its worker measured before summing."""
    meter = content.get(keys.COHORT_METER)
    if isinstance(meter, MetricRecord) and keys.WIRE_BYTES in meter:
        return as_int(meter[keys.WIRE_BYTES])
    return payload_bytes(content)


def reply_compute_seconds(reply: Message) -> float:
    """Client compute seconds a reply reports (0 if it reports none)."""
    if reply.has_error():
        return 0.0
    for record in reply.content.metric_records.values():
        if keys.COMPUTE_S in record:
            return as_float(record[keys.COMPUTE_S])
    return 0.0


class MeteredGrid(GridWrapper):
    """Delegates to another Grid and records every round into a CostMeter.

    One `send_and_receive` call with at least one message is one round. Everything else passes through.
    """

    def __init__(self, grid: Grid, meter: CostMeter) -> None:
        super().__init__(grid)
        self.meter = meter

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push and count the bytes sent down (a round if non-empty)."""
        messages = list(messages)
        if messages:
            self.meter.record_round(len(messages), sum(payload_bytes(m.content) for m in messages))
        return self._inner().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull and count the bytes sent up, each reply as the caller takes it (a streamed round never lists them all)."""
        return self._pull(message_ids)

    def _pull(self, message_ids: Iterable[str]) -> Iterator[Message]:
        for reply in self._inner().pull_messages(message_ids):
            self._record(reply)
            yield reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send, wait, and count the round."""
        messages = list(messages)
        if not messages:
            return []
        self.meter.record_round(len(messages), sum(payload_bytes(m.content) for m in messages))
        replies = list(self._inner().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self._record(reply)
        return replies

    def _record(self, reply: Message) -> None:
        ok = not reply.has_error()
        self.meter.record_reply(reply_bytes(reply.content) if ok else 0, reply_compute_seconds(reply), ok)
