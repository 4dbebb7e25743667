"""The one reply pipeline of every server-side message round: send, validate, retry the missing, record what failed.

Every round the unlearning methods run (IAU's gradient and step-length rounds, the caching round, PGA's and
IMU's single-client rounds, FedEraser's calibration rounds) goes through `ask_clients`, modelled on Flower's
`FedAvg._check_and_log_replies` reused by its other strategies: a reply the round's `parse` refuses
(`InvalidReplyError`) is rejected and logged, an error reply or none is a failure; both are recorded, never
aggregated, and the clients concerned are asked again up to `RoundPolicy.retries` times.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedunlearn.config import NORM_ACTIONS
from fedunlearn.config import UNLEARN_POLICIES as MISSING_POLICIES
from fedunlearn.errors import InvalidReplyError, MissingRepliesError
from fedunlearn.secagg import SecAggSettings

from .directory import ClientDirectory
from .streaming import StreamingGrid
from .validation import record_failure, record_rejection

logger = logging.getLogger("fedunlearn.rounds")

__all__ = ["MISSING_POLICIES", "RoundFailedError", "RoundOutcome", "RoundPolicy", "ask_clients", "require_reply"]


@dataclass(frozen=True)
class RoundPolicy:
    """What an unlearning round does about clients that do not answer and contributions that are too large.

    `retries`: extra attempts for the clients that did not answer or sent a rejected reply.
    `on_missing`: after the retries, "renormalise" aggregates what arrived with g_r normalised
    over the clients that answered (and lists the missing), "abort" leaves the model unchanged.
    `norm_bound` (> 0): bound on the L2 norm of each client's contribution to d (fresh: the vector
    it sends; cached: G_S/|S|); `norm_action` "clip" scales it down to the bound, "reject" refuses it.
    """

    retries: int = 0
    on_missing: str = "abort"
    norm_bound: float = 0.0
    norm_action: str = "clip"
    secure: SecAggSettings | None = None  # sums through SecAgg+ (strategies/secagg.py): the server sees only the sum

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries={self.retries}: must be >= 0")
        if self.on_missing not in MISSING_POLICIES:
            raise ValueError(f"on_missing={self.on_missing!r}: must be one of {', '.join(MISSING_POLICIES)}")
        if self.norm_bound < 0:
            raise ValueError(f"norm_bound={self.norm_bound}: must be >= 0 (0 = no bound)")
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(f"norm_action={self.norm_action!r}: must be one of {', '.join(NORM_ACTIONS)}")


@dataclass
class RoundOutcome:
    """What one round (with its retries) gave: the parsed replies by partition and what went wrong."""

    accepted: dict[int, Any]
    missing: list[int]  # partitions still without an accepted reply after the retries
    asked: list[int]
    attempts: int = 0  # sends, the first one included
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def retries(self) -> int:
        """Extra sends spent re-asking clients."""
        return max(self.attempts - 1, 0)

    def to_dict(self) -> dict[str, Any]:
        """What results.json records of the round (the reliability summary counts these)."""
        return {
            "clients_asked": self.asked,
            "missing_clients": self.missing,
            "retries": self.retries,
            "failures": list(self.failures),
            "rejected": list(self.rejected),
        }


def ask_clients(
    grid: Grid,
    messages: Sequence[Message],
    *,
    directory: ClientDirectory,
    phase: str,
    parse: Callable[[int, Message], Any],
    retries: int = 0,
    timeout: float | None = None,
    rejected_log: list[dict[str, Any]] | None = None,
    failures_log: list[dict[str, Any]] | None = None,
    stream: bool = False,
) -> RoundOutcome:
    """Send `messages`, validate each reply with `parse`, re-ask the clients still missing up to `retries` times.

    Replies are taken in partition order (float sums depend on order; arrival order varies between runs), or with
    `stream` parsed one by one as they arrive, so a `parse` that sums and drops each reply's payload never has the
    round's replies held at once (the caching upload: one gradient per client). Streamed, the order is the arrival
    order: in-process the order the messages were pushed, on Ray whatever came first.
    Rejections and failures go to the returned outcome and, if given, to the caller's run-wide logs.
    """
    partition_of = {nid: p for p, nid in directory.node_of.items()}
    pending = {partition_of[m.metadata.dst_node_id]: m for m in messages}
    outcome = RoundOutcome(accepted={}, missing=[], asked=sorted(pending))

    def note(log: list[dict[str, Any]], entry: dict[str, Any], run_log: list[dict[str, Any]] | None) -> None:
        log.append(entry)
        if run_log is not None:
            run_log.append(entry)

    for attempt in range(retries + 1):
        if attempt:
            logger.info("%s round: asking clients %s again (retry %d of %d)", phase, sorted(pending), attempt, retries)
        outcome.attempts += 1
        batch = [Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type) for m in pending.values()]
        answered: set[int] = set()
        replies: Iterable[Message] = (
            StreamingGrid(grid).send_and_receive(batch, timeout=timeout)
            if stream
            else sorted(grid.send_and_receive(batch, timeout=timeout), key=lambda r: partition_of.get(r.metadata.src_node_id, -1))
        )
        for reply in replies:
            partition = partition_of.get(reply.metadata.src_node_id)
            if partition is None or partition not in pending or partition in answered:
                note(
                    outcome.rejected,
                    record_rejection([], phase, partition, reply, "a reply from a node not asked in this round, or a second one"),
                    rejected_log,
                )
                continue
            answered.add(partition)
            if reply.has_error():
                note(outcome.failures, record_failure([], phase, partition, str(reply.error.reason)), failures_log)
                continue
            try:
                outcome.accepted[partition] = parse(partition, reply)
            except InvalidReplyError as err:
                note(outcome.rejected, record_rejection([], phase, partition, reply, str(err)), rejected_log)
        for partition in sorted(set(pending) - answered):
            note(
                outcome.failures,
                record_failure(
                    [], phase, partition, f"no reply within the round timeout ({timeout:g} s)" if timeout is not None else "no reply"
                ),
                failures_log,
            )
        pending = {p: m for p, m in pending.items() if p not in outcome.accepted}
        if not pending:
            break
    outcome.missing = sorted(pending)
    return outcome


class RoundFailedError(MissingRepliesError):
    """A round whose clients still had not answered after the retries; `report` is what results.json records of it."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def require_reply(outcome: RoundOutcome, client: int, what: str) -> Any:
    """The parsed reply of `client`, or RoundFailedError naming the last reason it gave (the model is left unchanged)."""
    if client in outcome.accepted:
        return outcome.accepted[client]
    reasons = [e["reason"] for e in (*outcome.failures, *outcome.rejected) if e.get("partition") == client]
    last = reasons[-1] if reasons else "no reply"
    raise RoundFailedError(
        f"client {client} did not answer the {what} round after {outcome.retries} retries ({last}); the model is left unchanged",
        report={**outcome.to_dict(), "status": "failed", "reason": last},
    )
