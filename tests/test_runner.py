"""The whole experiment driven in-process (LocalGrid), and the results contract on disk."""

from __future__ import annotations

import csv
import json

import pytest

from fedunlearn.config import build_config
from simulations.results import METRIC_KEYS
from simulations.runner import Experiment
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.local_grid import LocalGrid

COST_KEYS = {"wall_s", "client_compute_s", "rounds", "participations", "bytes_down", "bytes_up"}


def drive(cfg, tmp_path):
    experiment = Experiment(cfg, out_dir=tmp_path / "out", show_progress=False)
    app = build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches")))
    experiment.drive(LocalGrid(app, cfg.num_clients))
    return experiment.results


def check_contract(results, names):
    assert set(results["models"]) == set(names)
    for name, model in results["models"].items():
        for key in METRIC_KEYS:
            assert key in model, (name, key)
        for key in ("acc_test", "acc_remained", "acc_deleted", "backdoor_asr", "mia_auc"):
            assert 0.0 <= model[key] <= 1.0, (name, key, model[key])
        assert model["dist_para"] >= 0 and model["dist_output"] >= 0
        if name != "original":
            assert set(model["cost"]) == COST_KEYS
        if name not in ("original", "retrain"):
            assert set(model["speedup"]) == {"wall", "rounds", "bytes"}
    assert "speedup" not in results["models"]["retrain"]
    assert results["models"]["retrain"]["dist_para"] == 0.0


def test_smoke_experiment_in_process_meets_the_contract(tmp_path):
    cfg = build_config("smoke", overrides={"model": "mlp", "rounds": 3})
    results = drive(cfg, tmp_path)
    check_contract(results, ["original", "retrain", "iau", "iau-cached"])
    assert results["status"] == "complete"
    models = results["models"]
    assert models["retrain"]["cost"]["rounds"] == 3
    assert models["iau"]["cost"]["rounds"] == 1 and models["iau"]["unlearning"]["rounds"] == 1
    assert models["iau"]["cost"]["participations"] == cfg.num_clients
    assert models["iau-cached"]["unlearning"]["clients_asked"] == [cfg.forget_client]
    assert models["iau-cached"]["cost"]["participations"] == 1
    assert models["iau"]["speedup"]["rounds"] == 3.0
    # Both protocols compute the same update from the same state.
    assert models["iau"]["dist_para"] == pytest.approx(models["iau-cached"]["dist_para"], rel=1e-3)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    check_contract(on_disk, ["original", "retrain", "iau", "iau-cached"])
    with open(tmp_path / "out" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["original", "retrain", "iau", "iau-cached"]
    assert rows[2]["cost_rounds"] == "1"


def test_retrain_reproduces_training_when_nothing_is_forgotten_elsewhere(tmp_path):
    """Same seeds and sampling: retraining differs from the original only through the forgotten client."""
    cfg = build_config("smoke", overrides={"model": "mlp", "rounds": 2, "fraction_fit": 0.6, "methods": "retrain"})
    results = drive(cfg, tmp_path)
    history = results["history"]
    assert [p["round"] for p in history["original"]] == [1, 2]
    assert results["models"]["original"]["dist_para"] > 0


def test_mid_training_withdrawal_continues_without_the_client(tmp_path):
    cfg = build_config("smoke", overrides={"model": "mlp", "rounds": 4, "withdraw_round": 2, "methods": "retrain,iau"})
    results = drive(cfg, tmp_path)
    check_contract(results, ["original", "retrain", "iau"])
    iau = results["models"]["iau"]
    assert iau["unlearning_cost"]["rounds"] == 1
    assert iau["cost"]["rounds"] == 1 + 2  # the correction, then two rounds of training without the client
    assert iau["cost"]["participations"] == cfg.num_clients + 2 * (cfg.num_clients - 1)
    assert [p["round"] for p in results["history"]["iau"]] == [3, 4]
    assert results["phases"]["training"]["rounds"] == 2


def test_sample_level_deletion(tmp_path):
    cfg = build_config("smoke", overrides={"model": "mlp", "rounds": 2, "forget_samples": "poisoned"})
    results = drive(cfg, tmp_path)
    check_contract(results, ["original", "retrain", "iau", "iau-cached"])
    assert 0 < results["forget_count"] < 300
