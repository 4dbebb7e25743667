"""The cohort execution mode: vectorised cohort training equals training clients in turn, and a whole run equals per-node mode."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedunlearn.cohort import cohort_local_train, is_vectorisable
from fedunlearn.errors import ConfigError
from fedunlearn.models import build_model
from fedunlearn.training import TrainSettings, local_train
from simulations import runner
from simulations.runner import Experiment
from strategies import app_config
from strategies import cohort as cohort_module
from strategies.client_app import build_client_app
from strategies.cohort import (
    VIRTUAL_NODE_BASE,
    CohortClientApp,
    CohortGrid,
    build_cohort_client_app,
    cohort_partitions,
    cohort_size_for,
    num_cohorts,
    pack,
    unpack,
)
from strategies.faults import with_faults
from strategies.local_grid import LocalGrid

ATOL = 1e-5


# ----- (a) cohort_local_train == K x local_train ------------------------------------------------------------
def reference(model: nn.Module, xs, ys, settings: TrainSettings, seeds):
    """local_train for each client in turn from the same parameters: the ground truth."""
    initial = copy.deepcopy(model.state_dict())
    states, losses = [], []
    for x, y, seed in zip(xs, ys, seeds, strict=True):
        model.load_state_dict(initial)
        losses.append(local_train(model, x, y, settings, torch.Generator().manual_seed(seed)))
        states.append(copy.deepcopy(model.state_dict()))
    model.load_state_dict(initial)
    return states, losses


def client_data(sizes, shape=(1, 8, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=gen) for n in sizes], [torch.randint(0, 10, (n,), generator=gen) for n in sizes]


@pytest.mark.parametrize(
    "settings",
    [
        TrainSettings(epochs=2, lr=0.1, batch_size=8),
        TrainSettings(epochs=2, lr=0.05, batch_size=8, momentum=0.9, weight_decay=0.01),
        TrainSettings(epochs=2, lr=0.1, batch_size=8, gr_alpha=0.05),
        TrainSettings(epochs=2, lr=0.01, batch_size=8, optimizer="adam", weight_decay=0.01),
    ],
    ids=["sgd", "momentum-weight-decay", "gradient-restriction", "adam"],
)
def test_cohort_training_equals_clients_trained_in_turn(settings):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    sizes = [21, 8, 3, 17, 0, 30]  # unequal: padded steps and padded batches; one client without data
    xs, ys = client_data(sizes)
    seeds = [11, 12, 13, 14, 15, 16]
    before = copy.deepcopy(model.state_dict())
    result = cohort_local_train(model, xs, ys, settings, [torch.Generator().manual_seed(s) for s in seeds], chunk_size=4)
    assert result.vectorised
    for name, tensor in model.state_dict().items():  # the model itself is left at the starting parameters
        assert torch.equal(tensor, before[name])
    states, losses = reference(model, xs, ys, settings, seeds)
    for k, (expected, got) in enumerate(zip(states, result.states, strict=True)):
        assert list(got) == list(expected)
        for name in expected:
            assert torch.allclose(got[name], expected[name], atol=ATOL, rtol=0), (k, name, (got[name] - expected[name]).abs().max())
        if sizes[k]:
            assert not torch.equal(got["1.weight"], before["1.weight"])  # it really trained
            assert result.losses[k] == pytest.approx(losses[k], abs=1e-5)
        else:
            assert math.isnan(result.losses[k]) and math.isnan(losses[k])
            assert all(torch.equal(got[n], before[n]) for n in got)  # no data: no step at all


def test_cohort_training_of_a_cnn_with_gradient_restriction():
    torch.manual_seed(1)
    model = build_model("cnn", (1, 8, 8), 10)
    settings = TrainSettings(epochs=1, lr=0.1, batch_size=8, momentum=0.5, gr_alpha=0.01)
    xs, ys = client_data([13, 6])
    states, _ = reference(model, xs, ys, settings, [1, 2])
    result = cohort_local_train(model, xs, ys, settings, [torch.Generator().manual_seed(s) for s in (1, 2)])
    for expected, got in zip(states, result.states, strict=True):
        for name in expected:
            assert torch.allclose(got[name], expected[name], atol=ATOL, rtol=0), name


def test_models_with_batchnorm_fall_back_to_the_sequential_loop():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    assert not is_vectorisable(model) and is_vectorisable(build_model("mlp", (1, 8, 8), 10))
    settings = TrainSettings(epochs=1, lr=0.1, batch_size=8)
    xs, ys = client_data([16, 10])
    states, losses = reference(model, xs, ys, settings, [3, 4])
    result = cohort_local_train(model, xs, ys, settings, [torch.Generator().manual_seed(s) for s in (3, 4)])
    assert not result.vectorised and result.losses == losses
    for expected, got in zip(states, result.states, strict=True):
        assert all(torch.equal(got[n], expected[n]) for n in expected)  # running stats included


# ----- packing and the cohort layout ------------------------------------------------------------------------
def test_pack_sends_a_shared_record_once_and_keeps_errors():
    shared = ArrayRecord(OrderedDict(w=torch.ones(1000)))
    a = RecordDict({"arrays": shared, "config": ConfigRecord({"role": "a"})})
    b = RecordDict({"arrays": shared, "config": ConfigRecord({"role": "b"})})
    packed = pack([(3, a), (4, b), (5, Error(code=0, reason="dropped"))])
    assert len(packed.array_records) == 1
    assert sum(r.count_bytes() for r in packed.values()) < a["arrays"].count_bytes() * 1.5
    (p3, c3), (p4, c4), (p5, e5) = unpack(packed)
    assert (p3, p4, p5) == (3, 4, 5)
    assert c3["arrays"] is c4["arrays"] and c3["config"]["role"] == "a" and c4["config"]["role"] == "b"
    assert list(c3) == ["arrays", "config"]
    assert isinstance(e5, Error) and e5.reason == "dropped"


def test_cohort_layout_and_sizes():
    assert num_cohorts(10, 4) == 3 and list(cohort_partitions(2, 4, 10)) == [8, 9]
    assert cohort_size_for(100, 0, 1.0, cpus=16) == 7 and cohort_size_for(100, 0, 2.0, cpus=16) == 13
    assert cohort_size_for(100, 0, 1.0, 0.25, cpus=16, gpus=1) == 25  # 4 workers share the GPU
    assert cohort_size_for(10, 4) == 4
    assert cohort_size_for(1000, 0, 1.0, cpus=2) == 64  # capped: a cohort's reply holds one model per client
    assert cohort_size_for(1000, 100, 1.0, cpus=2) == 100  # an explicit size is taken as given
    with pytest.raises(ConfigError, match="cohort-size=-1"):
        cohort_size_for(10, -1)


def test_config_validates_execution(small_cfg):
    assert small_cfg.execution == "per-node" and small_cfg.cohort_size == 0
    with pytest.raises(ConfigError, match="execution='cohorts'.*did you mean 'cohort'"):
        small_cfg.replace(execution="cohorts")
    with pytest.raises(ConfigError, match="cohort-size=3 has no effect.*--execution cohort"):
        small_cfg.replace(cohort_size=3)
    with pytest.raises(ConfigError, match="cohort-size=9: must be <= num-clients=4"):
        small_cfg.replace(execution="cohort", cohort_size=9)
    assert small_cfg.replace(execution="cohort", cohort_size=3).cohort_size == 3
    with pytest.raises(ConfigError, match="cohort-train='vamp'.*did you mean 'vmap'"):
        small_cfg.replace(execution="cohort", cohort_train="vamp")
    # auto: the loop on a CPU (vmap over convolutions is slower there), vmap when asked.
    spec = app_config.client_spec_for(small_cfg, "/tmp/unused")
    for train, vectorised in (("auto", False), ("loop", False), ("vmap", True)):
        cfg = small_cfg.replace(execution="cohort", cohort_size=2, cohort_train=train, device="cpu")
        app, nodes = app_config.supernode_app(cfg, spec, build_client_app(spec))
        assert nodes == 2 and app.vectorise_train is vectorised, train


# ----- CohortGrid: replies per virtual client -----------------------------------------------------------------
def echo_app() -> ClientApp:
    """Answers query.echo with its partition id; partition 4 raises."""
    app = ClientApp()

    @app.query("echo")
    def echo(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid == 4:
            raise RuntimeError("client 4 is broken")
        return Message(RecordDict({"metrics": MetricRecord({"pid": pid, "seen": int(msg.content["config"]["x"])})}), reply_to=msg)

    return app


class BrokenNode(CohortClientApp):
    """A cohort app whose whole node fails on query.boom, and which leaves partition 1 out of query.skip replies."""

    def __call__(self, message: Message, context: Context) -> Message:
        if message.metadata.message_type == "query.boom":
            raise RuntimeError("node down")
        reply = super().__call__(message, context)
        if message.metadata.message_type == "query.skip":
            kept = [(p, c) for p, c in unpack(reply.content) if p != 1]
            return Message(pack(kept), reply_to=message)
        return reply


def test_cohort_grid_replies_look_like_per_node_replies(small_cfg, tmp_path):
    cfg = small_cfg.replace(num_clients=5)
    spec = app_config.client_spec_for(cfg, str(tmp_path / "caches"))
    local = LocalGrid(BrokenNode(spec, 2, echo_app()), 3, capture_errors=True)
    grid = CohortGrid(local, num_clients=5, cohort_size=2, timeout=5)
    nodes = list(grid.get_node_ids())
    assert nodes == [VIRTUAL_NODE_BASE + p for p in range(5)]
    config = ConfigRecord({"x": 7})
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type="query.echo") for n in nodes]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=5)}
    assert set(replies) == set(nodes)
    for message in messages:
        reply = replies[message.metadata.dst_node_id]
        assert reply.metadata.reply_to_message_id == message.metadata.message_id
        assert reply.metadata.message_type == "query.echo"
        if message.metadata.dst_node_id == VIRTUAL_NODE_BASE + 4:  # its exception is its own error reply, not its cohort's
            assert reply.has_error() and "client 4 is broken" in reply.error.reason
        else:
            assert reply.content["metrics"]["pid"] == message.metadata.dst_node_id - VIRTUAL_NODE_BASE
            assert reply.content["metrics"]["seen"] == 7
    # A node that fails answers every virtual message it carried with an error; the others are untouched.
    boom = [Message(RecordDict({"config": config}), dst_node_id=n, message_type="query.boom") for n in nodes[:3]]
    replies = list(grid.send_and_receive(boom, timeout=5))
    assert sorted(r.metadata.src_node_id for r in replies) == nodes[:3] and all(r.has_error() for r in replies)
    assert all("node down" in r.error.reason for r in replies)
    # A virtual client left out of a packed reply gets no reply (a dropout), through push/pull as well.
    skip = [Message(RecordDict({"config": config}), dst_node_id=n, message_type="query.skip") for n in nodes[:4]]
    ids = list(grid.push_messages(skip))
    assert len(ids) == 4 and len(local._replies) == 2  # two physical messages for four virtual ones
    replies = list(grid.pull_messages(ids))
    assert sorted(r.metadata.src_node_id for r in replies) == [nodes[0], nodes[2], nodes[3]]


def array_echo_app() -> ClientApp:
    """Answers query.vector with a vector the size of the model it was sent, filled with its partition id."""
    app = ClientApp()

    @app.query("vector")
    def vector(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        size = int(msg.content["model"]["w"].numpy().size)
        record = ArrayRecord({"v": Array(np.full(size, pid, dtype=np.float32))})
        return Message(RecordDict({"vector": record, "metrics": MetricRecord({"pid": pid})}), reply_to=msg)

    return app


class InFlight(LocalGrid):
    """A LocalGrid that records, per node, how many packed messages were pushed and not yet pulled, at most."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.outstanding: dict[int, int] = {}
        self.most: dict[int, int] = {}
        self.pushed_clients: list[int] = []
        self._node_of_reply: dict[str, int] = {}

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, message_id in zip(messages, ids, strict=True):
            node = message.metadata.dst_node_id
            if message.metadata.message_type == "query.cohort":
                continue
            self.outstanding[node] = self.outstanding.get(node, 0) + 1
            self.most[node] = max(self.most.get(node, 0), self.outstanding[node])
            self.pushed_clients.append(len(unpack(message.content)))
            self._node_of_reply[message_id] = node
        return ids

    def pull_messages(self, message_ids):
        for reply in super().pull_messages(message_ids):
            node = self._node_of_reply.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                self.outstanding[node] -= 1
            yield reply


@pytest.mark.parametrize("how", ["send_and_receive", "push-pull"])
def test_replies_of_model_sized_messages_go_in_chunks_one_at_a_time_per_node(small_cfg, tmp_path, how):
    """Each packed message holds at most the budget's worth of clients; a node never has two in flight; the replies are
    the same as from one packed message per node (compared with a grid whose budget fits a whole cohort)."""
    cfg = small_cfg.replace(num_clients=7)
    spec = app_config.client_spec_for(cfg, str(tmp_path / "caches"))
    model = ArrayRecord({"w": Array(np.zeros(1000, dtype=np.float32))})  # 4000 bytes per client's reply
    outcomes = {}
    for budget in (10_000, 10**9):  # two clients per chunk; the whole cohort of 4
        local = InFlight(CohortClientApp(spec, 4, array_echo_app()), 2)
        grid = CohortGrid(local, num_clients=7, cohort_size=4, timeout=5, reply_budget_bytes=budget)
        nodes = list(grid.get_node_ids())
        messages = [Message(RecordDict({"model": model}), dst_node_id=n, message_type="query.vector") for n in nodes]
        if how == "send_and_receive":
            replies = list(grid.send_and_receive(messages, timeout=5))
        else:
            ids = list(grid.push_messages(messages))
            replies = []
            while len(replies) < len(ids):
                pulled = list(grid.pull_messages(ids))
                assert pulled, "a chunk was never pushed"
                replies.extend(pulled)
        by_node = {r.metadata.src_node_id: r for r in replies}
        assert set(by_node) == set(nodes)
        for message in messages:
            reply = by_node[message.metadata.dst_node_id]
            assert reply.metadata.reply_to_message_id == message.metadata.message_id
        outcomes[budget] = (
            {n: (r.content["metrics"]["pid"], r.content["vector"]["v"].numpy().tolist()) for n, r in by_node.items()},
            local.pushed_clients,
            max(local.most.values()),
        )
    chunked, whole = outcomes[10_000], outcomes[10**9]
    assert chunked[0] == whole[0]  # every virtual reply the same
    assert whole[1] == [4, 3] and sorted(chunked[1]) == [1, 2, 2, 2]  # cohort 1 (3 clients) splits evenly: 2 + 1
    assert chunked[2] == 1 and whole[2] == 1  # never two packed messages in flight to one node


# ----- (b) a whole experiment: per-node == cohort --------------------------------------------------------------
def run_experiment(cfg, tmp_path, monkeypatch, mode: str, cohort_size: int = 2, capture_errors: bool = False, vectorise: bool = True):
    """Drive `cfg` in-process; returns (results, every model the evaluator saw, in order)."""
    seen: list[ArrayRecord] = []
    full = runner.Evaluator.full

    def recording(self, arrays, reference, method=None):  # type: ignore[no-untyped-def]
        seen.append(arrays)
        return full(self, arrays, reference, method)

    monkeypatch.setattr(runner.Evaluator, "full", recording)
    spec = app_config.client_spec_for(cfg, str(tmp_path / mode / "caches"))
    inner = with_faults(build_client_app(spec), app_config.fault_plan_for(cfg))
    if mode == "cohort":
        cfg = cfg.replace(execution="cohort", cohort_size=cohort_size, cohort_train="vmap" if vectorise else "loop")
        grid = LocalGrid(
            build_cohort_client_app(spec, cohort_size, inner=inner, vectorise=vectorise),
            num_cohorts(cfg.num_clients, cohort_size),
            capture_errors=capture_errors,
        )
    else:
        grid = LocalGrid(inner, cfg.num_clients, capture_errors=capture_errors)
    experiment = Experiment(cfg, out_dir=None, show_progress=False)
    experiment.drive(grid)
    monkeypatch.setattr(runner.Evaluator, "full", full)
    return experiment.results, seen


def assert_same_run(per_node, cohort):
    (results_a, models_a), (results_b, models_b) = per_node, cohort
    assert results_a["status"] == results_b["status"] == "complete"
    assert len(models_a) == len(models_b)
    for a, b in zip(models_a, models_b, strict=True):
        for name in a:
            assert torch.allclose(torch.from_numpy(a[name].numpy()), torch.from_numpy(b[name].numpy()), atol=ATOL, rtol=0), name
    assert set(results_a["phases"]) == set(results_b["phases"])
    for phase, cost in results_a["phases"].items():
        for key in ("rounds", "participations", "bytes_down", "bytes_up"):
            assert results_b["phases"][phase][key] == cost[key], (phase, key)
    for name, model in results_a["models"].items():
        assert results_b["models"][name]["acc_test"] == pytest.approx(model["acc_test"], abs=0.01), name


@pytest.mark.parametrize("vectorise, chunked", [(True, False), (False, False), (False, True)], ids=["vmap", "loop", "loop-chunked"])
def test_a_whole_run_in_cohort_mode_equals_per_node_mode(small_cfg, tmp_path, monkeypatch, vectorise, chunked):
    """Training (sampled rounds, momentum), caches, two withdrawals in a stream, every unlearning method; cohorts of 2, 2 and 1.

    `loop-chunked`: every non-training message goes one virtual client per packed message (a reply budget of one
    byte), each node's chunks one after another, as 1000 clients of a large model would.
    """
    if chunked:
        monkeypatch.setattr(cohort_module, "REPLY_BUDGET_BYTES", 1)
    cfg = small_cfg.replace(
        num_clients=5,
        rounds=3,
        momentum=0.5,
        fraction_fit=0.8,
        shadow_mia=False,
        stream_clients=(3,),
        methods=("retrain", "iau", "iau-cached", "finetune", "gradient-ascent", "federaser", "pga", "imu"),
    )
    per_node = run_experiment(cfg, tmp_path, monkeypatch, "per-node")
    cohort = run_experiment(cfg, tmp_path, monkeypatch, "cohort", cohort_size=2, vectorise=vectorise)
    assert_same_run(per_node, cohort)
    assert len(cohort[0]["stream"]) == 2 and len(cohort[1]) > 2 * len(cfg.methods)  # both requests, every model compared
    assert cohort[0]["execution"] == {"mode": "cohort", "cohort_size": 2, "supernodes": 3, "train": "vmap" if vectorise else "loop"}
    assert per_node[0]["execution"] == {"mode": "per-node", "cohort_size": 1, "supernodes": 5}
    assert per_node[0]["models"]["original"]["dist_para"] > 0.01  # the withdrawal changed the model: equality is not trivially met
    assert per_node[0]["models"]["iau"]["dist_para"] != per_node[0]["models"]["original"]["dist_para"]


# ----- (c) faults stay per virtual client ---------------------------------------------------------------------
def test_a_dropped_or_crashed_virtual_client_is_a_dropout_not_a_failed_cohort(small_cfg, tmp_path, monkeypatch):
    cfg = small_cfg.replace(
        num_clients=5,
        rounds=2,
        dropout_prob=0.3,
        crash_client=2,
        crash_round=1,
        shadow_mia=False,
        unlearn_policy="renormalise",
        methods=("retrain", "iau"),
    )
    per_node = run_experiment(cfg, tmp_path, monkeypatch, "per-node", capture_errors=True)
    cohort = run_experiment(cfg, tmp_path, monkeypatch, "cohort", cohort_size=2, capture_errors=True)
    assert_same_run(per_node, cohort)
    reliability_a, reliability_b = per_node[0]["reliability"], cohort[0]["reliability"]
    assert reliability_a["failed_by_cause"] == reliability_b["failed_by_cause"]
    assert reliability_b["failed_by_cause"].get("crash") and reliability_b["failed_by_cause"].get("dropout")
    # Client 2 crashed in round 1 while client 3, in its cohort, trained: fewer answers than 2 rounds x 4 sampled clients.
    assert cohort[0]["phases"]["training"]["participations"] < 2 * 4
