"""Many clients: rounds consume replies as they arrive (in partition order), and benchmarks/many_clients.py's miniature."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from uuid import uuid4

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from benchmarks import many_clients
from benchmarks.common import PeakMonitor
from benchmarks.variants import folder_bytes
from fedunlearn.costs import CostMeter
from strategies import keys
from strategies.directory import ClientDirectory
from strategies.local_grid import LocalGrid
from strategies.metered_grid import MeteredGrid
from strategies.rounds import ask_clients

N = 9
NODE_OF = {p: 500 + 3 * p for p in range(N)}


class ArrivingGrid(Grid):
    """A grid whose replies arrive over several pulls, in the order `schedule` gives (one list of partitions per pull).

    It polls like Flower's InMemoryGrid (it has `pull_interval`), so rounds stream from it. It counts the
    replies it has handed out that the round has not parsed yet: what the server holds at once.
    """

    pull_interval = 0.0

    def __init__(self, schedule: list[list[int]]) -> None:
        LocalGrid(ClientApp(), 0)  # sets Flower's task identity, as in a run: Messages cannot be built without one
        self.schedule = [list(s) for s in schedule]
        self.pulls = 0
        self.out: dict[int, Message] = {}
        self.handed_out = 0
        self.parsed = 0
        self.most_held = 0

    def set_run(self, run: Any) -> None:
        """Not used."""

    @property
    def run(self) -> Any:
        """Not used."""
        raise NotImplementedError

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        """Not used."""
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        """Every node."""
        return list(NODE_OF.values())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Keep each message's reply (the partition's value, as a metric) until its pull comes."""
        partition_of = {n: p for p, n in NODE_OF.items()}
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            partition = partition_of[message.metadata.dst_node_id]
            reply = Message(RecordDict({keys.METRICS: MetricRecord({"value": float(partition) + 0.1})}), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            self.out[partition] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The next scheduled batch of replies (none once the schedule is spent)."""
        wanted = set(message_ids)
        batch = self.schedule.pop(0) if self.schedule else []
        replies = [self.out.pop(p) for p in batch if p in self.out and self.out[p].metadata.reply_to_message_id in wanted]
        self.handed_out += len(replies)
        self.most_held = max(self.most_held, self.handed_out - self.parsed)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Not what a streamed round calls."""
        raise AssertionError("a grid that polls must be streamed from, not asked with send_and_receive")


def round_over(grid: Grid, arriving: ArrivingGrid, timeout: float = 5.0) -> tuple[list[int], float]:
    """Ask every client once; the order parse saw the partitions in, and the float sum it built in that order."""
    seen: list[int] = []
    total = torch.zeros(1, dtype=torch.float32)

    def parse(partition: int, reply: Message) -> int:
        arriving.parsed += 1
        seen.append(partition)
        total.add_(torch.tensor([reply.content.metric_records[keys.METRICS]["value"]], dtype=torch.float32))
        return partition

    messages = [
        Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=n, message_type=keys.QUERY_GRADIENT) for n in NODE_OF.values()
    ]
    outcome = ask_clients(
        grid, messages, directory=ClientDirectory(node_of=dict(NODE_OF)), phase="test", parse=parse, timeout=timeout, stream=True
    )
    assert outcome.missing == [] and sorted(outcome.accepted) == list(range(N))
    return seen, float(total[0])


def sum_in_order(order: list[int]) -> float:
    """The reference: float32 sum of the values added in the given order (by hand, not through ask_clients)."""
    total = torch.zeros(1, dtype=torch.float32)
    for p in order:
        total.add_(torch.tensor([float(p) + 0.1], dtype=torch.float32))
    return float(total[0])


def test_replies_arriving_in_blocks_are_parsed_as_they_come():
    # Three pulls of three replies, each block shuffled: the round never holds more than one block at once.
    schedule = [[1, 0, 2], [4, 5, 3], [8, 6, 7]]
    arriving = ArrivingGrid(schedule)
    seen, total = round_over(MeteredGrid(arriving, meter=CostMeter()), arriving)
    assert seen == [p for block in schedule for p in block]  # arrival order: nothing waits for a lower partition
    assert total == sum_in_order(seen)
    assert arriving.most_held <= 3  # at most one pull's batch; gathering every reply first holds all 9


def test_folder_bytes_and_peaks_between_are_what_was_written_and_sampled(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "b").write_bytes(b"y" * 32)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c").write_bytes(b"z" * 1000)  # not directly in the folder: not counted
    assert folder_bytes(tmp_path) == (42, 2)
    assert folder_bytes(tmp_path / "gone") == (0, 0) and folder_bytes(None) == (0, 0)
    monitor = PeakMonitor(timeline=True)
    assert monitor.timeline is not None
    monitor.timeline.extend([(1.0, 5, 50), (2.0, 9, 40), (3.0, 7, 90), (4.0, 100, 1000)])
    assert monitor.peaks_between(1.5, 3.0) == {"driver_rss_peak_bytes": 9, "total_rss_peak_bytes": 90, "samples": 2}
    assert monitor.peaks_between(5.0, 6.0)["driver_rss_peak_bytes"] is None


@pytest.mark.parametrize("text", ["", "a,b", "0", "10,-1"])
def test_a_malformed_client_list_is_refused_with_the_form_expected(text):
    with pytest.raises(SystemExit, match="comma-separated positive integers"):
        many_clients.int_list(text)


def test_a_miniature_runs_every_phase_and_measures_the_caches_on_disk(tmp_path):
    out = tmp_path / "many.json"
    code = many_clients.main(
        [
            "--clients",
            "4",
            "--examples",
            "8",
            "--rounds",
            "1",
            "--engine",
            "local",
            "--in-process",
            "--out",
            str(out),
            "--data-root",
            str(tmp_path / "data"),
        ]
    )
    result = json.loads(out.read_text())
    (point,) = result["points"]
    assert code == 0 and point["finished"] and point["methods"] == {m: "complete" for m in many_clients.METHODS}
    assert list(point["phases"])[:6] == list(many_clients.MAIN_PHASES)
    # Every client's cache is one file on disk after the caching round: float32, so 4 bytes per parameter plus
    # safetensors' small JSON header (hand-counted: under 512 bytes for one tensor and three metadata strings).
    assert point["cache_files"] == 4 and point["phases"]["training"]["cache_files_after"] == 0
    per_file = point["cache_bytes_on_disk"] / point["cache_files"]
    assert 4 * point["num_parameters"] < per_file < 4 * point["num_parameters"] + 512
    assert all(row["driver_rss_peak_bytes"] for row in point["phases"].values())
    assert point["phases"]["training"]["rounds"] == 1 and point["phases"]["unlearn:retrain"]["rounds"] == 1
    assert result["target"]["met"] is None  # 4 clients say nothing about 10,000


def test_a_model_record_is_decoded_once_and_reloaded_intact_after_training_changed_the_model(tmp_path):
    from types import SimpleNamespace

    from flwr.app import ArrayRecord

    from fedunlearn.cache import CacheStore
    from strategies.runtime import ClientRuntime

    def model() -> torch.nn.Module:
        return torch.nn.Linear(3, 2)

    data = SimpleNamespace(x_train=torch.zeros(1, 3), y_train=torch.zeros(1, dtype=torch.long))
    runtime = ClientRuntime(data, model, CacheStore(tmp_path))  # type: ignore[arg-type]
    first = ArrayRecord({"weight": torch.full((2, 3), 1.5), "bias": torch.tensor([0.25, -0.5])})
    runtime.load(first)
    with torch.no_grad():
        runtime.model.state_dict()["weight"].add_(10.0)  # what a client's local training does to the resident model
    runtime.load(first)  # the same record again (the next virtual client of the cohort): its values, not the trained ones
    state = runtime.model.state_dict()
    assert torch.equal(state["weight"], torch.full((2, 3), 1.5)) and torch.equal(state["bias"], torch.tensor([0.25, -0.5]))
    second = ArrayRecord({"weight": torch.zeros(2, 3), "bias": torch.ones(2)})
    runtime.load(second)  # another record: decoded anew
    state = runtime.model.state_dict()
    assert torch.equal(state["weight"], torch.zeros(2, 3)) and torch.equal(state["bias"], torch.ones(2))
