"""The simulation engine's message pickup loop: same behaviour as Flower's, shorter wait, restored after the run."""

from __future__ import annotations

import threading
import time
from queue import Queue

from flwr.server.superlink.fleet.vce import vce_api

from strategies.engine_tuning import faster_message_pickup, pickup_loop


class FakeState:
    """get_message_ins as Flower's LinkState answers it: at most `limit` pending messages of one node."""

    def __init__(self, pending: dict[int, list[str]]) -> None:
        self.pending = pending
        self.scans = 0

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        self.scans += 1
        out, self.pending[node_id] = self.pending[node_id][:limit], self.pending[node_id][limit:]
        return out


def test_the_loop_delivers_every_message_one_per_node_per_scan_and_stops():
    state = FakeState({1: ["a1", "a2"], 2: ["b1"]})
    queue: Queue = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=pickup_loop(0.001), args=(state, queue, {1: 0, 2: 1}, stop))
    thread.start()
    got = [queue.get(timeout=2) for _ in range(3)]
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert got[:2] == ["a1", "b1"] and got[2] == "a2"  # one message per node per scan, nodes in order, as Flower's loop
    assert state.scans >= 4


def test_a_message_is_picked_up_in_milliseconds_not_a_tenth_of_a_second():
    state = FakeState({7: []})
    queue: Queue = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=pickup_loop(0.002), args=(state, queue, {7: 0}, stop))
    thread.start()
    time.sleep(0.05)  # the loop is idle, waiting
    posted = time.perf_counter()
    state.pending[7].append("late")
    assert queue.get(timeout=2) == "late"
    waited = time.perf_counter() - posted
    stop.set()
    thread.join(timeout=2)
    assert waited < 0.05, waited  # Flower's own loop waits up to 0.1 s


def test_the_patch_is_applied_inside_the_block_only():
    original = vce_api.add_messages_to_queue
    with faster_message_pickup(0.005) as applied:
        assert applied and vce_api.add_messages_to_queue is not original
        assert vce_api.add_messages_to_queue.__name__ == "add_messages_to_queue"
    assert vce_api.add_messages_to_queue is original
    with faster_message_pickup(0.1) as applied:  # Flower's own interval: nothing to change
        assert not applied and vce_api.add_messages_to_queue is original
