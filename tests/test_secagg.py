"""Secure aggregation (SecAgg+ over the Message API): the unmasked sum, what the server sees, dropouts, the IAU runs.

The protocol tests drive `strategies.secagg.secure_sum` in-process (LocalGrid) over clients that each hold a fixed
vector; the expected sums are plain numpy sums of those vectors, the bound is n' * Delta / 2 per coordinate.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from scipy import stats

from fedunlearn.gradients import ParamLayout
from fedunlearn.secagg import FIELD, Quantiser, SecAggSettings, threshold_for
from strategies import keys, secagg
from strategies.directory import ClientDirectory
from strategies.local_grid import LocalGrid
from strategies.runtime import partition_of, reply

P = 512
BOUND = 4.0


class VectorRuntime:
    """What the collect step needs of a runtime: the layout the vector is flattened in (one tensor of P entries)."""

    layout = ParamLayout.of(torch.nn.Linear(P, 1, bias=False))


class VectorClients(ClientApp):
    """Clients whose inner query answers a fixed vector; `drop[message_type]` lists the partitions that fail it."""

    def __init__(self, vectors: dict[int, np.ndarray], drop: dict[str, set[int]] | None = None) -> None:
        super().__init__()
        self.vectors = vectors
        self.drop = drop or {}
        self.runtime = VectorRuntime()

    def inner(self, runtime: object, msg: Message, context: Context) -> Message:
        vector = torch.from_numpy(self.vectors[partition_of(context)]).reshape(1, P)
        return reply(msg, {keys.NUM_EXAMPLES: 1}, {keys.GRADIENT: ArrayRecord({"weight": vector})}, version="v")

    def __call__(self, message: Message, context: Context) -> Message:
        kind = message.metadata.message_type
        if partition_of(context) in self.drop.get(kind, set()):
            raise RuntimeError(f"dropped out of {kind}")
        step = {keys.QUERY_SECAGG_SETUP: secagg.setup, keys.QUERY_SECAGG_SHARE_KEYS: secagg.share_keys,
                keys.QUERY_SECAGG_UNMASK: secagg.unmask_shares}.get(kind)
        if step is not None:
            return step(self.runtime, message, context)  # type: ignore[arg-type]
        return secagg.collect(self.runtime, message, context, inner=self.inner)  # type: ignore[arg-type]


class Recording(Grid):
    """A LocalGrid that keeps a copy of every message the server sends and receives."""

    def __init__(self, grid: LocalGrid) -> None:
        self.grid = grid
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.sent += [copy.deepcopy(m) for m in messages]
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.received += [copy.deepcopy(r) for r in replies]
        return replies

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def set_run(self, run):  # type: ignore[no-untyped-def]
        """Not used."""

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def vectors_for(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    """n vectors inside the norm bound, with structure (a shared trend plus noise) a leak would correlate with."""
    rng = np.random.default_rng(seed)
    trend = np.sin(np.arange(P) / 7.0)
    out = {}
    for p in range(n):
        v = trend * (p + 1) + rng.normal(size=P)
        out[p] = v * (0.9 * BOUND / np.linalg.norm(v))
    return out


def run_sum(vectors: dict[int, np.ndarray], drop: dict[str, set[int]] | None = None, threshold: float = 0.0,
            retries: int = 0) -> tuple[secagg.SecureSum, Recording]:
    n = len(vectors)
    local = LocalGrid(VectorClients(vectors, drop), n, capture_errors=True)
    grid = Recording(local)
    directory = ClientDirectory(node_of={p: nid for p, nid in enumerate(local.node_ids)}, num_train={p: 1 for p in range(n)})
    messages = [Message(RecordDict(), dst_node_id=directory.node_of[p], message_type=keys.QUERY_GRADIENT) for p in range(n)]
    result = secagg.secure_sum(grid, messages, directory=directory, phase="test", parse=lambda p, r: r, length=P,
                               settings=SecAggSettings(BOUND, threshold), retries=retries)
    return result, grid


# ----- the sum -------------------------------------------------------------------------------------------------------
DROPS = [
    (3, {}),
    (10, {}),
    (5, {keys.QUERY_SECAGG_COLLECT: {1}}),                      # dropped before its masked vector: its pairwise masks removed
    (10, {keys.QUERY_SECAGG_SETUP: {0}, keys.QUERY_SECAGG_SHARE_KEYS: {3}, keys.QUERY_SECAGG_COLLECT: {5, 9}}),  # 4 = n - t
    (10, {keys.QUERY_SECAGG_UNMASK: {2, 4, 6, 8}}),             # dropped after sending it: still in the sum
    (20, {keys.QUERY_SECAGG_COLLECT: set(range(0, 18, 2))}),    # 9 of 20 dropped, t = 11
]


@pytest.mark.parametrize(("n", "drop"), DROPS, ids=[f"n{n}-drop{sum(map(len, d.values()))}" for n, d in DROPS])
def test_the_unmasked_sum_equals_the_plain_sum_of_the_contributors_within_the_bound(n, drop):
    vectors = vectors_for(n)
    result, _ = run_sum(vectors, drop)
    before_collect = drop.get(keys.QUERY_SECAGG_SETUP, set()) | drop.get(keys.QUERY_SECAGG_SHARE_KEYS, set()) | drop.get(keys.QUERY_SECAGG_COLLECT, set())
    contributors = sorted(set(range(n)) - before_collect)
    assert result.report["contributors"] == contributors
    assert result.missing == sorted(before_collect)
    expected = np.sum([vectors[p] for p in contributors], axis=0)     # the plain sum, numpy's own
    error = np.abs(result.total.numpy() - expected)
    step = 2 * BOUND / ((FIELD - 1) // n)                             # Delta, written out: 2B / floor((2^32 - 1) / n)
    assert error.max() <= len(contributors) * step / 2 * (1 + 1e-9), (error.max(), step)
    assert result.report["error_bound"]["per_coordinate"] == pytest.approx(len(contributors) * step / 2)
    assert result.report["clipped"] == 0


def test_a_vector_over_the_bound_is_clipped_by_its_client_and_only_the_count_is_learnt():
    vectors = vectors_for(4)
    vectors[2] = vectors[2] * (3 * BOUND / np.linalg.norm(vectors[2]))
    result, grid = run_sum(vectors)
    clipped = vectors[2] * (BOUND / np.linalg.norm(vectors[2]))
    expected = vectors[0] + vectors[1] + clipped + vectors[3]
    assert np.abs(result.total.numpy() - expected).max() <= result.report["error_bound"]["per_coordinate"]
    assert result.report["clipped"] == 1
    replies = [r for r in grid.received if keys.SECAGG_MASKED in r.content.array_records]
    assert all(dict(r.content.config_records[keys.SECAGG]).keys() == {"session"} for r in replies)  # no per-client flag


def test_dropouts_past_the_threshold_abort_the_round():
    n = 10
    assert threshold_for(0.0, n) == 6
    with pytest.raises(secagg.SecAggAbortedError, match="threshold is 6"):
        run_sum(vectors_for(n), {keys.QUERY_SECAGG_COLLECT: {0, 1, 2, 3, 4}})
    with pytest.raises(secagg.SecAggAbortedError, match="unmask stage"):   # the vectors arrived but too few shares come back
        run_sum(vectors_for(n), {keys.QUERY_SECAGG_UNMASK: {0, 1, 2, 3, 4}})
    result, _ = run_sum(vectors_for(n), {keys.QUERY_SECAGG_COLLECT: {0, 1, 2, 3, 4}}, threshold=5)  # a lower threshold tolerates it
    assert len(result.report["contributors"]) == 5


def test_a_dropout_is_retried_per_the_policy():
    class Once(VectorClients):
        def __call__(self, message: Message, context: Context) -> Message:
            if message.metadata.message_type == keys.QUERY_SECAGG_COLLECT and partition_of(context) == 1 and not self.drop.get("done"):
                self.drop["done"] = {1}
                raise RuntimeError("transient")
            return super().__call__(message, context)

    vectors = vectors_for(4)
    local = LocalGrid(Once(vectors), 4, capture_errors=True)
    directory = ClientDirectory(node_of={p: nid for p, nid in enumerate(local.node_ids)}, num_train={p: 1 for p in range(4)})
    messages = [Message(RecordDict(), dst_node_id=directory.node_of[p], message_type=keys.QUERY_GRADIENT) for p in range(4)]
    result = secagg.secure_sum(local, messages, directory=directory, phase="test", parse=lambda p, r: r, length=P,
                               settings=SecAggSettings(BOUND), retries=1)
    assert result.missing == [] and result.report["attempts"] == 5
    assert np.abs(result.total.numpy() - sum(vectors.values())).max() <= result.report["error_bound"]["per_coordinate"]


def test_each_stage_is_metered_on_its_own():
    result, grid = run_sum(vectors_for(5))
    stages = result.report["stages"]
    assert list(stages) == list(secagg.STAGES)
    assert all(stages[s]["rounds"] == 1 and stages[s]["participations"] == 5 for s in secagg.STAGES)
    assert sum(s["rounds"] for s in stages.values()) == len([m for m in grid.sent if m.metadata.dst_node_id]) // 5
    assert stages["collect-masked"]["bytes_up"] >= 5 * 4 * (P + 1)


# ----- what the server sees ------------------------------------------------------------------------------------------
def arrays_in(message: Message) -> list[np.ndarray]:
    """Every numeric array a message carries (array records, and config values decoded as uint32/float64/float32)."""
    out = [np.asarray(a.numpy()).ravel() for record in message.content.array_records.values() for a in record.values()]
    for record in message.content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes) and len(item) >= 4 * P:
                    out += [np.frombuffer(item[: len(item) // 8 * 8], dtype=d) for d in ("<u4", "<f8", "<f4")]
    return out


def test_no_message_the_server_receives_equals_or_correlates_with_a_client_vector():
    vectors = vectors_for(5)
    _, grid = run_sum(vectors)
    quantiser = Quantiser.for_clients(BOUND, 5)
    seen = [a for m in grid.received for a in arrays_in(m)]
    assert len(seen) >= 5                     # every masked vector is there
    for vector, array in itertools.product(vectors.values(), seen):
        if array.size < P:
            continue
        head = array[:P].astype(np.float64)
        assert not np.allclose(head, vector, atol=1e-3)
        assert not np.array_equal(array[:P], quantiser.quantise(vector))
        r = np.corrcoef(head, vector)[0, 1] if head.std() > 0 else 0.0
        assert abs(r) < 5 / np.sqrt(P), r   # 5 standard errors of an uncorrelated pair


def test_a_masked_vector_is_uniform_on_the_field_whatever_the_vector():
    for scale in (0.0, 1.0):                 # the all-zero vector and a structured one look alike
        vectors = {p: v * scale for p, v in vectors_for(4).items()}
        _, grid = run_sum(vectors)
        masked = np.concatenate([r.content.array_records[keys.SECAGG_MASKED]["masked"].numpy()[:P] for r in grid.received
                                 if keys.SECAGG_MASKED in r.content.array_records]).astype(np.float64)
        assert stats.kstest(masked / FIELD, "uniform").pvalue > 1e-3
        counts, _ = np.histogram(masked, bins=16, range=(0, FIELD))
        assert stats.chisquare(counts).pvalue > 1e-3


def test_changing_one_clients_vector_changes_only_its_masked_message_and_by_the_vector_alone(monkeypatch):
    """With the seeds fixed, client 0's message moves by q(x') - q(x) mod 2^32, the others' not at all: the mask does
    not depend on the vector (a one-time pad), and it is uniform (the test above)."""
    import fedunlearn.secagg as math_module

    keys_made = [math_module.key_pair() for _ in range(40)]

    def fixed_secrets():
        counter = itertools.count()
        monkeypatch.setattr(secagg, "key_pair", lambda: keys_made[next(counter) % 40])
        monkeypatch.setattr(secagg.os, "urandom", lambda k: bytes([next(counter) % 256]) * k)

    vectors = vectors_for(4)
    changed = dict(vectors)
    changed[0] = -vectors[0][::-1].copy()
    masked = []
    for vs in (vectors, changed):
        fixed_secrets()
        _, grid = run_sum(vs)
        masked.append({r.metadata.src_node_id: r.content.array_records[keys.SECAGG_MASKED]["masked"].numpy()
                       for r in grid.received if keys.SECAGG_MASKED in r.content.array_records})
    quantiser = Quantiser.for_clients(BOUND, 4)
    node0 = sorted(masked[0])[0]
    assert all(np.array_equal(masked[0][n], masked[1][n]) for n in masked[0] if n != node0)
    moved = (masked[1][node0][:P] - masked[0][node0][:P]).astype(np.uint32)
    assert np.array_equal(moved, (quantiser.quantise(changed[0]) - quantiser.quantise(vectors[0])).astype(np.uint32))
