"""Flower's simulation engine picks up new messages every 0.1 s; a run can ask it to look more often.

In flwr 1.41 the engine's `add_messages_to_queue` (flwr/server/superlink/fleet/vce/vce_api.py) scans
every node for new messages, then sleeps a fixed 0.1 s. Every round therefore waits 50 ms on
average before a client even starts, which is most of the wall time of a one-round unlearning method
(measured: iau-cached 0.07 s, of which the clients' own work 0.002 s). `faster_message_pickup`
swaps in the same loop with a shorter wait for the duration of a run and puts Flower's back after.

The wait is at least four times the duration of the scan itself, so a large federation (1000 nodes
is 1000 state queries per scan) spends at most a fifth of one thread polling. The patch is applied
only when the engine's function is the one it replaces (checked by its source); otherwise the run
keeps Flower's behaviour and says so in the log.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import Queue
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.server.superlink.linkstate import LinkState

logger = logging.getLogger("fedunlearn.engine")

EXPECTED_WAIT = "f_stop.wait(0.1)"


def pickup_loop(interval: float) -> Callable[..., None]:
    """Flower's `add_messages_to_queue` with a wait of max(interval, 4 x the scan) instead of 0.1 s."""

    def add_messages_to_queue(state: LinkState, queue: Queue[Message], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
        """Put Messages in the queue from the LinkState (as Flower's own loop does)."""
        while not f_stop.is_set():
            started = time.perf_counter()
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(max(interval, 4.0 * (time.perf_counter() - started)))

    return add_messages_to_queue


@contextmanager
def faster_message_pickup(interval: float) -> Iterator[bool]:
    """Within the block, Flower's simulation engine looks for new messages every `interval` seconds; yields whether it applied."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:  # another Flower layout: nothing to tune
        logger.warning("flwr has no vce_api module here: the simulation engine keeps its own message pickup interval")
        yield False
        return
    original = vce_api.add_messages_to_queue
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        source = ""
    if EXPECTED_WAIT not in source or interval >= 0.1:
        if interval < 0.1:
            logger.warning(
                "flwr's simulation engine changed (no %r in add_messages_to_queue): keeping its message pickup "
                "interval; rounds may each wait up to 0.1 s",
                EXPECTED_WAIT,
            )
        yield False
        return
    vce_api.add_messages_to_queue = pickup_loop(interval)
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
