"""PGA: the authors' early stop, checked against a hand-rolled loop, and w_u in a stream taken from PGA's own rounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from fedunlearn.baselines import PGASettings, projected_gradient_ascent
from fedunlearn.config import build_config
from fedunlearn.gradients import model_vector
from simulations.runner import Experiment
from strategies import app_config, keys
from strategies.client_app import build_client_app
from strategies.local_grid import LocalGrid

# ----- the early stop ----------------------------------------------------------------------------


def _problem():  # noqa: ANN202
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    reference = parameters_to_vector(model.parameters()).detach().double()
    local = reference + 0.05 * torch.randn(reference.shape, dtype=torch.float64)  # client u's w_u, near w_ref
    return model, x, y, reference, local


SETTINGS = dict(lr=0.3, epochs=4, batch_size=8, momentum=0.9, clip_grad=5.0)  # 5 steps an epoch, 20 in all
RADIUS = 0.5


def _by_hand(model: nn.Module, x, y, reference, local, threshold: float, seed: int = 0):  # noqa: ANN001, ANN202
    """IBM's loop written out: SGD with momentum, -CE, clip, step, project onto the ball, then break once the squared
    distance to w_u exceeds the threshold. Returns (steps, final parameters, stopped, squared distances after each step)."""
    vector_to_parameters(reference.float(), model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=SETTINGS["lr"], momentum=SETTINGS["momentum"])
    generator = torch.Generator().manual_seed(seed)
    steps, seen = 0, []
    model.train()
    for _ in range(SETTINGS["epochs"]):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), SETTINGS["batch_size"]):
            idx = order[start : start + SETTINGS["batch_size"]]
            opt.zero_grad()
            (-F.cross_entropy(model(x[idx]), y[idx])).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), SETTINGS["clip_grad"])
            opt.step()
            steps += 1
            with torch.no_grad():
                offset = parameters_to_vector(model.parameters()).double() - reference
                if offset.norm() > RADIUS:
                    vector_to_parameters((reference + offset / offset.norm() * RADIUS).float(), model.parameters())
                now = parameters_to_vector(model.parameters()).double()
                seen.append(float((now - local).pow(2).sum()))
                if seen[-1] > threshold:
                    return steps, now, True, seen
    return steps, parameters_to_vector(model.parameters()).detach().double(), False, seen


def test_early_stop_ends_the_ascent_at_the_first_step_past_the_threshold():
    model, x, y, reference, local = _problem()
    # Where the squared distance to w_u goes without a stop: pick a threshold first passed at a step in the middle.
    _, _, _, free = _by_hand(model, x, y, reference, local, float("inf"))
    k = next(i for i in range(8, len(free)) if free[i] > max(free[:i]))
    threshold = (free[k] + max(free[:k])) / 2
    steps, expected, stopped, _ = _by_hand(model, x, y, reference, local, threshold)
    assert stopped and steps == k + 1 < 20

    model2, *_ = _problem()
    stats = projected_gradient_ascent(
        model2, x, y, reference, RADIUS, PGASettings(**SETTINGS, stop_distance=threshold), torch.Generator().manual_seed(0), local=local
    )
    assert stats.stopped_early and stats.steps == steps
    torch.testing.assert_close(model_vector(model2).double(), expected, rtol=0, atol=1e-6)
    assert stats.local_distance_sq == pytest.approx(free[k], rel=1e-9) and stats.local_distance_sq > threshold
    assert stats.projections > 0  # the projection ran as well (it comes before the stop check, as in IBM's loop)


def test_unreachable_threshold_or_no_local_model_runs_every_step():
    model, x, y, reference, local = _problem()
    steps, expected, stopped, seen = _by_hand(model, x, y, reference, local, float("inf"))
    assert steps == 20 and not stopped
    for threshold, given in ((1e9, local), (1e-9, None), (0.0, local)):  # far away; no w_u; disabled (<= 0)
        model2, *_ = _problem()
        stats = projected_gradient_ascent(
            model2, x, y, reference, RADIUS, PGASettings(**SETTINGS, stop_distance=threshold), torch.Generator().manual_seed(0), local=given
        )
        assert not stats.stopped_early and stats.steps == 20, threshold
        torch.testing.assert_close(model_vector(model2).double(), expected, rtol=0, atol=1e-6)
        if given is not None and threshold > 0:
            assert stats.local_distance_sq == pytest.approx(seen[-1], rel=1e-9)


def test_authors_default_threshold():
    assert PGASettings().stop_distance == 2.2  # IBM's federated_unlearning.ipynb: distance_threshold = 2.2


# ----- w_u in a stream ---------------------------------------------------------------------------


class Spy:
    """Wraps the ClientApp: logs (message type, partition, what the server sent, what the client answered)."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app
        self.log: list[tuple[str, int, object, object]] = []

    def __call__(self, msg, context):  # noqa: ANN001, ANN204
        sent = msg.content
        reply = self.app(msg, context)
        self.log.append((msg.metadata.message_type, int(context.node_config["partition-id"]), sent, reply.content))
        return reply


def _stream(tmp_path, pga_rounds: int):  # noqa: ANN001, ANN202
    cfg = build_config(
        "smoke",
        overrides={
            "model": "mlp",
            "rounds": 2,
            "local_epochs": 1,
            "stream_clients": "2",
            "methods": "retrain,pga",
            "pga_rounds": pga_rounds,
            "shadow_mia": False,
            "train_limit": 600,
        },
    )
    spy = Spy(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))))
    experiment = Experiment(cfg, out_dir=tmp_path / "out", show_progress=False)
    experiment.drive(LocalGrid(spy, cfg.num_clients))
    assert experiment.results["status"] == "complete"
    assert [r["client"] for r in experiment.results["requests"]] == [0, 2]
    return cfg, spy.log, experiment.results


def _state(record) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.to(torch.float64) for k, v in record.to_torch_state_dict().items()}


def _round(log, start: int, stop: int, server_round: int) -> dict[int, tuple[dict[str, torch.Tensor], int]]:  # noqa: ANN001
    """{partition: (local model it sent back, examples)} of the train messages of `server_round` in log[start:stop]."""
    return {
        p: (_state(reply[keys.ARRAYS]), int(reply[keys.METRICS][keys.NUM_EXAMPLES]))
        for kind, p, sent, reply in log[start:stop]
        if kind == keys.TRAIN and int(sent[keys.CONFIG][keys.SERVER_ROUND]) == server_round
    }


def _expected_reference(models: dict[int, tuple[dict[str, torch.Tensor], int]], client: int) -> tuple[dict[str, torch.Tensor], float]:
    """(w - a w_u) / (1 - a) with w the example-weighted mean of the round's models and a = client u's share in it."""
    total = sum(n for _, n in models.values())
    w = {name: sum(state[name] * n for state, n in models.values()) / total for name in models[client][0]}
    share = models[client][1] / total
    return {name: (w[name] - share * models[client][0][name]) / (1 - share) for name in w}, share


def _pga_queries(log) -> list[int]:  # noqa: ANN001
    return [i for i, (kind, *_rest) in enumerate(log) if kind == keys.QUERY_PGA]


def test_stream_reference_comes_from_pgas_own_last_fedavg_round(tmp_path):
    cfg, log, results = _stream(tmp_path, pga_rounds=1)
    first, second = _pga_queries(log)
    assert (log[first][1], log[second][1]) == (0, 2)
    stream = results["stream"]

    # Request 1: client 0's model from the last round of the original training (round 2), shares over all 5 clients.
    training_end = next(i for i, (kind, *_rest) in enumerate(log) if kind == keys.EVALUATE)
    original = _round(log, 0, training_end, 2)
    assert sorted(original) == list(range(cfg.num_clients))
    expected, share = _expected_reference(original, 0)
    sent = _state(log[first][2][keys.ARRAYS])
    for name in expected:
        torch.testing.assert_close(sent[name], expected[name], rtol=1e-5, atol=1e-6)
    first_details = stream[0]["models"]["pga"]["unlearning"]
    assert first_details["reference_source"] == "original training round 2"
    assert first_details["client_share"] == pytest.approx(share)

    # Request 2: client 2's model from PGA's own FedAvg round of request 1 (round 3: clients 1-4), its share there.
    own = _round(log, first, second, 3)
    assert sorted(own) == [1, 2, 3, 4]
    expected, share = _expected_reference(own, 2)
    sent = _state(log[second][2][keys.ARRAYS])
    for name in expected:
        torch.testing.assert_close(sent[name], expected[name], rtol=1e-5, atol=1e-6)
    # ... which is not what the original training's model of client 2 would give.
    stale, _ = _expected_reference(original, 2)
    assert any(not torch.allclose(sent[name], stale[name], atol=1e-4) for name in stale)
    # w_u itself travels to client 2 for the early stop: exactly the model it sent back in round 3.
    local = _state(log[second][2][keys.PGA_LOCAL_MODEL])
    assert all(torch.equal(local[name], own[2][0][name]) for name in local)
    details = stream[1]["models"]["pga"]["unlearning"]
    assert details["reference_source"] == "pga's own fedavg round 3"
    assert details["client_share"] == pytest.approx(share)
    assert details["early_stop_threshold"] == 2.2 and isinstance(details["stopped_early"], bool)
    assert details["steps"] >= 1 and details["final_local_distance_sq"] is not None

    # Storage: the larger of the store read for w_ref and the one kept for the next request (float32 models).
    p = results["num_parameters"]
    assert stream[0]["models"]["pga"]["storage"]["server_bytes"] == 5 * 4 * p  # round 2: all 5 clients
    assert stream[1]["models"]["pga"]["storage"]["last_models_held_bytes"] == 4 * 4 * p  # round 3: clients 1-4
    assert stream[1]["models"]["pga"]["storage"]["last_models_recorded_bytes"] == 3 * 4 * p  # round 3 again: 1, 3, 4
    assert stream[1]["models"]["pga"]["storage"]["server_bytes"] == 4 * 4 * p


def test_stream_without_pga_rounds_falls_back_to_w(tmp_path):
    _, log, results = _stream(tmp_path, pga_rounds=0)
    first, second = _pga_queries(log)
    # No FedAvg round produced PGA's model for request 2: it is client 0's ascent, sent unchanged as w_ref = w.
    ascended = _state(log[first][3][keys.ARRAYS])
    sent = log[second][2]
    assert all(torch.equal(_state(sent[keys.ARRAYS])[name], ascended[name]) for name in ascended)
    assert keys.PGA_LOCAL_MODEL not in sent.array_records  # no w_u, so no early stop
    details = results["stream"][1]["models"]["pga"]["unlearning"]
    assert details["reference_source"].startswith("none, w_ref = w: no FedAvg round of pga produced its current model")
    assert details["reference"].startswith("w (") and details["client_share"] == 0.0
    assert details["early_stop_threshold"] is None and details["stopped_early"] is False
    assert details["final_local_distance_sq"] is None and details["fedavg_rounds"] == 0
    assert results["stream"][0]["models"]["pga"]["unlearning"]["reference_source"] == "original training round 2"
    assert results["stream"][1]["models"]["pga"]["storage"]["server_bytes"] == 0  # nothing kept, nothing read


def test_own_store_applies_only_to_the_model_its_round_produced():
    from collections import OrderedDict

    from flwr.app import ArrayRecord

    from fedunlearn.baselines import LastModelStore
    from strategies.methods.pga import PGAMemory, reference_source, reference_state

    def arrays(value: float) -> ArrayRecord:
        return ArrayRecord(OrderedDict(w=torch.full((3,), value)))

    original, own = LastModelStore(), LastModelStore()
    original.record(2, 0, {"w": torch.ones(3)}, 0.2)
    own.record(3, 1, {"w": torch.zeros(3)}, 0.5)
    memory = PGAMemory()
    first = reference_source(memory, original, arrays(1.0), 2)  # nothing served yet: the original training's round 2
    assert first.store is original and first.model_round == 2 and not first.missing
    produced = arrays(2.0)
    memory.remember(own, produced)
    same = reference_source(memory, original, arrays(2.0), 2)  # the same parameters as the aggregate of round 3
    assert same.store is own and same.model_round == 3 and not same.missing
    state, subtracted = reference_state(arrays(2.0), same.last(1), same.model_round)
    assert subtracted and torch.allclose(state["w"], torch.full((3,), 4.0))  # (2 - 0.5 * 0) / 0.5
    _, subtracted = reference_state(arrays(2.0), same.last(2), same.model_round)  # client 2 did not train in round 3
    assert not subtracted
    moved = reference_source(memory, original, arrays(2.5), 2)  # training went on after PGA's rounds: the store is stale
    assert moved.store is None and "not the aggregate of pga's own fedavg round 3" in moved.missing
    memory.remember(None, arrays(3.0))  # a request without FedAvg rounds
    assert reference_source(memory, original, arrays(3.0), 2).missing.startswith("no FedAvg round of pga")
