"""A stream of withdrawals: requests served one after another, each by every method from its own previous model."""

from __future__ import annotations

import csv

import pytest
import torch
from one_step import one_step
from test_distributed_iau import Setup

from fedunlearn.cache import CacheStore
from fedunlearn.config import build_config
from fedunlearn.deletion import DeletionRequest, forget_indices, kept_indices
from fedunlearn.errors import ConfigError
from fedunlearn.gradients import gradient_sum, load_model_vector
from fedunlearn.iau import CorrectionStepper
from simulations.runner import Experiment
from simulations.summary import write_summary
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.fedavg import model_version
from strategies.iau_fed import arrays_to_vector
from strategies.local_grid import LocalGrid

STREAMS = {
    "client-level": (DeletionRequest(client=1), DeletionRequest(client=3)),
    "sample-random": (DeletionRequest(client=1, samples="random", fraction=0.3), DeletionRequest(client=2, samples="random", fraction=0.3)),
}


@pytest.mark.parametrize("protocol", ["fresh", "cached"])
@pytest.mark.parametrize("kind", list(STREAMS))
def test_two_requests_in_sequence_equal_the_pooled_reference_and_keep_caches_consistent(small_cfg, tmp_path, kind, protocol):
    settings = one_step(eta=0.5, step_rule="sgd")
    setup = Setup(small_cfg, tmp_path, settings)
    first, second = STREAMS[kind]
    theta0 = arrays_to_vector(setup.arrays, setup.layout)
    setup.strategy.fill_caches(setup.grid, setup.arrays, upload=(protocol == "cached"))
    counts = [len(forget_indices(setup.data, r)) for r in (first, second)]

    # Single process, pooled data. Fresh: each direction at the model it corrects. Cached: every gradient at theta0.
    d1 = setup.reference_direction(theta0, first).d
    theta1 = CorrectionStepper(theta0, settings).step(d1).to(torch.float32).to(torch.float64)
    reference2 = setup.reference_direction(theta1 if protocol == "fresh" else theta0, second, ledger=(first,))
    d2, remaining2 = reference2.d, reference2.remaining_count
    theta2 = CorrectionStepper(theta1, settings).step(d2)

    arrays1, _ = setup.strategy.unlearn(setup.grid, setup.arrays, first, counts[0], protocol=protocol)
    torch.testing.assert_close(arrays_to_vector(arrays1, setup.layout), theta1, rtol=1e-5, atol=1e-6)
    arrays2, report = setup.strategy.unlearn(setup.grid, arrays1, second, counts[1], protocol=protocol)
    torch.testing.assert_close(arrays_to_vector(arrays2, setup.layout), theta2.to(torch.float32).to(torch.float64), rtol=1e-5, atol=1e-6)
    assert setup.strategy.ledger == (first, second)
    assert setup.strategy.current_examples() == remaining2

    load_model_vector(setup.model, theta0.to(torch.float32))
    if protocol == "cached":
        # The server's aggregate stays the exact sum over what remains, at the version it was taken.
        assert report.gradient_version == model_version(setup.arrays) and report.clients_asked == [second.client]
        withdrawn = {r.client for r in (first, second) if r.client_level}
        rest = torch.cat([kept_indices(setup.data, p, [first, second]) for p in range(small_cfg.num_clients) if p not in withdrawn])
        expected, _, _ = gradient_sum(setup.model, setup.data.x_train[rest], setup.data.y_train[rest], batch_size=1000)
        assert setup.strategy.gradient_total_count == len(rest) == remaining2
        torch.testing.assert_close(setup.strategy.gradient_total, expected, rtol=1e-4, atol=1e-5)  # float32 client sums
    else:
        # Every client that still holds data has a cache at theta1 over exactly what it still holds.
        load_model_vector(setup.model, theta1.to(torch.float32))
        store = CacheStore(str(tmp_path / "caches"), small_cfg.cache_dtype)
        for p in range(small_cfg.num_clients):
            if any(r.client == p and r.client_level for r in (first, second)):
                continue
            kept = kept_indices(setup.data, p, [first, second])
            cache = store.get(p)
            assert cache is not None and cache.version == model_version(arrays1) and cache.num_examples == len(kept), p
            expected, _, _ = gradient_sum(setup.model, setup.data.x_train[kept], setup.data.y_train[kept], batch_size=1000)
            torch.testing.assert_close(cache.gradient_sum.to(torch.float64), expected, rtol=1e-5, atol=1e-6)


def test_stream_experiment_reports_every_request_and_charges_the_whole_stream(tmp_path):
    cfg = build_config(
        "smoke",
        overrides={
            "model": "mlp",
            "rounds": 2,
            "local_epochs": 1,
            "stream_clients": "2,4",
            "methods": "retrain,iau,iau-cached,finetune",
            "finetune_rounds": 1,
            "shadow_mia": False,
            "train_limit": 600,
        },
    )
    experiment = Experiment(cfg, out_dir=tmp_path / "out", show_progress=False)
    experiment.drive(LocalGrid(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))), cfg.num_clients))
    results = experiment.results
    assert results["status"] == "complete"
    assert [r["client"] for r in results["requests"]] == [0, 2, 4]
    stream = results["stream"]
    assert len(stream) == 3
    names = ["original", "retrain", "iau", "iau-cached", "finetune"]
    for j, step in enumerate(stream):
        models = step["models"]
        assert list(models) == names, j
        active = cfg.num_clients - j  # clients still in the federation when request j+1 arrives
        # Retraining is from scratch without every client withdrawn so far; the others serve from their own state.
        assert models["retrain"]["cost"]["rounds"] == cfg.rounds
        assert models["retrain"]["cost"]["participations"] == cfg.rounds * (active - 1)
        k, repair = cfg.iau_steps, cfg.iau_repair_rounds
        assert models["iau"]["cost"]["participations"] == k * active + repair * (active - 1)
        assert models["iau"]["unlearning"]["status"] == "complete"
        assert models["iau"]["unlearning"]["clients_asked"] == [p for p in range(cfg.num_clients) if p not in (0, 2, 4)[:j]]
        assert models["iau-cached"]["cost"]["participations"] == k
        assert models["finetune"]["cost"]["participations"] == active - 1
        assert models["retrain"]["dist_para"] == 0.0 and models["iau"]["dist_para"] > 0.0
        # The deleted data grows with the stream: ACC on it is measured over every request so far.
        assert 0.0 <= models["iau"]["acc_deleted"] <= 1.0
    # The models move with each request: the iau model after request 3 is not the one after request 1.
    assert stream[2]["models"]["iau"]["dist_para"] != stream[0]["models"]["iau"]["dist_para"]
    # The headline: the final models at the cost of the whole stream.
    final = results["models"]
    assert (
        final["iau"]["cost"]["rounds"] == 3 * (cfg.iau_steps + cfg.iau_repair_rounds)
        and final["retrain"]["cost"]["rounds"] == 3 * cfg.rounds
    )
    assert final["iau"]["cost_last_request"] == stream[2]["models"]["iau"]["cost"]
    assert final["iau"]["speedup"]["rounds"] == pytest.approx(cfg.rounds / (cfg.iau_steps + cfg.iau_repair_rounds))
    assert {f"unlearn:iau#{j}" for j in (1, 2, 3)} <= set(results["phases"])
    with open(tmp_path / "out" / "stream.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * len(names) and {row["request"] for row in rows} == {"1", "2", "3"}
    assert [row["client"] for row in rows if row["model"] == "iau"] == ["0", "2", "4"]

    summary = write_summary(tmp_path / "report", [results])
    assert len(summary["stream"]) == 3 and any(p.endswith("stream.png") for p in summary["plots"])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## After each request of the stream" in report and "### Request 3: client 4" in report


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"stream_clients": "0"}, "may appear once"),
        ({"stream_clients": "1,1"}, "may appear once"),
        ({"stream_clients": "12"}, "not in [0, 9]"),
        ({"stream_clients": "1", "forget_samples": "poisoned"}, "only --forget-client holds poisoned"),
        ({"stream_clients": "1", "withdraw_round": 5}, "arrives after training"),
        ({"num_clients": 3, "stream_clients": "1,2"}, "leaves none to train"),
    ],
)
def test_bad_streams_are_refused_with_the_fix(overrides, fragment):
    with pytest.raises(ConfigError, match="stream-clients") as err:
        build_config("default", overrides=overrides)
    assert fragment in str(err.value)


def test_stream_preset_is_three_client_level_requests():
    cfg = build_config("stream")
    requests = app_config.deletion_requests_for(cfg)
    assert [r.client for r in requests] == [0, 3, 7] and all(r.client_level for r in requests)
