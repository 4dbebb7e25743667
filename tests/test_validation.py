"""Reply validation: malformed client replies (wrong shapes, dtypes, NaN/inf, wrong version, bad counts) are never aggregated."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from one_step import one_step
from snapshots import strategy_state

from fedunlearn.deletion import DeletionRequest
from fedunlearn.errors import InvalidReplyError, UnlearningAbortedError, WithdrawalRequestError
from fedunlearn.gradients import ParamLayout
from fedunlearn.training import TrainSettings
from strategies import keys
from strategies.fedavg import ClientDirectory, UnlearningFedAvg, model_version
from strategies.iau_fed import IAUFed, RoundPolicy, arrays_to_vector
from strategies.local_grid import LocalGrid
from strategies.validation import bound_norm, check_gradient_reply, check_train_reply, check_withdrawal

LAYOUT = ParamLayout(("w", "b"), ((3, 2), (2,)))
NUM_TRAIN = {0: 10, 1: 20, 2: 30, 3: 40}
NODE_OF = {p: 101 + p for p in NUM_TRAIN}
CORRUPTIONS = (
    "shape",
    "nan",
    "inf",
    "version",
    "zero-count",
    "negative-count",
    "fractional-count",
    "nan-count",
    "missing-tensor",
    "extra-tensor",
    "dtype",
    "no-metrics",
    "no-version",
    "no-gradient",
    "undecodable",
)

# Every corruption kind is a pytest parameter, so each runs every time; hypothesis varies the values inside a kind
# (vectors, counts, which entry is corrupted), from a fixed seed so that a failure is found again on every run.
settings.register_profile(
    "fedunlearn",
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Mutation runs (python -m benchmarks.mutation) take 3 examples per kind: every kind still runs for every mutant.
settings.register_profile("mutation", parent=settings.get_profile("fedunlearn"), max_examples=3)
settings.load_profile(os.environ.get("FEDUNLEARN_HYPOTHESIS_PROFILE", "fedunlearn"))


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    """Messages need a run id: LocalGrid sets the task identity a Flower runtime would."""
    LocalGrid(ClientApp(), 1)


def request_message(node: int, version: str = "v1", message_type: str = keys.QUERY_GRADIENT) -> Message:
    """A server message to `node` (what a reply answers)."""
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.MODEL_VERSION: version})}), dst_node_id=node, message_type=message_type)


def record_of(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of named numpy arrays (kept exactly as given)."""
    return ArrayRecord(OrderedDict((name, Array(np.ascontiguousarray(value))) for name, value in tensors.items()))


def gradient_record(vector: np.ndarray, dtype: str = "float32") -> ArrayRecord:
    """A flat vector as the named tensors of LAYOUT."""
    return record_of({"w": vector[:6].reshape(3, 2).astype(dtype), "b": vector[6:].astype(dtype)})


def gradient_reply(
    to: Message,
    vector: np.ndarray,
    count: float = 5,
    version: str = "v1",
    corruption: str | None = None,
    where: int = 0,
    count_key: str = keys.NUM_EXAMPLES,
) -> Message:
    """A client's gradient reply to `to`, optionally with one corruption applied (to the count under `count_key`)."""
    record = gradient_record(vector)
    metrics: dict[str, float | int] = {count_key: count}
    echoed = version
    if corruption == "shape":
        record = record_of({"w": vector[:6].reshape(2, 3).astype("float32"), "b": vector[6:].astype("float32")})
    elif corruption in ("nan", "inf"):
        bad = vector.copy()
        bad[where % bad.size] = np.nan if corruption == "nan" else -np.inf
        record = gradient_record(bad)
    elif corruption == "version":
        echoed = version + "-old"
    elif corruption == "zero-count":
        metrics[count_key] = 0
    elif corruption == "negative-count":
        metrics[count_key] = -abs(int(count)) - 1
    elif corruption == "fractional-count":
        metrics[count_key] = count + 0.5
    elif corruption == "nan-count":
        metrics[count_key] = float("nan")
    elif corruption == "missing-tensor":
        record = record_of({"w": vector[:6].reshape(3, 2).astype("float32")})
    elif corruption == "extra-tensor":
        record = gradient_record(vector)
        record["extra"] = Array(np.zeros(2, dtype="float32"))
    elif corruption == "dtype":
        record = gradient_record(vector, "float64")
    elif corruption == "undecodable":
        record = gradient_record(vector)
        record["b"] = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x00\x01\x02")
    content = RecordDict()
    if corruption != "no-metrics":
        content[keys.METRICS] = MetricRecord(metrics)
    if corruption != "no-gradient":
        content[keys.GRADIENT] = record
    if corruption != "no-version":
        content[keys.CONFIG] = ConfigRecord({keys.MODEL_VERSION: echoed})
    return Message(content, reply_to=to)


vectors = st.lists(st.floats(-10, 10, allow_nan=False), min_size=8, max_size=8).map(lambda v: np.array(v, dtype=np.float64))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@given(vector=vectors, count=st.integers(1, 1000), where=st.integers(0, 7))
def test_every_malformed_gradient_reply_is_rejected(corruption, vector, count, where):
    to = request_message(NODE_OF[1])
    good = check_gradient_reply(gradient_reply(to, vector, count), LAYOUT, "v1", dtype="float32")
    torch.testing.assert_close(good, torch.from_numpy(vector.astype(np.float32).astype(np.float64)))
    with pytest.raises(InvalidReplyError, match=f"node {NODE_OF[1]}"):
        check_gradient_reply(gradient_reply(to, vector, count, corruption=corruption, where=where), LAYOUT, "v1", dtype="float32")


class ScriptedGrid(Grid):
    """A Grid whose replies come from `answer(message) -> reply | None` (None: the node does not answer)."""

    answers_at_push = True  # answers at once: a streamed round takes its send_and_receive as is (strategies/streaming.py)

    def __init__(self, answer: Callable[[Message], Message | None]) -> None:
        self.answer = answer
        self.sent: list[Message] = []

    def set_run(self, run):  # type: ignore[no-untyped-def]
        """Not used."""

    @property
    def run(self):  # type: ignore[no-untyped-def]
        """Not used."""
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        """Not used."""
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        """The scripted nodes."""
        return list(NODE_OF.values())

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        """Not used."""
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        """Not used."""
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every scripted reply, with its source node set as the engine would."""
        replies = []
        for message in messages:
            self.sent.append(message)
            reply = self.answer(message)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
                replies.append(reply)
        return replies


def strategy(policy: RoundPolicy) -> IAUFed:
    """IAUFed over the four scripted clients (float32 wire, plain SGD step with eta = 1)."""
    directory = ClientDirectory(node_of=dict(NODE_OF), num_train=dict(NUM_TRAIN), num_heldout={p: 1 for p in NUM_TRAIN})
    return IAUFed(
        layout=LAYOUT,
        iau=one_step(eta=1.0, step_rule="sgd"),
        directory=directory,
        policy=policy,
        train=TrainSettings(epochs=1, lr=0.1, batch_size=4, optimizer="sgd"),
        seed=0,
    )


def model_arrays() -> ArrayRecord:
    return gradient_record(np.linspace(-1, 1, 8))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@given(contributions=st.lists(vectors, min_size=4, max_size=4), bad=st.sampled_from([2, 3]), where=st.integers(0, 7))
def test_malformed_correction_replies_are_never_aggregated(corruption, contributions, bad, where):
    """One client always answers malformed: with renormalisation the update is what the valid ones give, never NaN."""
    arrays = model_arrays()
    version = model_version(arrays)
    partition_of = {nid: p for p, nid in NODE_OF.items()}

    def answer(message: Message) -> Message:
        p = partition_of[message.metadata.dst_node_id]
        corrupt = corruption if p == bad else None
        return gradient_reply(message, contributions[p], NUM_TRAIN[p], version, corrupt, where)

    iau = strategy(RoundPolicy(retries=1, on_missing="renormalise"))
    request = DeletionRequest(client=0)
    new, report = iau.unlearn(ScriptedGrid(answer), arrays, request, NUM_TRAIN[0])
    remaining = sum(NUM_TRAIN.values()) - NUM_TRAIN[0]
    answered = [p for p in (1, 2, 3) if p != bad]
    n_answered = sum(NUM_TRAIN[p] for p in answered)
    wire = [torch.from_numpy(c.astype(np.float32).astype(np.float64)) for c in contributions]
    direction = sum(wire[p] for p in answered) * (remaining / n_answered) + wire[0]
    expected = arrays_to_vector(arrays, LAYOUT) - direction
    got = arrays_to_vector(new, LAYOUT)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected.to(torch.float32).to(torch.float64), rtol=1e-5, atol=1e-5)
    assert report.status == "renormalised" and report.missing_clients == [bad]
    assert [r["partition"] for r in report.rejected] == [bad, bad]  # first attempt and the retry
    assert report.rounds == 2 and report.retries == 1


def with_aggregate_cache(iau: IAUFed, arrays: ArrayRecord, total: np.ndarray) -> IAUFed:
    """The state `fill_caches(upload=True)` leaves: G_tot over every client's examples at `arrays`' version."""
    iau.gradient_total = torch.from_numpy(total.astype(np.float64))
    iau.gradient_total_count = sum(NUM_TRAIN.values())
    iau.gradient_total_version = model_version(arrays)
    iau.gradient_total_arrays = arrays
    return iau


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@given(contributions=st.lists(vectors, min_size=5, max_size=5))
def test_abort_policy_raises_and_leaves_state_unchanged(corruption, contributions):
    arrays = model_arrays()
    version = model_version(arrays)
    partition_of = {nid: p for p, nid in NODE_OF.items()}

    def answer(message: Message) -> Message:
        p = partition_of[message.metadata.dst_node_id]
        return gradient_reply(message, contributions[p], NUM_TRAIN[p], version, corruption if p == 3 else None)

    iau = with_aggregate_cache(strategy(RoundPolicy(retries=2, on_missing="abort")), arrays, contributions[4])
    before = strategy_state(iau)
    with pytest.raises(UnlearningAbortedError, match=r"client\(s\) \[3\] did not answer") as err:
        iau.unlearn(ScriptedGrid(answer), arrays, DeletionRequest(client=0), NUM_TRAIN[0])
    assert err.value.report["status"] == "aborted" and len(err.value.report["rejected"]) == 3
    assert strategy_state(iau) == before
    assert iau.ledger == () and iau.current_examples() == sum(NUM_TRAIN.values())


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@given(contributions=st.lists(vectors, min_size=3, max_size=3))
def test_cached_protocol_abort_leaves_the_aggregate_cache_unchanged(corruption, contributions):
    """Client u answers step 1 of a two-step cached correction, then sends a malformed reply: G_tot is not reduced by G_S."""
    arrays = model_arrays()
    version = model_version(arrays)
    answered: list[int] = []

    def answer(message: Message) -> Message:
        answered.append(message.metadata.dst_node_id)
        config = message.content.config_records[keys.CONFIG]
        echoed = str(config[keys.MODEL_VERSION]) if keys.MODEL_VERSION in config else version
        step = len(answered)
        return gradient_reply(
            message, contributions[min(step, 2) - 1], NUM_TRAIN[0], echoed, corruption if step > 1 else None, count_key=keys.FORGET_SIZE
        )

    iau = with_aggregate_cache(strategy(RoundPolicy(retries=1, on_missing="abort")), arrays, contributions[2])
    iau.iau = one_step(eta=1.0, step_rule="sgd", steps=2)
    before = strategy_state(iau)
    with pytest.raises(UnlearningAbortedError):
        iau.unlearn(ScriptedGrid(answer), arrays, DeletionRequest(client=0), NUM_TRAIN[0], protocol="cached")
    assert set(answered) == {NODE_OF[0]} and len(answered) == 3  # step 1, then step 2 and its retry
    assert strategy_state(iau) == before


def train_reply(to: Message, tensors: dict[str, np.ndarray], count: float) -> Message:
    return Message(RecordDict({keys.ARRAYS: record_of(tensors), keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: count})}), reply_to=to)


TRAIN_CORRUPTIONS = ("shape", "nan", "inf", "dtype", "missing", "extra", "zero-count", "negative-count", "two-records")


@pytest.mark.parametrize("corruption", TRAIN_CORRUPTIONS)
@given(models=st.lists(vectors, min_size=3, max_size=3), counts=st.lists(st.integers(1, 50), min_size=3, max_size=3), bad=st.integers(0, 2))
def test_malformed_training_replies_are_left_out_of_fedavg(corruption, models, counts, bad):
    fedavg = UnlearningFedAvg(
        directory=ClientDirectory(node_of={p: NODE_OF[p] for p in range(3)}, num_train={p: 10 for p in range(3)}),
        train=TrainSettings(epochs=1, lr=0.1, batch_size=4, optimizer="sgd"),
        seed=0,
    )
    template = model_arrays()
    fedavg._last_arrays = template
    replies = []
    for p in range(3):
        tensors = {"w": models[p][:6].reshape(3, 2).astype("float32"), "b": models[p][6:].astype("float32")}
        count: float = counts[p]
        if p == bad:
            if corruption == "shape":
                tensors["w"] = tensors["w"].reshape(2, 3)
            elif corruption in ("nan", "inf"):
                tensors["b"] = np.array([1.0, np.nan if corruption == "nan" else np.inf], dtype="float32")
            elif corruption == "dtype":
                tensors["w"] = tensors["w"].astype("float64")
            elif corruption == "missing":
                del tensors["b"]
            elif corruption == "extra":
                tensors["c"] = np.zeros(1, dtype="float32")
            elif corruption == "zero-count":
                count = 0
            elif corruption == "negative-count":
                count = -count
        reply = train_reply(request_message(NODE_OF[p], message_type=keys.TRAIN), tensors, count)
        if p == bad and corruption == "two-records":
            reply.content["second"] = record_of(tensors)
        reply.metadata.__dict__["_src_node_id"] = NODE_OF[p]
        replies.append(reply)
    arrays, _ = fedavg.aggregate_train(1, replies)
    good = [p for p in range(3) if p != bad]
    weights = np.array([counts[p] for p in good], dtype=np.float64)
    expected = sum(models[p].astype(np.float32).astype(np.float64) * w for p, w in zip(good, weights, strict=True)) / weights.sum()
    got = np.concatenate([arrays["w"].numpy().reshape(-1), arrays["b"].numpy()]).astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert [r["partition"] for r in fedavg.rejected] == [bad]
    with pytest.raises(InvalidReplyError):
        check_train_reply(replies[bad], template)


def test_norm_bound_clips_or_rejects_a_huge_contribution():
    vector = torch.full((8,), 1e6 / np.sqrt(8), dtype=torch.float64)
    clipped, was_clipped = bound_norm(vector, 2.0, "clip", "client 3")
    assert was_clipped and float(clipped.norm()) == pytest.approx(2.0)
    torch.testing.assert_close(clipped / clipped.norm(), vector / vector.norm())
    small = torch.ones(8, dtype=torch.float64) * 0.1
    assert bound_norm(small, 2.0, "clip", "client 1") == (small, False)
    assert bound_norm(vector, 0.0, "reject", "client 3")[1] is False  # 0 = no bound
    with pytest.raises(InvalidReplyError, match="client 3: contribution norm 1e\\+06 exceeds the bound 2"):
        bound_norm(vector, 2.0, "reject", "client 3")


def test_withdrawal_requests_are_checked():
    directory = ClientDirectory(node_of=dict(NODE_OF), num_train=dict(NUM_TRAIN))
    request = DeletionRequest(client=2)
    assert check_withdrawal(directory, (), request, requester=NODE_OF[2]) is False
    with pytest.raises(WithdrawalRequestError, match=f"node {NODE_OF[1]} asked to withdraw the data of client 2.*only the node itself"):
        check_withdrawal(directory, (), request, requester=NODE_OF[1])
    with pytest.raises(WithdrawalRequestError, match="unknown client 7: known partitions are 0..3"):
        check_withdrawal(directory, (), DeletionRequest(client=7), requester=None)
    served = (DeletionRequest(client=2, at_round=3),)
    assert check_withdrawal(directory, served, request, requester=NODE_OF[2]) is True  # a repeat: idempotent
    with pytest.raises(WithdrawalRequestError, match="client 2 has already withdrawn entirely"):
        check_withdrawal(directory, served, DeletionRequest(client=2, samples="poisoned"))
    # A sample-level request does not withdraw the client: another one for it is served.
    assert check_withdrawal(directory, (DeletionRequest(client=1, samples="poisoned"),), DeletionRequest(client=1)) is False


def test_unlearn_refuses_a_request_from_another_node():
    iau = strategy(RoundPolicy())
    grid = ScriptedGrid(lambda m: None)
    with pytest.raises(WithdrawalRequestError, match="only the node itself"):
        iau.unlearn(grid, model_arrays(), DeletionRequest(client=0), NUM_TRAIN[0], requester=NODE_OF[3])
    assert grid.sent == []  # refused before anything was sent
