"""The streamed training round (issue 15): each reply folded as it arrives equals the gathered FedAvg, and is released.

The references are written independently of the code under test: client models are regenerated here from their
seeds and averaged with numpy (`np.average` over the stacked models in float64), the metrics with `math.fsum`.
Tolerances: the streamed mean is the float64 weighted mean rounded once to float32, so it is within half a float32
ulp of the float64 reference (checked as |streamed - reference| <= 2**-24 |reference|); Flower's gathered path sums
float32 products in float32, so streamed vs gathered agree to float32 accumulation error (K float32 ulps of the largest
value, K the clients summed).
Both execution modes run: per-node (a LocalGrid of plain nodes) and cohort (a CohortGrid over cohort nodes), the
latter twice: each worker's packed reply holding one model per client (`cohort`, partial_sums=False) and one partial
sum of its clients' models (`cohort-sums`, strategies/partial_sums.py: the round's mean is the same float64 sum
regrouped, so the same half-ulp bound against numpy holds).
"""

from __future__ import annotations

import gc
import logging
import math
import weakref
from collections.abc import Iterable
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedunlearn.baselines import LastModelStore, UpdateHistory
from fedunlearn.training import TrainSettings
from strategies import app_config, keys
from strategies.cohort import CohortClientApp, CohortGrid, num_cohorts
from strategies.fedavg import UnlearningFedAvg, discover_clients
from strategies.grid_wrapper import GridWrapper
from strategies.local_grid import LocalGrid
from strategies.metered_grid import MeteredGrid
from strategies.streaming import ReplyStream, StreamingGrid, WeightedModelSum
from strategies.update_recorder import TrainingRecorder, fan_out
from strategies.wire import as_int

NUM_CLIENTS = 7
SHAPES = {"w": (30, 20), "b": (20,)}
REJECTED = 2  # answers with a NaN in its model: validation refuses it
CRASHED = 5  # raises in its ClientApp: an error reply
MODES = ("per-node", "cohort", "cohort-sums")
SUMS = "cohort-sums"
EXTRA_METRIC: set[int] = set()  # partitions that report one metric more than the others


def examples_of(partition: int) -> int:
    return 11 + 7 * partition


def client_model(partition: int, server_round: int, global_model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What client `partition` sends in `server_round`: the global model plus its own seeded update (float32)."""
    rng = np.random.default_rng([partition, server_round])
    return {name: (global_model[name] + rng.normal(0.0, 0.1, SHAPES[name])).astype(np.float32) for name in SHAPES}


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(99)
    return {name: rng.normal(0.0, 1.0, shape).astype(np.float32) for name, shape in SHAPES.items()}


def record_of(model: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(model[name]) for name in SHAPES})


class LiveRecords:
    """The ArrayRecords pulled by the server that are still referenced somewhere (ArrayRecord is unhashable: no WeakSet)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[ArrayRecord]] = {}

    def add(self, record: ArrayRecord) -> None:
        key = id(record)

        def forget(_: weakref.ref[ArrayRecord]) -> None:
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(record, forget)

    def __len__(self) -> int:
        return sum(ref() is not None for ref in self._refs.values())


LIVE_CLIENT_MODELS = LiveRecords()


def toy_app() -> ClientApp:
    """Answers query.info, and train with `client_model` (REJECTED sends a NaN, CRASHED raises)."""
    app = ClientApp()

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord({keys.PARTITION_ID: pid, keys.NUM_TRAIN: examples_of(pid), keys.NUM_HELDOUT: 0})
        return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid == CRASHED:
            raise RuntimeError("client 5 crashed")
        server_round = as_int(msg.content.config_records[keys.CONFIG][keys.SERVER_ROUND])
        model = client_model(pid, server_round, {n: a.numpy() for n, a in msg.content.array_records[keys.ARRAYS].items()})
        if pid == REJECTED:
            model["b"][3] = np.nan
        record = record_of(model)
        metrics = MetricRecord({keys.NUM_EXAMPLES: examples_of(pid), keys.TRAIN_LOSS: 0.25 * pid + 1.0, "lists": [pid, 2 * pid]})
        if pid in EXTRA_METRIC:
            metrics["extra"] = 1.0
        return Message(RecordDict({keys.ARRAYS: record, keys.METRICS: metrics}), reply_to=msg)

    return app


class LazyGrid(LocalGrid):
    """A LocalGrid whose clients train only when their reply is pulled, one reply per pull: replies arrive over time."""

    answers_at_push = False  # so the round streams through push/pull as over Flower's engine

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        self._queued: dict[str, Message] = getattr(self, "_queued", {})
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = str(uuid4())
            self._queued[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        for message_id in list(message_ids):
            if message_id in self._queued:
                message = self._queued.pop(message_id)
                super().push_messages([message])  # runs the client now (LocalGrid answers at push, under an id of its own)
                message.metadata.__dict__["_message_id"] = message_id
                if not self._replies:  # an offline node: never answers
                    continue
                reply = self._replies.pop(next(iter(self._replies)))
                reply.metadata.__dict__["_reply_to_message_id"] = message_id
                if not reply.has_error():
                    for record in reply.content.values():  # a packed reply holds one record per client model
                        if isinstance(record, ArrayRecord):  # (not `array_records`: that view is a cycle that keeps them)
                            LIVE_CLIENT_MODELS.add(record)
                return [reply]
        return []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Pull until every reply came (the gathered round)."""
        ids, replies = list(self.push_messages(messages)), []
        while pulled := list(self.pull_messages(ids)):
            replies.extend(pulled)
        return replies


def make_grid(small_cfg, tmp_path, mode: str, lazy: bool = False) -> GridWrapper:
    """The grid the strategy sees in `mode`, over in-process nodes running `toy_app`."""
    node_grid = LazyGrid if lazy else LocalGrid
    if mode == "per-node":
        return node_grid(toy_app(), NUM_CLIENTS, capture_errors=True)
    assert mode in ("cohort", SUMS)
    cohort_size = 3
    spec = app_config.client_spec_for(small_cfg.replace(num_clients=NUM_CLIENTS), str(tmp_path / "caches"))
    nodes = node_grid(CohortClientApp(spec, cohort_size, toy_app(), vectorise_train=False), num_cohorts(NUM_CLIENTS, cohort_size))
    return CohortGrid(nodes, num_clients=NUM_CLIENTS, cohort_size=cohort_size, timeout=5)


def run_rounds(grid, streaming: bool, rounds: int = 2, recorder=None, round_offset: int = 0, partial_sums: bool = False):
    """Train `rounds` rounds through UnlearningFedAvg.start(); returns the strategy, the Result and the per-round ends.

    `partial_sums`: let cohort workers answer with partial sums (mode `cohort-sums`).
    """
    directory = discover_clients(grid, NUM_CLIENTS, timeout=5)
    ends: list[tuple[int, ArrayRecord, MetricRecord | None]] = []
    strategy = UnlearningFedAvg(
        directory=directory,
        train=TrainSettings(lr=0.1, epochs=1, batch_size=8),
        seed=0,
        streaming=streaming,
        update_recorder=recorder,
        round_offset=round_offset,
        on_round_end=lambda r, a, m: ends.append((r, a, m)),
        partial_sums=partial_sums,
    )
    result = strategy.start(grid=grid, initial_arrays=record_of(initial_model()), num_rounds=rounds, timeout=30)
    return strategy, result, ends


def reference_rounds(rounds: int, round_offset: int = 0) -> list[dict[str, np.ndarray]]:
    """The global model after each round, by numpy: the example-weighted mean of the accepted clients' models, float64."""
    accepted = [p for p in range(NUM_CLIENTS) if p not in (REJECTED, CRASHED)]
    weights = np.array([examples_of(p) for p in accepted], dtype=np.float64)
    current = initial_model()
    out = []
    for server_round in range(1 + round_offset, rounds + 1 + round_offset):
        models = [client_model(p, server_round, current) for p in accepted]
        mean64 = {n: np.average(np.stack([m[n].astype(np.float64) for m in models]), axis=0, weights=weights) for n in SHAPES}
        out.append(mean64)
        current = {n: v.astype(np.float32) for n, v in mean64.items()}
    return out


@pytest.mark.parametrize("mode", MODES)
def test_the_streamed_round_is_the_weighted_mean_of_the_accepted_models(small_cfg, tmp_path, mode):
    strategy, result, ends = run_rounds(make_grid(small_cfg, tmp_path, mode), streaming=True, round_offset=3, partial_sums=mode == SUMS)
    expected = reference_rounds(2, round_offset=3)
    assert [r for r, _, _ in ends] == [4, 5]  # absolute rounds: round_offset applied
    for (_, arrays, _), reference in zip(ends, expected, strict=True):
        for name in SHAPES:
            got = arrays[name].numpy()
            assert got.dtype == np.float32
            assert np.all(np.abs(got.astype(np.float64) - reference[name]) <= 2.0**-24 * np.abs(reference[name])), name
    # The metrics: FedAvg's example-weighted mean (lists element-wise), num-examples left out.
    accepted = [p for p in range(NUM_CLIENTS) if p not in (REJECTED, CRASHED)]
    total = sum(examples_of(p) for p in accepted)
    loss = math.fsum(examples_of(p) * (0.25 * p + 1.0) for p in accepted) / total
    metrics = result.train_metrics_clientapp[2]
    assert metrics[keys.TRAIN_LOSS] == pytest.approx(loss, rel=1e-15)
    assert metrics["lists"] == pytest.approx([math.fsum(examples_of(p) * k * p for p in accepted) / total for k in (1, 2)], rel=1e-15)
    assert keys.NUM_EXAMPLES not in metrics
    # One rejection and one failure per round, recorded with their absolute round and partition.
    assert [(e["partition"], e["round"]) for e in strategy.rejected] == [(REJECTED, 4), (REJECTED, 5)]
    assert "non-finite" in strategy.rejected[0]["reason"]
    assert [(e["partition"], e["round"]) for e in strategy.failures] == [(CRASHED, 4), (CRASHED, 5)]
    assert "client 5 crashed" in strategy.failures[0]["reason"]


@pytest.mark.parametrize("mode", MODES)
def test_streamed_and_gathered_rounds_agree(small_cfg, tmp_path, mode):
    streamed, s_result, _ = run_rounds(make_grid(small_cfg, tmp_path / "s", mode), streaming=True, partial_sums=mode == SUMS)
    gathered, g_result, _ = run_rounds(make_grid(small_cfg, tmp_path / "g", mode), streaming=False)
    for name in SHAPES:
        s_mean, g_mean = s_result.arrays[name].numpy(), g_result.arrays[name].numpy()
        # Flower's float32 sum of K weighted float32 terms errs by at most about K float32 ulps of the largest term.
        bound = NUM_CLIENTS * 2.0**-23 * float(np.abs(s_mean).max())
        assert float(np.abs(s_mean.astype(np.float64) - g_mean).max()) <= bound, name
    # The metrics are averaged by FedAvg's own function over the same replies in the same (partition) order: identical.
    assert dict(s_result.train_metrics_clientapp[2]) == dict(g_result.train_metrics_clientapp[2])
    assert streamed.rejected == gathered.rejected and streamed.failures == gathered.failures


@pytest.mark.parametrize("mode", MODES)
def test_recorders_see_the_same_clients_streamed_or_gathered(small_cfg, tmp_path, mode):
    def recorders():
        return TrainingRecorder(history=UpdateHistory(interval=1), last_models=LastModelStore()), []

    (s_rec, s_calls), (g_rec, g_calls) = recorders(), recorders()

    def plain(calls):  # a plain callable recorder: still handed the whole round, in partition order
        return lambda r, clients, before: calls.append((r, {p: (a["w"].numpy().copy(), n) for p, (a, n) in clients.items()}))

    # With a recorder the strategy never asks for partial sums (the recorders need every client's model): cohort-sums too.
    run_rounds(
        make_grid(small_cfg, tmp_path / "s", mode), streaming=True, recorder=fan_out([s_rec, plain(s_calls)]), partial_sums=mode == SUMS
    )
    run_rounds(make_grid(small_cfg, tmp_path / "g", mode), streaming=False, recorder=fan_out([g_rec, plain(g_calls)]))
    accepted = [p for p in range(NUM_CLIENTS) if p not in (REJECTED, CRASHED)]
    total = sum(examples_of(p) for p in accepted)
    assert s_rec.history is not None and g_rec.history is not None
    assert s_rec.history.rounds == g_rec.history.rounds == [1, 2]
    for server_round in (1, 2):
        assert s_rec.history.partitions(server_round) == accepted
    for p in accepted:  # round 1 starts from the same model on both paths: bit for bit; round 2 from the rounded means
        for name in SHAPES:
            assert np.array_equal(s_rec.history.update(1, p)[name].numpy(), g_rec.history.update(1, p)[name].numpy())
            np.testing.assert_allclose(s_rec.history.update(2, p)[name].numpy(), g_rec.history.update(2, p)[name].numpy(), atol=1e-6)
    # Round 1's stored update is exactly the client's own seeded update (independent of both paths).
    start = initial_model()
    for p in accepted:
        expected = client_model(p, 1, start)["w"].astype(np.float32) - start["w"]
        assert np.array_equal(s_rec.history.update(1, p)["w"].numpy(), expected)
    assert s_rec.last_models is not None and g_rec.last_models is not None
    for p in accepted:
        s_last, g_last = s_rec.last_models.get(p), g_rec.last_models.get(p)
        assert s_last is not None and g_last is not None
        assert s_last.server_round == g_last.server_round == 2
        assert s_last.share == g_last.share == examples_of(p) / total
        assert all(np.allclose(s_last.state[n].numpy(), g_last.state[n].numpy(), atol=1e-6, rtol=0) for n in SHAPES)
    assert [r for r, _ in s_calls] == [r for r, _ in g_calls] == [1, 2]
    for (_, s_clients), (_, g_clients) in zip(s_calls, g_calls, strict=True):
        assert list(s_clients) == list(g_clients) == accepted
        assert all(
            np.allclose(s_clients[p][0], g_clients[p][0], atol=1e-6, rtol=0) and s_clients[p][1] == g_clients[p][1] for p in accepted
        )


@pytest.mark.parametrize("mode", MODES)
def test_the_server_never_holds_the_rounds_models_at_once(small_cfg, tmp_path, mode, monkeypatch):
    """Replies that arrive one by one are released as they are folded; the gathered round holds every one of them."""
    # In-process, the cohort node's warning about the crashed client carries the exception, whose traceback reaches
    # the server's frames (they called the client): pytest's log capture would keep every model those frames held.
    monkeypatch.setattr(logging.getLogger("fedunlearn.cohort"), "disabled", True)
    peaks = {}
    for streaming in (True, False):
        grid = make_grid(small_cfg, tmp_path / str(streaming), mode, lazy=True)
        peak = [0]
        original = UnlearningFedAvg.check_train

        def counting(self, absolute_round, partition, reply, original=original, peak=peak):
            peak[0] = max(peak[0], len(LIVE_CLIENT_MODELS))
            return original(self, absolute_round, partition, reply)

        UnlearningFedAvg.check_train = counting  # type: ignore[method-assign]
        try:
            run_rounds(grid, streaming=streaming, rounds=1, partial_sums=mode == SUMS)
        finally:
            UnlearningFedAvg.check_train = original  # type: ignore[method-assign]
        peaks[streaming] = peak[0]
        gc.collect()
        assert len(LIVE_CLIENT_MODELS) == 0  # nothing kept after the round, either way
    sent = NUM_CLIENTS - 1  # the crashed client sends no model
    # Per-node: the reply being checked; cohort: the models of the one packed reply being unpacked (cohort size 3);
    # cohort-sums: the one partial sum that packed reply holds instead. Gathered, partial sums are never asked for.
    assert peaks[True] <= {"per-node": 1, "cohort": 3, SUMS: 1}[mode]
    assert peaks[False] == sent


@pytest.mark.parametrize("mode", ["cohort", SUMS])
def test_metering_counts_every_streamed_reply(small_cfg, tmp_path, mode):
    """Rounds, participations and bytes both ways: with partial sums each client is charged the reply it would have sent."""
    from fedunlearn.costs import CostMeter

    counts = {}
    for streaming in (True, False):
        meter = CostMeter()
        grid = MeteredGrid(make_grid(small_cfg, tmp_path / str(streaming), mode), meter)
        with meter.phase("training"):
            run_rounds(grid, streaming=streaming, partial_sums=mode == SUMS)
        cost = meter.get("training")
        counts[streaming] = (cost.rounds, cost.participations, cost.bytes_down, cost.bytes_up)
    assert counts[True] == counts[False]
    assert counts[True][0] == 3 and counts[True][3] > 0  # the discovery round and two training rounds


def test_weighted_model_sum_against_numpy_and_any_order():
    rng = np.random.default_rng(3)
    models: list[dict[str, np.ndarray]] = [
        {"a": rng.normal(0, 1, (64, 33)).astype(np.float32), "n": np.array([k, 2 * k], dtype=np.int64)} for k in range(40)
    ]
    weights = [int(w) for w in rng.integers(1, 500, len(models))]
    reference = np.average(np.stack([m["a"].astype(np.float64) for m in models]), axis=0, weights=weights)
    results = []
    for order in (range(len(models)), rng.permutation(len(models)), rng.permutation(len(models))):
        total = WeightedModelSum()
        for k in order:
            total.add(models[k], weights[k])
        results.append(total.mean())
    for mean in results:
        assert mean["a"].dtype == np.float32 and mean["n"].dtype == np.int64
        assert np.all(np.abs(mean["a"].astype(np.float64) - reference) <= 2.0**-24 * np.abs(reference))
        assert np.array_equal(mean["a"], results[0]["a"])  # arrival order did not change a single bit here
    expected_n = np.rint(np.average(np.stack([m["n"] for m in models]).astype(np.float64), axis=0, weights=weights))
    assert np.array_equal(results[0]["n"], expected_n.astype(np.int64))
    with pytest.raises(ValueError, match="weight=0"):
        WeightedModelSum().add(models[0], 0)
    total = WeightedModelSum()
    total.add(models[0], 1)
    with pytest.raises(ValueError, match="differ"):
        total.add({"a": models[0]["a"]}, 1)
    with pytest.raises(ValueError, match="no model"):
        WeightedModelSum().mean()


def test_a_reply_stream_is_one_pass_and_stops_at_its_timeout(small_cfg, tmp_path):
    grid = make_grid(small_cfg, tmp_path, "per-node", lazy=True)
    grid.offline = {grid.node_ids[0]}  # type: ignore[attr-defined]
    messages = [
        Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=nid, message_type=keys.QUERY_INFO) for nid in grid.get_node_ids()
    ]
    stream = StreamingGrid(grid).send_and_receive(messages, timeout=0.2)
    assert isinstance(stream, ReplyStream) and len(stream.missing) == NUM_CLIENTS
    replies = list(stream)
    assert len(replies) == NUM_CLIENTS - 1 and len(stream.missing) == 1  # the offline node never answered
    with pytest.raises(RuntimeError, match="iterated once"):
        list(stream)
    assert StreamingGrid(grid).send_and_receive([], timeout=1) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_reply_with_other_metrics_is_refused_alone(small_cfg, tmp_path, mode):
    """Flower's FedAvg refuses the whole gathered round when metric keys differ; the streamed round refuses that reply.

    The first accepted reply sets the round's keys: partition 4 is never first here (each cohort answers its lowest first).
    """
    EXTRA_METRIC.add(4)
    try:
        strategy, result, _ = run_rounds(make_grid(small_cfg, tmp_path, mode), streaming=True, rounds=1, partial_sums=mode == SUMS)
    finally:
        EXTRA_METRIC.clear()
    assert [(e["partition"], "reports metrics" in e["reason"]) for e in strategy.rejected if e["partition"] != REJECTED] == [(4, True)]
    accepted = [p for p in range(NUM_CLIENTS) if p not in (REJECTED, CRASHED, 4)]
    mean = np.average(
        np.stack([client_model(p, 1, initial_model())["w"].astype(np.float64) for p in accepted]),
        axis=0,
        weights=[examples_of(p) for p in accepted],
    )
    assert np.all(np.abs(result.arrays["w"].numpy() - mean) <= 2.0**-24 * np.abs(mean))


def test_over_an_in_process_grid_the_replies_come_as_they_are():
    """LocalGrid answers at push: nothing to stream, and a node that did not answer is not waited for."""
    grid = LocalGrid(toy_app(), 3)
    grid.offline = {grid.node_ids[1]}
    messages = [
        Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=nid, message_type=keys.QUERY_INFO) for nid in grid.get_node_ids()
    ]
    replies = StreamingGrid(grid).send_and_receive(messages, timeout=3600)
    assert [r.metadata.src_node_id for r in replies] == [grid.node_ids[0], grid.node_ids[2]]


def test_ask_clients_streamed_gives_the_outcome_of_the_gathered_round(small_cfg, tmp_path):
    """The unlearning rounds' helper, streamed over replies that arrive one by one: same accepted, missing and failures."""
    from strategies.rounds import ask_clients

    outcomes = []
    for stream in (True, False):
        grid = make_grid(small_cfg, tmp_path / str(stream), "per-node", lazy=True)
        directory = discover_clients(grid, NUM_CLIENTS, timeout=5)
        grid.offline = {directory.node_of[3]}  # type: ignore[attr-defined]
        messages = [
            Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=directory.node_of[p], message_type=keys.QUERY_INFO)
            for p in range(NUM_CLIENTS)
        ]
        parsed: list[int] = []

        def parse(partition: int, reply: Message, parsed: list[int] = parsed) -> int:
            parsed.append(partition)
            return as_int(reply.content.metric_records[keys.METRICS][keys.NUM_TRAIN])

        outcome = ask_clients(grid, messages, directory=directory, phase="info", parse=parse, retries=1, timeout=0.3, stream=stream)
        outcomes.append((outcome.accepted, outcome.missing, [(f["partition"], f["reason"]) for f in outcome.failures], sorted(parsed)))
    assert outcomes[0] == outcomes[1]
    accepted, missing, failures, _ = outcomes[0]
    assert accepted == {p: examples_of(p) for p in range(NUM_CLIENTS) if p != 3}
    assert missing == [3] and [p for p, _ in failures] == [3, 3]  # asked again once, missing twice
