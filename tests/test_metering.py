"""Cost accounting: bytes are the sum of the real payload sizes, rounds and participations counted per phase."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from one_step import one_step

from fedunlearn.costs import CostMeter, PhaseCost, speedup
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.fedavg import discover_clients
from strategies.local_grid import LocalGrid
from strategies.metered_grid import MeteredGrid, payload_bytes


class RecordingGrid(LocalGrid):
    """LocalGrid that keeps every message sent and received."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[Message] = []
        self.received: list[Message] = []

    # Push and pull, not send_and_receive: the streamed training round uses those (LocalGrid's send_and_receive calls both).
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.sent.extend(messages)
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        # Copies: the strategies drop a client's arrays from its reply once they are summed (memory at scale).
        self.received.extend(Message(copy.deepcopy(r.content), reply_to=r) if not r.has_error() else r for r in replies)
        return replies


def test_payload_bytes_counts_array_data():
    LocalGrid(build_client_app(None), 1)  # sets the task identity Message needs
    arrays = ArrayRecord([np.zeros((10, 10), dtype=np.float32), np.zeros(5, dtype=np.float64)])
    content = RecordDict({"a": arrays, "c": ConfigRecord({"x": 1}), "m": MetricRecord({"y": 2.0})})
    size = payload_bytes(content)
    assert size == arrays.count_bytes() + content["c"].count_bytes() + content["m"].count_bytes()
    assert arrays.count_bytes() >= 400 + 40


def test_metered_bytes_equal_sum_of_payloads(small_cfg, tmp_path):
    from fedunlearn.deletion import DeletionRequest
    from fedunlearn.gradients import ParamLayout
    from fedunlearn.models import build_model
    from strategies.iau_fed import IAUFed

    app = build_client_app(app_config.client_spec_for(small_cfg, str(tmp_path)))
    recording = RecordingGrid(app, small_cfg.num_clients)
    meter = CostMeter()
    grid = MeteredGrid(recording, meter)
    with meter.phase("setup"):
        directory = discover_clients(grid, small_cfg.num_clients)
    model = build_model("mlp", (1, 8, 8), 10)
    strategy = IAUFed(
        layout=ParamLayout.of(model), iau=one_step(), directory=directory, train=app_config.train_settings_for(small_cfg), seed=0
    )
    with meter.phase("training"):
        arrays = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=2).arrays
    with meter.phase("unlearn"):
        strategy.fill_caches(grid, arrays)
        strategy.unlearn(grid, arrays, DeletionRequest(client=1), 100)
    total = PhaseCost()
    for cost in meter.phases.values():
        total = total + cost
    assert total.bytes_down == sum(payload_bytes(m.content) for m in recording.sent)
    assert total.bytes_up == sum(payload_bytes(r.content) for r in recording.received)
    assert total.participations == len(recording.received)
    training = meter.get("training")
    assert training.rounds == 2
    assert training.participations == 2 * small_cfg.num_clients
    # Each training message carries the model: at least P float32 values down and up per client.
    p = ParamLayout.of(model).numel
    assert training.bytes_down >= 2 * small_cfg.num_clients * 4 * p
    assert training.bytes_up >= 2 * small_cfg.num_clients * 4 * p
    assert meter.get("unlearn").rounds == 2  # cache filling + the one correction round
    assert training.client_compute_s > 0


def test_speedup_ratios():
    reference = PhaseCost(wall_s=10.0, rounds=30, bytes_down=600, bytes_up=400)
    method = PhaseCost(wall_s=0.5, rounds=1, bytes_down=60, bytes_up=40)
    assert speedup(reference, method) == {"wall": 20.0, "rounds": 30.0, "bytes": 10.0}
    assert speedup(reference, PhaseCost())["rounds"] == float("inf")
