"""The simulation engine's message pickup loop: same behaviour as Flower's, shorter wait, restored after the run."""

from __future__ import annotations

import threading
from queue import Queue

import pytest
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


class FakeClock:
    """time.perf_counter for the loop: advanced by the fake state's scans, never by real time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingStop:
    """A stop event that records each wait the loop asks for and ends the loop after `waits` of them."""

    def __init__(self, waits: int) -> None:
        self.limit = waits
        self.waits: list[float] = []

    def is_set(self) -> bool:
        return len(self.waits) >= self.limit

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return self.is_set()


def test_the_loop_waits_the_interval_asked_for_or_four_scans_when_scanning_takes_longer(monkeypatch):
    """What the tuning configures: each wait is max(interval, 4 x the scan's duration), never Flower's 0.1 s."""
    import strategies.engine_tuning as engine_tuning

    clock = FakeClock()
    monkeypatch.setattr(engine_tuning.time, "perf_counter", clock)

    class ScanCost(FakeState):
        def __init__(self, pending: dict[int, list[str]], cost: float) -> None:
            super().__init__(pending)
            self.cost = cost

        def get_message_ins(self, node_id: int, limit: int) -> list[str]:
            clock.now += self.cost  # each node's query takes `cost` seconds of the fake clock
            return super().get_message_ins(node_id, limit)

    cheap, stop = ScanCost({1: ["a"], 2: []}, cost=0.0001), RecordingStop(3)
    pickup_loop(0.002)(cheap, Queue(), {1: 0, 2: 1}, stop)
    assert stop.waits == [0.002] * 3  # a scan of 0.2 ms: the interval asked for
    slow, stop = ScanCost({n: [] for n in range(10)}, cost=0.001), RecordingStop(2)
    pickup_loop(0.002)(slow, Queue(), {n: n for n in range(10)}, stop)
    assert stop.waits == [pytest.approx(4 * 10 * 0.001)] * 2  # a scan of 10 ms: four times the scan


def test_the_patch_is_applied_inside_the_block_only():
    original = vce_api.add_messages_to_queue
    with faster_message_pickup(0.005) as applied:
        assert applied and vce_api.add_messages_to_queue is not original
        assert vce_api.add_messages_to_queue.__name__ == "add_messages_to_queue"
    assert vce_api.add_messages_to_queue is original
    with faster_message_pickup(0.1) as applied:  # Flower's own interval: nothing to change
        assert not applied and vce_api.add_messages_to_queue is original
