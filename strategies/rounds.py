"""The one reply pipeline of every server-side message round: send, validate, retry the missing, record what failed.

Every round the unlearning methods run (IAU's gradient and step-length rounds, the caching round, PGA's and
IMU's single-client rounds, FedEraser's calibration rounds) goes through `ask_clients`, modelled on Flower's
`FedAvg._check_and_log_replies` reused by its other strategies: a reply the round's `parse` refuses
(`InvalidReplyError`) is rejected and logged, an error reply or none is a failure; both are recorded, never
aggregated, and the clients concerned are asked again up to `RoundPolicy.retries` times.

Replies are consumed as they arrive (`arriving_replies`: push, then pull until all are in or the timeout), in
partition order through a reorder buffer: `parse` sums each vector and drops it, so a round over 10,000 clients
holds only the replies that arrived ahead of a slower, lower-numbered client, not every client's upload at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedunlearn.config import NORM_ACTIONS
from fedunlearn.config import UNLEARN_POLICIES as MISSING_POLICIES
from fedunlearn.errors import InvalidReplyError, MissingRepliesError
from fedunlearn.secagg import SecAggSettings

from .directory import ClientDirectory
from .grid_wrapper import GridWrapper
from .validation import record_failure, record_rejection

logger = logging.getLogger("fedunlearn.rounds")

__all__ = ["MISSING_POLICIES", "RoundFailedError", "RoundOutcome", "RoundPolicy", "arriving_replies", "ask_clients", "require_reply"]


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
) -> RoundOutcome:
    """Send `messages`, validate each reply with `parse`, re-ask the clients still missing up to `retries` times.

    Replies are taken in partition order (float sums depend on order; arrival order varies between runs).
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
        # Replies are parsed in partition order (float sums depend on order, arrival order varies between runs): one that
        # arrives ahead of a lower partition still on its way waits in `early` until that one arrives or the round ends.
        order = sorted(pending)
        position = 0
        early: dict[int, Message] = {}

        def consume(partition: int, reply: Message) -> None:
            if reply.has_error():
                note(outcome.failures, record_failure([], phase, partition, str(reply.error.reason)), failures_log)
                return
            try:
                outcome.accepted[partition] = parse(partition, reply)
            except InvalidReplyError as err:
                note(outcome.rejected, record_rejection([], phase, partition, reply, str(err)), rejected_log)

        for reply in arriving_replies(grid, batch, timeout):
            partition = partition_of.get(reply.metadata.src_node_id)
            if partition is None or partition not in pending or partition in answered:
                note(
                    outcome.rejected,
                    record_rejection([], phase, partition, reply, "a reply from a node not asked in this round, or a second one"),
                    rejected_log,
                )
                continue
            answered.add(partition)
            early[partition] = reply
            while position < len(order) and order[position] in early:
                consume(order[position], early.pop(order[position]))
                position += 1
        for partition in sorted(early):  # the round ended with gaps: the rest, still in partition order
            consume(partition, early.pop(partition))
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


def polled_grid(grid: Grid) -> Grid | None:
    """The grid under this project's wrappers if it polls for replies (has `pull_interval`), else None.

    Flower's InMemoryGrid, the simulation engine's, says how long it waits between pulls; reached through
    GridWrappers only, push and pull are known to pass through to it. A LocalGrid answers within the push,
    a test's or user's own Grid may implement `send_and_receive` alone, and Flower's HttpGrid polls every 3 s
    without saying so: those are asked with `send_and_receive` as before.
    """
    while isinstance(grid, GridWrapper) and grid.grid is not None:
        grid = grid.grid
    return grid if hasattr(grid, "pull_interval") else None


def arriving_replies(grid: Grid, messages: Sequence[Message], timeout: float | None) -> Iterator[Message]:
    """The replies to `messages`, each yielded as soon as a pull brings it, until every one is in or `timeout` passes.

    On a polling grid (see `polled_grid`) this is what `Grid.send_and_receive` does (one push, then a pull every
    `pull_interval` seconds), except that the caller gets each reply at once instead of a list of all of them at the
    end, so it can use and release it. The wait between pulls is at least four times the last pull's own duration
    (as `engine_tuning`'s pickup loop does), so polling 10,000 outstanding ids costs at most a fifth of the
    driver's thread. Any other grid is asked with `send_and_receive` (what it returns, it has already held).
    """
    if not messages:
        return
    polled = polled_grid(grid)
    if polled is None:
        yield from grid.send_and_receive(messages, timeout=timeout)
        return
    interval = float(polled.pull_interval)  # type: ignore[attr-defined]
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    while waiting:
        started = time.perf_counter()
        replies = list(grid.pull_messages(list(waiting)))
        pulled_in = time.perf_counter() - started
        for reply in replies:
            waiting.discard(reply.metadata.reply_to_message_id)
        yield from replies
        del replies
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            return
        time.sleep(max(interval, 4.0 * pulled_in))


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
