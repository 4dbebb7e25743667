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
from fedunlearn.secagg import FIELD, Quantiser, SecAggSettings, neighbourhood_size, neighbourhoods, threshold_for
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
        step = {
            keys.QUERY_SECAGG_SETUP: secagg.setup,
            keys.QUERY_SECAGG_SHARE_KEYS: secagg.share_keys,
            keys.QUERY_SECAGG_UNMASK: secagg.unmask_shares,
        }.get(kind)
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


def run_sum(
    vectors: dict[int, np.ndarray], drop: dict[str, set[int]] | None = None, threshold: float = 0.0, retries: int = 0
) -> tuple[secagg.SecureSum, Recording]:
    n = len(vectors)
    local = LocalGrid(VectorClients(vectors, drop), n, capture_errors=True)
    grid = Recording(local)
    directory = ClientDirectory(node_of={p: nid for p, nid in enumerate(local.node_ids)}, num_train={p: 1 for p in range(n)})
    messages = [Message(RecordDict(), dst_node_id=directory.node_of[p], message_type=keys.QUERY_GRADIENT) for p in range(n)]
    result = secagg.secure_sum(
        grid,
        messages,
        directory=directory,
        phase="test",
        parse=lambda p, r: r,
        length=P,
        settings=SecAggSettings(BOUND, threshold),
        retries=retries,
    )
    return result, grid


# ----- the sum -------------------------------------------------------------------------------------------------------
DROPS = [
    (3, {}),
    (10, {}),
    (5, {keys.QUERY_SECAGG_COLLECT: {1}}),  # dropped before its masked vector: its pairwise masks removed
    (10, {keys.QUERY_SECAGG_SETUP: {0}, keys.QUERY_SECAGG_SHARE_KEYS: {3}, keys.QUERY_SECAGG_COLLECT: {5, 9}}),  # 4 = n - t
    (10, {keys.QUERY_SECAGG_UNMASK: {2, 4, 6, 8}}),  # dropped after sending it: still in the sum
    (20, {keys.QUERY_SECAGG_SHARE_KEYS: {7}, keys.QUERY_SECAGG_COLLECT: {0, 10, 15}}),  # SecAgg+: 11 neighbours each, t = 6
    (40, {keys.QUERY_SECAGG_COLLECT: {1, 2, 3}, keys.QUERY_SECAGG_UNMASK: {4, 5}}),  # 13 neighbours each, t = 7
]


@pytest.mark.parametrize(("n", "drop"), DROPS, ids=[f"n{n}-drop{sum(map(len, d.values()))}" for n, d in DROPS])
def test_the_unmasked_sum_equals_the_plain_sum_of_the_contributors_within_the_bound(n, drop):
    vectors = vectors_for(n)
    result, _ = run_sum(vectors, drop)
    before_collect = (
        drop.get(keys.QUERY_SECAGG_SETUP, set())
        | drop.get(keys.QUERY_SECAGG_SHARE_KEYS, set())
        | drop.get(keys.QUERY_SECAGG_COLLECT, set())
    )
    contributors = sorted(set(range(n)) - before_collect)
    assert result.report["contributors"] == contributors
    assert result.missing == sorted(before_collect)
    expected = np.sum([vectors[p] for p in contributors], axis=0)  # the plain sum, numpy's own
    error = np.abs(result.total.numpy() - expected)
    step = 2 * BOUND / ((FIELD - 1) // n)  # Delta, written out: 2B / floor((2^32 - 1) / n)
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
    assert neighbourhood_size(n) == 9 and threshold_for(0.0, 9) == 5  # each client keeps 4 of its 8 neighbours and itself
    with pytest.raises(secagg.SecAggAbortedError, match="threshold of 5"):
        run_sum(vectors_for(n), {keys.QUERY_SECAGG_COLLECT: {0, 1, 2, 3, 4, 5}})
    with pytest.raises(secagg.SecAggAbortedError, match="unmask stage"):  # the vectors arrived but too few shares come back
        run_sum(vectors_for(n), {keys.QUERY_SECAGG_UNMASK: {0, 1, 2, 3, 4, 5}})
    result, _ = run_sum(vectors_for(n), {keys.QUERY_SECAGG_COLLECT: {0, 1, 2, 3, 4, 5}}, threshold=3)  # a lower threshold tolerates it
    assert result.report["contributors"] == [6, 7, 8, 9]


def test_secagg_plus_neighbourhoods_are_a_symmetric_ring_of_log_n_clients():
    assert [neighbourhood_size(n) for n in (2, 3, 5, 10, 20, 100, 1000)] == [2, 3, 5, 9, 11, 15, 21]
    order = [3, 0, 4, 1, 2, 6, 5, 7, 9, 8, 11, 10]
    near = neighbourhoods(order, 5)
    assert all(p in near[p] and len(near[p]) == 5 for p in order)
    assert all(p in near[q] for p in order for q in near[p])  # symmetric: pairwise masks cancel in pairs
    assert near[3] == sorted([10, 11, 3, 0, 4])


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
    result = secagg.secure_sum(
        local, messages, directory=directory, phase="test", parse=lambda p, r: r, length=P, settings=SecAggSettings(BOUND), retries=1
    )
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
    assert len(seen) >= 5  # every masked vector is there
    for vector, array in itertools.product(vectors.values(), seen):
        if array.size < P:
            continue
        head = array[:P].astype(np.float64)
        assert not np.allclose(head, vector, atol=1e-3)
        assert not np.array_equal(array[:P], quantiser.quantise(vector))
        r = np.corrcoef(head, vector)[0, 1] if head.std() > 0 else 0.0
        assert abs(r) < 5 / np.sqrt(P), r  # 5 standard errors of an uncorrelated pair


def seeded_secrets(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Every secret the protocol draws (seeds, key pairs) from one seeded generator: a statistical test that repeats."""
    import random

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    rng = random.Random(seed)

    def key_pair() -> tuple[bytes, bytes]:
        private = X25519PrivateKey.from_private_bytes(rng.randbytes(32))
        return (
            private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )

    monkeypatch.setattr(secagg, "key_pair", key_pair)
    monkeypatch.setattr(secagg.os, "urandom", rng.randbytes)


def test_a_masked_vector_is_uniform_on_the_field_whatever_the_vector(monkeypatch):
    seeded_secrets(monkeypatch, 0)
    for scale in (0.0, 1.0):  # the all-zero vector and a structured one look alike
        vectors = {p: v * scale for p, v in vectors_for(4).items()}
        _, grid = run_sum(vectors)
        masked = np.concatenate(
            [
                r.content.array_records[keys.SECAGG_MASKED]["masked"].numpy()[:P]
                for r in grid.received
                if keys.SECAGG_MASKED in r.content.array_records
            ]
        ).astype(np.float64)
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
        masked.append(
            {
                r.metadata.src_node_id: r.content.array_records[keys.SECAGG_MASKED]["masked"].numpy()
                for r in grid.received
                if keys.SECAGG_MASKED in r.content.array_records
            }
        )
    quantiser = Quantiser.for_clients(BOUND, 4)
    node0 = sorted(masked[0])[0]
    assert all(np.array_equal(masked[0][n], masked[1][n]) for n in masked[0] if n != node0)
    moved = (masked[1][node0][:P] - masked[0][node0][:P]).astype(np.uint32)
    assert np.array_equal(moved, (quantiser.quantise(changed[0]) - quantiser.quantise(vectors[0])).astype(np.uint32))


# ----- IAU-Fed under secure aggregation -------------------------------------------------------------------------------
import tempfile  # noqa: E402
from collections import OrderedDict  # noqa: E402

from fedunlearn.config import build_config  # noqa: E402
from fedunlearn.errors import ConfigError, MissingRepliesError, UnlearningAbortedError  # noqa: E402
from fedunlearn.models import build_model  # noqa: E402
from simulations.runner import Experiment  # noqa: E402
from strategies import app_config  # noqa: E402
from strategies.client_app import build_client_app  # noqa: E402
from strategies.faults import with_faults  # noqa: E402
from strategies.library import unlearning_strategy  # noqa: E402

NORM_BOUND = 50.0  # above every contribution of these runs (the reports show 0 clipped): plain and secure clip alike
RUN = {
    "model": "mlp",
    "rounds": 2,
    "methods": "retrain,iau,iau-cached",
    "shadow_mia": False,
    "mia_attacks": "loss",
    "gradient_norm_bound": NORM_BOUND,
    "iau_repair_rounds": 0,
    "unlearn_retries": 0,
}


class DropStage(ClientApp):
    """Wraps a ClientApp: partitions in `drop[message_type]` fail that message type (`times` times, -1: always)."""

    def __init__(self, inner: ClientApp, drop: dict[str, set[int]], times: int = -1) -> None:
        super().__init__()
        self.inner, self.drop, self.left = inner, drop, {}
        self.times = times

    def __call__(self, message: Message, context: Context) -> Message:
        kind, pid = message.metadata.message_type, partition_of(context)
        if pid in self.drop.get(kind, set()):
            left = self.left.setdefault((kind, pid), self.times)
            if left != 0:
                self.left[(kind, pid)] = left - 1
                raise RuntimeError(f"dropped out of {kind}")
        return self.inner(message, context)


def experiment(secure: bool, **overrides: object) -> dict:
    cfg = build_config("smoke", overrides={**RUN, "secure_aggregation": secure, **overrides})
    run = Experiment(cfg, out_dir=None, show_progress=False)
    app = with_faults(build_client_app(app_config.client_spec_for(cfg, tempfile.mkdtemp())), app_config.fault_plan_for(cfg))
    run.drive(LocalGrid(app, cfg.num_clients, capture_errors=True))
    return run.results


def test_a_whole_iau_run_under_secure_aggregation_matches_the_plain_run_within_the_quantisation_error():
    plain, secure = experiment(False), experiment(True)
    fresh = secure["models"]["iau"]["unlearning"]
    assert fresh["status"] == "complete" and len(fresh["secure_aggregation"]) == fresh["steps"] == 2
    assert all(r["status"] == "complete" and r["clipped"] == 0 for r in fresh["secure_aggregation"])
    caching = secure["final_evaluation"]["secure_aggregation"]
    assert caching["status"] == "complete" and caching["clipped"] == 0 and caching["contributors"] == list(range(5))
    assert "secure_aggregation" not in plain["final_evaluation"] and not plain["models"]["iau"]["unlearning"]["secure_aggregation"]
    for name in ("iau", "iau-cached"):
        p, s = plain["models"][name], secure["models"][name]
        # How far the unlearned model may move: each normalised step theta - rho ||theta|| d/||d|| moves by at most
        # 2 rho ||theta|| ||e|| / ||d|| for an error e in d: the quantisation's l2 bound, plus float32 on the plain wire.
        theta = p["dist_para"] / p["dist_para_normalized"] + p["dist_para"]  # ||theta_ref|| + ||theta - theta_ref||
        rho = 0.04
        if name == "iau":
            errors = [(r["error_bound"]["l2"], d) for r, d in zip(fresh["secure_aggregation"], [fresh["direction_norm"]] * 2, strict=True)]
        else:  # d = lambda (G_tot - G_S) / (n - |S|) - G_S/|S|: G_tot's error enters scaled by lambda / (n - |S|)
            weight = 3.0 / s["unlearning"]["remaining_count"]
            errors = [(weight * caching["error_bound"]["l2"], s["unlearning"]["direction_norm"])] * s["unlearning"]["steps"]
        moved = sum(2 * rho * theta * (e / d + 1e-6) for e, d in errors)  # 1e-6: float32's 6e-8 per entry, generously
        assert abs(s["dist_para"] - p["dist_para"]) <= moved, (name, s["dist_para"], p["dist_para"], moved)
        for metric in ("acc_test", "acc_deleted", "backdoor_asr"):
            assert s[metric] == p[metric], (name, metric)
    assert secure["models"]["retrain"]["acc_test"] == plain["models"]["retrain"]["acc_test"]  # FedAvg: plain in both


def test_the_secure_correction_round_costs_four_rounds_per_step_and_names_its_stages():
    results = experiment(True, methods="retrain,iau")
    unlearning = results["models"]["iau"]["unlearning"]
    assert results["models"]["iau"]["cost"]["rounds"] == 4 * unlearning["steps"]
    for report in unlearning["secure_aggregation"]:
        assert list(report["stages"]) == list(secagg.STAGES) and all(c["rounds"] == 1 for c in report["stages"].values())


def strategy_for(secure_drop: dict[str, set[int]], times: int = -1, retries: int = 0):
    cfg = build_config("smoke", overrides={**RUN, "secure_aggregation": True, "unlearn_retries": retries})
    spec = app_config.client_spec_for(cfg, tempfile.mkdtemp())
    grid = LocalGrid(DropStage(build_client_app(spec), secure_drop, times), cfg.num_clients, capture_errors=True)
    model = build_model("mlp", (1, 8, 8), 10)
    strategy = unlearning_strategy(
        grid, model, cfg.num_clients, iau=app_config.iau_settings_for(cfg), policy=app_config.round_policy_for(cfg)
    )
    arrays = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items()))
    return strategy, grid, arrays, app_config.deletion_request_for(cfg)


def snapshot(strategy, arrays):
    return (strategy.ledger, dict(strategy._excluded_counts), strategy.gradient_total, {k: v.numpy().copy() for k, v in arrays.items()})


def same(a, b) -> bool:
    return a[:2] == b[:2] and (a[2] is b[2] or torch.equal(a[2], b[2])) and all(np.array_equal(a[3][k], b[3][k]) for k in a[3])


@pytest.mark.parametrize("dropped", [{1}, {1, 2, 3}], ids=["within-threshold", "past-threshold"])
def test_a_client_missing_from_the_secure_correction_aborts_with_the_model_and_the_strategy_unchanged(dropped):
    strategy, grid, arrays, request = strategy_for({keys.QUERY_SECAGG_COLLECT: dropped})
    strategy.fill_caches(grid, arrays)
    before = snapshot(strategy, arrays)
    with pytest.raises(UnlearningAbortedError) as err:
        strategy.unlearn(grid, arrays, request, forget_count=strategy.directory.num_train[request.client])
    assert same(before, snapshot(strategy, arrays))
    report = err.value.report["secure_aggregation"][-1]
    assert report["status"] == ("partial" if len(dropped) == 1 else "aborted")  # t = 3 of 5: one dropout is still summed


def test_past_the_threshold_the_cached_upload_aborts_and_no_aggregate_is_kept():
    strategy, grid, arrays, _ = strategy_for({keys.QUERY_SECAGG_UNMASK: {0, 1, 2}})
    with pytest.raises(MissingRepliesError, match="threshold of 3"):
        strategy.fill_caches(grid, arrays, upload=True)
    assert strategy.gradient_total is None and strategy.client_uploads == {}


def test_a_dropout_retried_per_the_policy_gives_the_plain_direction():
    strategy, grid, arrays, request = strategy_for({keys.QUERY_SECAGG_SHARE_KEYS: {2}, keys.QUERY_SECAGG_COLLECT: {4}}, times=1, retries=1)
    strategy.fill_caches(grid, arrays)
    count = strategy.directory.num_train[request.client]
    secured, report = strategy.unlearn(grid, arrays, request, forget_count=count)
    assert (
        report.status == "complete"
        and report.retries == 2
        and [f["phase"] for f in report.failures] == ["unlearn:secagg-share-keys", "unlearn:secagg-collect-masked"]
    )
    assert [r["attempts"] for r in report.secure_aggregation] == [6, 4]
    plain = strategy.branch()
    plain.ledger, plain._excluded_counts = (), {}
    plain.policy = app_config.round_policy_for(build_config("smoke", overrides={**RUN}))
    expected, _ = plain.unlearn(grid, arrays, request, forget_count=count)
    for name in secured:
        assert np.allclose(secured[name].numpy(), expected[name].numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "needs --gradient-norm-bound > 0"),
        ({"gradient_norm_bound": 5, "gradient_norm_action": "reject"}, "cannot reject a vector it never sees"),
        ({"gradient_norm_bound": 5, "unlearn_policy": "renormalise"}, "use --unlearn-policy abort"),
        ({"gradient_norm_bound": 5, "methods": "retrain,iau,pga,federaser"}, "pga, federaser cannot run under it"),
        ({"gradient_norm_bound": 5, "secagg_threshold": 11}, "secagg-threshold=11"),
    ],
)
def test_what_cannot_run_under_secure_aggregation_is_refused_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config("default", overrides={"secure_aggregation": True, **overrides})
    with pytest.raises(ConfigError, match="no effect without --secure-aggregation"):
        build_config("default", overrides={"secagg_threshold": 3})


def test_cohort_execution_runs_the_secure_rounds_per_virtual_client_with_the_same_result():
    from strategies.cohort import build_cohort_client_app, num_cohorts

    per_node = experiment(True, methods="retrain,iau,iau-cached")
    cfg = build_config(
        "smoke", overrides={**RUN, "secure_aggregation": True, "execution": "cohort", "cohort_size": 2, "cohort_train": "loop"}
    )
    spec = app_config.client_spec_for(cfg, tempfile.mkdtemp())
    run = Experiment(cfg, out_dir=None, show_progress=False)
    run.drive(
        LocalGrid(
            build_cohort_client_app(spec, 2, inner=build_client_app(spec), vectorise=False),
            num_cohorts(cfg.num_clients, 2),
            capture_errors=True,
        )
    )
    cohort = run.results
    for name in ("iau", "iau-cached"):
        assert cohort["models"][name]["status"] == "complete"
        assert cohort["models"][name]["unlearning"]["secure_aggregation"] == [] or all(
            r["contributors"] == list(range(1, 5)) or r["contributors"] == list(range(5))
            for r in cohort["models"][name]["unlearning"]["secure_aggregation"]
        )
        for metric in ("acc_test", "backdoor_asr", "dist_para"):
            assert cohort["models"][name][metric] == pytest.approx(per_node["models"][name][metric], rel=1e-6), (name, metric)


def test_injected_dropouts_hit_the_secure_stages_and_are_retried():
    results = experiment(True, methods="retrain,iau", dropout_prob=0.15, unlearn_retries=3, seed=1)
    unlearning = results["models"]["iau"]["unlearning"]
    attempts = [r["attempts"] for r in unlearning["secure_aggregation"]]
    assert unlearning["status"] == "complete", unlearning["reason"]
    assert sum(attempts) > 4 * len(attempts), attempts  # some stage was asked again
    assert unlearning["retries"] == sum(attempts) - 4 * len(attempts)
    assert {f["phase"] for f in unlearning["failures"]} <= {f"unlearn:secagg-{s}" for s in secagg.STAGES}
    assert all("dropout" in f["reason"] for f in unlearning["failures"]), unlearning["failures"]


def test_a_users_own_app_with_add_unlearning_uploads_g_tot_securely():
    """examples/own-model (Flower's plain ClientApp plus add_unlearning): the secure G_tot equals the plain one."""
    import sys
    from pathlib import Path

    from strategies.rounds import RoundPolicy

    example = Path(__file__).resolve().parents[1] / "examples" / "own-model"
    if str(example) not in sys.path:
        sys.path.insert(0, str(example))
    from ownmodel import client_app
    from ownmodel.task import Net

    grid = LocalGrid(client_app.app, 4)
    net = Net()
    arrays = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in net.state_dict().items()))
    plain = unlearning_strategy(grid, net, 4, policy=RoundPolicy())
    plain.fill_caches(grid, arrays, upload=True)
    secure = unlearning_strategy(grid, net, 4, policy=RoundPolicy(secure=SecAggSettings(100.0)))
    evaluation = secure.fill_caches(grid, arrays, upload=True)
    assert evaluation["secure_aggregation"]["clipped"] == 0 and secure.gradient_total_count == plain.gradient_total_count
    error = (secure.gradient_total - plain.gradient_total).abs().max().item()
    assert error <= evaluation["secure_aggregation"]["error_bound"]["per_coordinate"] + 1e-6 * plain.gradient_total.abs().max().item()


@pytest.mark.ray
def test_the_smoke_preset_on_ray_under_secure_aggregation(tmp_path):
    """On Ray a node may be served by another worker at each stage: the client's secrets travel in its context.state."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.run",
            "--preset",
            "smoke",
            "--model",
            "mlp",
            "--rounds",
            "2",
            "--methods",
            "retrain,iau,iau-cached",
            "--secure-aggregation",
            "--gradient-norm-bound",
            "50",
            "--no-shadow-mia",
            "--mia-attacks",
            "loss",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rounds = results["models"]["iau"]["unlearning"]["secure_aggregation"]
    assert [r["status"] for r in rounds] == ["complete", "complete"] and all(r["contributors"] == list(range(5)) for r in rounds)
    assert results["final_evaluation"]["secure_aggregation"]["status"] == "complete"
    assert results["models"]["iau-cached"]["status"] == "complete"


def test_an_honest_client_never_reveals_both_secrets_of_one_client():
    """A server that, after unmasking client 1's seed, claims client 1 dropped would get its sk1 too, and so its vector."""
    _, grid = run_sum(vectors_for(4))
    last = grid.sent[-1]  # an unmask message of the finished round
    config = dict(last.content.config_records[keys.SECAGG])
    me = grid.grid.node_ids.index(last.metadata.dst_node_id)
    other = next(p for p in config["active"] if p != me)
    lying = {**config, "active": [p for p in config["active"] if p != other], "dead": [other]}
    replies = list(
        grid.grid.send_and_receive(
            [
                Message(
                    RecordDict({keys.SECAGG: secagg._field(lying)}),
                    dst_node_id=last.metadata.dst_node_id,
                    message_type=keys.QUERY_SECAGG_UNMASK,
                )
            ]
        )
    )
    assert replies[0].has_error() and "both secrets" in replies[0].error.reason
    honest = list(
        grid.grid.send_and_receive(
            [
                Message(
                    RecordDict({keys.SECAGG: secagg._field(config)}),
                    dst_node_id=last.metadata.dst_node_id,
                    message_type=keys.QUERY_SECAGG_UNMASK,
                )
            ]
        )
    )
    assert not honest[0].has_error()  # asking the same again (a retry) is answered
