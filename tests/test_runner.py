"""The whole experiment driven in-process (LocalGrid), and the results contract on disk."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fedunlearn.config import build_config
from fedunlearn.data import DatasetStore
from fedunlearn.deletion import forget_indices, kept_indices
from fedunlearn.models import build_model
from simulations.results import METRIC_KEYS
from simulations.runner import Experiment
from strategies import app_config, keys
from strategies.client_app import build_client_app
from strategies.local_grid import LocalGrid

COST_KEYS = {"wall_s", "client_compute_s", "rounds", "participations", "bytes_down", "bytes_up"}


def drive(cfg, tmp_path):
    experiment = Experiment(cfg, out_dir=tmp_path / "out", show_progress=False)
    app = build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches")))
    experiment.drive(LocalGrid(app, cfg.num_clients))
    return experiment.results


def split_sizes(cfg) -> dict[str, int]:
    """How many examples each fraction of the results counts over (test split, kept data, forget set, triggered inputs)."""
    data = DatasetStore.get(app_config.data_spec_for(cfg))
    request = app_config.deletion_request_for(cfg)
    withdrawn = {request.client} if request.client_level else set()
    remained = sum(len(kept_indices(data, p, [request])) for p in range(cfg.num_clients) if p not in withdrawn)
    return {
        "acc_test": len(data.y_test),
        "acc_remained": remained,
        "acc_deleted": len(forget_indices(data, request)),
        "backdoor_asr": len(data.triggered_test()[0]),
    }


def check_contract(results, names, cfg=None):
    assert set(results["models"]) == set(names)
    sizes = split_sizes(cfg) if cfg is not None else None
    for name, model in results["models"].items():
        for key in METRIC_KEYS:
            assert key in model, (name, key)
        for key in ("acc_test", "acc_remained", "acc_deleted", "backdoor_asr"):
            assert 0.0 <= model[key] <= 1.0, (name, key, model[key])
            if sizes is not None:  # a fraction of a known number of examples: k / n for a whole k
                hits = model[key] * sizes[key]
                assert abs(hits - round(hits)) < 1e-6 * sizes[key], (name, key, model[key], sizes[key])
        loss = model["mia"]["loss"]
        if loss["scored"]["members"] >= 10:
            assert 0.0 <= model["mia_auc"] == loss["auc"] <= 1.0, name
        else:  # nothing clean to score (e.g. the forget set is all poisoned): said, not faked
            assert model["mia_auc"] is None and loss["skipped"]
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
    check_contract(results, ["original", "retrain", "iau", "iau-cached"], cfg)
    assert results["status"] == "complete"
    models = results["models"]
    assert models["retrain"]["cost"]["rounds"] == 3
    k, repair = cfg.iau_steps, cfg.iau_repair_rounds
    # The fresh protocol: a round per step, every client; then the repair rounds among the remaining clients.
    assert models["iau"]["unlearning"]["rounds"] == k and models["iau"]["cost"]["rounds"] == k + repair
    assert models["iau"]["cost"]["participations"] == k * cfg.num_clients + repair * (cfg.num_clients - 1)
    # The cached protocol: one message to client u per step, nobody else, no repair.
    assert models["iau-cached"]["unlearning"]["clients_asked"] == [cfg.forget_client]
    assert models["iau-cached"]["cost"]["participations"] == k and models["iau-cached"]["unlearning"]["repair_rounds"] == 0
    assert models["iau"]["speedup"]["rounds"] == 3 / (k + repair)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    check_contract(on_disk, ["original", "retrain", "iau", "iau-cached"])
    with open(tmp_path / "out" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["original", "retrain", "iau", "iau-cached"]
    assert rows[2]["cost_rounds"] == str(cfg.iau_steps + cfg.iau_repair_rounds)


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
    check_contract(results, ["original", "retrain", "iau"], cfg)
    iau = results["models"]["iau"]
    k = cfg.iau_steps  # no repair rounds mid-training: training without the client continues right after
    assert iau["unlearning_cost"]["rounds"] == k and iau["unlearning"]["repair_rounds"] == 0
    assert iau["cost"]["rounds"] == k + 2  # the correction, then two rounds of training without the client
    assert iau["cost"]["participations"] == k * cfg.num_clients + 2 * (cfg.num_clients - 1)
    assert [p["round"] for p in results["history"]["iau"]] == [3, 4]
    assert results["phases"]["training"]["rounds"] == 2


def test_sample_level_deletion(tmp_path):
    cfg = build_config("smoke", overrides={"model": "mlp", "rounds": 2, "forget_samples": "poisoned"})
    results = drive(cfg, tmp_path)
    check_contract(results, ["original", "retrain", "iau", "iau-cached"], cfg)
    assert 0 < results["forget_count"] < 300


class Interrupted(Exception):
    """Stands in for a crash of the driver."""


class RecordingGrid(LocalGrid):
    """LocalGrid that keeps, per batch of training messages, the server round it says and the model it carries."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train_rounds: list[tuple[int, dict[str, bytes]]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == keys.TRAIN]
        if train:
            content = train[0].content
            model = {name: array.numpy().tobytes() for name, array in content.array_records[keys.ARRAYS].items()}
            self.train_rounds.append((int(content.config_records[keys.CONFIG][keys.SERVER_ROUND]), model))
        return super().send_and_receive(messages, timeout=timeout)


def test_run_killed_after_round_k_and_resumed_ends_with_the_same_model(tmp_path, monkeypatch):
    from simulations.checkpoint import Checkpoints

    cfg = build_config(
        "smoke", overrides={"model": "mlp", "rounds": 6, "checkpoint_every": 2, "methods": "retrain,iau", "shadow_mia": False}
    )
    whole = drive(cfg, tmp_path / "whole")
    whole_model = Checkpoints(tmp_path / "whole" / "out").load_arrays("training")

    # Crash in round 5 of training: the last checkpoint is round 4.
    broken = Experiment(cfg, out_dir=tmp_path / "cut" / "out", show_progress=False)
    original_hook = broken._round_hook

    def crashing_hook(label):
        inner = original_hook(label)

        def hook(server_round, arrays, metrics):
            if label == "original" and server_round == 5:
                raise Interrupted("killed in round 5")
            inner(server_round, arrays, metrics)

        return hook

    monkeypatch.setattr(broken, "_round_hook", crashing_hook)
    app = build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "cut" / "caches")))
    with pytest.raises(Interrupted):
        broken.drive(LocalGrid(app, cfg.num_clients))
    state = json.loads((tmp_path / "cut" / "out" / "checkpoint" / "state.json").read_text())
    assert state["round"] == 4

    # A new run into the same directory must not clobber it; --resume continues it.
    from fedunlearn.errors import ConfigError

    (tmp_path / "cut" / "out" / "results.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(ConfigError, match="already holds results"):
        Experiment(cfg, out_dir=tmp_path / "cut" / "out", show_progress=False)
    with pytest.raises(ConfigError, match="other settings.*rounds"):
        Experiment(cfg.replace(rounds=7), out_dir=tmp_path / "cut" / "out", show_progress=False, resume=True)
    checkpointed = Checkpoints(tmp_path / "cut" / "out").load_arrays("training")
    checkpointed_bytes = {name: array.numpy().tobytes() for name, array in checkpointed.items()}
    resumed = Experiment(cfg, out_dir=tmp_path / "cut" / "out", show_progress=False, resume=True)
    trained_rounds: list[int] = []
    resumed_hook = resumed._round_hook

    def counting_hook(label):
        inner = resumed_hook(label)

        def hook(server_round, arrays, metrics):
            if label == "original":
                trained_rounds.append(server_round)
            inner(server_round, arrays, metrics)

        return hook

    monkeypatch.setattr(resumed, "_round_hook", counting_hook)
    app = build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "cut" / "caches2")))
    grid = RecordingGrid(app, cfg.num_clients, seed=3)  # other node ids: nothing may depend on them
    resumed.drive(grid)
    results = resumed.results
    assert results["resumed_from_round"] == 4
    # It resumed: only rounds 5 and 6 were trained (total - checkpointed round), starting from the checkpoint's model.
    assert trained_rounds == [5, 6]
    first_round, first_model = grid.train_rounds[0]
    assert first_round == 5 and first_model == checkpointed_bytes
    assert [p["round"] for p in results["history"]["original"]] == [1, 2, 3, 4, 5, 6]
    resumed_model = Checkpoints(tmp_path / "cut" / "out").load_arrays("training")
    for name in whole_model:
        assert (whole_model[name].numpy() == resumed_model[name].numpy()).all(), name
    for key in ("acc_test", "backdoor_asr", "dist_para"):
        assert results["models"]["iau"][key] == whole["models"]["iau"][key]
        assert results["models"]["original"][key] == whole["models"]["original"][key]
    assert results["phases"]["training"]["rounds"] == 6
    # The original model's test accuracy and ASR are what plain torch gives on the trained (checkpointed) model.
    data = DatasetStore.get(app_config.data_spec_for(cfg))
    model = build_model(app_config.model_name_for(cfg), data.input_shape, data.num_classes)
    model.load_state_dict(resumed_model.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).double().mean().item()
        asr = (model(data.triggered_test()[0]).argmax(1) == cfg.backdoor_target).double().mean().item()
    assert results["models"]["original"]["acc_test"] == pytest.approx(acc, abs=1e-12)
    assert results["models"]["original"]["backdoor_asr"] == pytest.approx(asr, abs=1e-12)
