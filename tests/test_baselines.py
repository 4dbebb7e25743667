"""The baselines (finetune, gradient-ascent, FedEraser, PGA, IMU-head): hand-computed math and single-process references."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from flwr.app import ArrayRecord
from one_step import one_step
from torch import nn
from torch.nn import functional as F

from fedunlearn.baselines import (
    FedEraserSettings,
    IMUSettings,
    LastModelStore,
    PGASettings,
    UpdateHistory,
    ball_radius_from_random,
    federaser_step,
    head_parameter_names,
    imu_head_ascent,
    imu_weights,
    influence_scores,
    per_example_head_gradients,
    pga_reference,
    project_to_ball,
    projected_gradient_ascent,
    rescale_update,
    weighted_ascent_loss,
)
from fedunlearn.config import build_config
from fedunlearn.costs import CostMeter
from fedunlearn.data import DatasetStore
from fedunlearn.deletion import DeletionRequest, forget_indices, kept_indices
from fedunlearn.errors import ConfigError, MissingRepliesError
from fedunlearn.gradients import ParamLayout, gradient_sum, load_model_vector, model_vector
from fedunlearn.models import build_model
from fedunlearn.training import local_train
from simulations.methods import MethodContext, get_method
from simulations.results import METRIC_KEYS
from simulations.runner import Experiment
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.fedavg import UnlearningFedAvg, discover_clients
from strategies.iau_fed import IAUFed, arrays_to_vector
from strategies.local_grid import LocalGrid
from strategies.metered_grid import MeteredGrid
from strategies.update_recorder import TrainingRecorder

COST_KEYS = {"wall_s", "client_compute_s", "rounds", "participations", "bytes_down", "bytes_up"}


def tiny(preset: str = "default", **overrides):  # noqa: ANN003, ANN201
    """4 clients, 600 examples, an MLP, one local epoch, no shadow models: seconds per experiment."""
    settings = {
        "num_clients": 4,
        "rounds": 3,
        "local_epochs": 1,
        "model": "mlp",
        "train_limit": 600,
        "shadow_mia": False,
        "cache_dtype": "float64",
        **overrides,
    }
    return build_config(preset, overrides=settings)


# ----- PGA ---------------------------------------------------------------------------------------


def test_project_to_ball_hand_values():
    center = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # (4, 5) is 5 away from (1, 1) along (3, 4)/5: radius 1 lands on (1.6, 1.8).
    torch.testing.assert_close(
        project_to_ball(torch.tensor([4.0, 5.0], dtype=torch.float64), center, 1.0), torch.tensor([1.6, 1.8], dtype=torch.float64)
    )
    inside = torch.tensor([1.3, 0.8], dtype=torch.float64)
    assert torch.equal(project_to_ball(inside, center, 1.0), inside)


def test_pga_reference_is_the_mean_of_the_other_clients():
    w = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([0.0, 4.0])]
    # Equal weights: the paper's (N w - w_u) / (N - 1).
    global_equal = sum(w) / 3
    torch.testing.assert_close(pga_reference(global_equal, w[0], 1 / 3), ((3 * global_equal - w[0]) / 2).double())
    torch.testing.assert_close(pga_reference(global_equal, w[0], 1 / 3), ((w[1] + w[2]) / 2).double())
    # FedAvg weights 10, 30, 60 examples: w_ref for client 1 is the 10:60 mean of clients 0 and 2.
    n = [10.0, 30.0, 60.0]
    global_weighted = sum(ni * wi for ni, wi in zip(n, w, strict=True)) / 100
    torch.testing.assert_close(pga_reference(global_weighted, w[1], 0.3), ((10 * w[0] + 60 * w[2]) / 70).double())
    with pytest.raises(ValueError, match="client_share=1.0"):
        pga_reference(global_weighted, w[1], 1.0)


def test_ball_radius_rule_hand_value():
    reference = torch.zeros(2)
    # Squared distances 25 and 1: mean 13, a third of it, square root.
    assert ball_radius_from_random(reference, [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])]) == pytest.approx(math.sqrt(13 / 3))


def test_pga_never_leaves_its_ball():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    reference = model_vector(model).double() + 0.05
    radius = 0.3
    seen: list[float] = []  # distance to w_ref whenever the model is used: before every step, observed from outside

    def watch(module, args):  # noqa: ANN001
        seen.append(float((model_vector(module).double() - reference).norm()))

    model.register_forward_pre_hook(watch)
    stats = projected_gradient_ascent(
        model, x, y, reference, radius, PGASettings(lr=1.0, epochs=6, batch_size=8, clip_grad=0.0), torch.Generator().manual_seed(0)
    )
    final = float((model_vector(model).double() - reference).norm())
    assert stats.steps == 30 and len(seen) == 30
    assert stats.projections > 0  # the ascent pushed out of the ball, so the projection was exercised
    assert max([*seen, final]) <= radius * (1 + 1e-5)  # float32 parameters
    assert stats.max_distance <= radius * (1 + 1e-5)
    assert seen[0] == pytest.approx(0.0, abs=1e-6)  # the ascent starts at w_ref


def test_pga_ascent_raises_the_forget_loss():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    reference = model_vector(model).double()
    with torch.no_grad():
        before = float(F.cross_entropy(model(x), y))
    projected_gradient_ascent(model, x, y, reference, 10.0, PGASettings(lr=0.05, epochs=3, batch_size=10), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) > before + 0.1


# ----- IMU-head ----------------------------------------------------------------------------------


def test_imu_weights_equal_a_hand_computed_example():
    g = torch.tensor([[1.0, 1.0], [2.0, 1.0], [-1.0, 0.0], [3.0, -1.0]])
    # mean(g) = (1.25, 0.25); F = mean(g^2) + 0.01 = (3.76, 0.76); a = mean(g) / F = (0.3324468, 0.3289474)
    # I_i = -(g_i . a): I = (-0.6613942, -0.9938410, +0.3324468, -0.6683931); example 2 (I > 0) is dropped.
    torch.testing.assert_close(
        influence_scores(g), torch.tensor([-0.6613941769, -0.9938409854, 0.3324468085, -0.6683930571], dtype=torch.float64)
    )
    # sqrt(|I|) of the kept: (0.8132614, 0.9969157, 0.8175531); their 0.93 quantile (linear, position 1.86 of the sorted
    # 0.8132614, 0.8175531, 0.9969157) = 0.8175531 + 0.86 * (0.9969157 - 0.8175531) = 0.9718050: example 1 is clipped.
    expected = torch.tensor([0.8132614444, 0.9718049661, 0.0, 0.8175530913], dtype=torch.float64)
    torch.testing.assert_close(imu_weights(g), expected)


def test_weighted_ascent_loss_hand_value():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    w = torch.tensor([1.0, 3.0, 0.0])
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0)), math.log(2.0)]
    assert float(weighted_ascent_loss(logits, y, w)) == pytest.approx(-(1 * ce[0] + 3 * ce[1]) / 4)


def test_per_example_head_gradients_match_autograd_one_by_one():
    torch.manual_seed(2)
    head = nn.Linear(5, 3)
    features, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    got = per_example_head_gradients(head, features, y)
    for i in range(6):
        head.zero_grad()
        F.cross_entropy(head(features[i : i + 1]), y[i : i + 1]).backward()
        torch.testing.assert_close(got[i], torch.cat([head.weight.grad.reshape(-1), head.bias.grad]))


def test_imu_head_ascent_moves_only_the_final_layer():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(25, 4), torch.randint(0, 3, (25,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        loss_before = float(F.cross_entropy(model(x), y))
    stats = imu_head_ascent(model, x, y, IMUSettings(lr=0.5, epochs=3, batch_size=10), torch.Generator().manual_seed(0))
    after = model.state_dict()
    assert head_parameter_names(model) == ["2.weight", "2.bias"]
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["2.weight"], before["2.weight"])
    assert 0 < stats.kept <= 25 and stats.steps > 0
    assert stats.loss_after > stats.loss_before == pytest.approx(loss_before, rel=1e-5)


# ----- FedEraser -----------------------------------------------------------------------------------


def _state(w: list[float], b: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w), "b": torch.tensor([b]), "steps": torch.tensor(7)}  # an integer buffer is no update


def test_update_history_keeps_every_interval_th_round_and_counts_its_bytes():
    history = UpdateHistory(interval=2)
    global_before = _state([1.0, 1.0], 0.0)
    for server_round in (1, 2, 3):
        for partition, n in ((0, 10), (1, 30), (2, 60)):
            client = _state([1.0 + partition + server_round, 1.0 - partition], float(partition))
            history.record(server_round, partition, client, global_before, n)
    assert history.rounds == [1, 3] and history.partitions(3) == [0, 1, 2]
    assert history.num_updates == 6
    assert history.nbytes == 6 * 3 * 4  # six updates of three float32 scalars; the integer buffer is not stored
    torch.testing.assert_close(history.update(3, 1)["w"], torch.tensor([4.0, -1.0]))
    # Withdrawing partition 1 leaves the 10:60 mean of partitions 0 and 2: w = (10*(3, 0) + 60*(5, -2)) / 70.
    mean = history.mean_update(3, [0, 2])
    torch.testing.assert_close(mean["w"], torch.tensor([(30 + 300) / 70, -120 / 70], dtype=torch.float64))
    torch.testing.assert_close(mean["b"], torch.tensor([120 / 70], dtype=torch.float64))
    assert history.mean_update(2, [0, 2]) is None


def test_federaser_rescaling_hand_values():
    old = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([2.0])}
    calibration = {"w": torch.tensor([0.0, 0.5]), "b": torch.tensor([-0.1])}
    step = rescale_update(old, calibration)
    torch.testing.assert_close(step["w"], torch.tensor([0.0, 5.0], dtype=torch.float64))  # length 5, direction (0, 1)
    torch.testing.assert_close(step["b"], torch.tensor([-2.0], dtype=torch.float64))
    theta = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0]), "steps": torch.tensor(7)}
    out = federaser_step(theta, old, calibration)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 6.0]))
    torch.testing.assert_close(out["b"], torch.tensor([-2.0]))
    assert out["steps"].item() == 7 and out["w"].dtype == torch.float32
    assert torch.equal(rescale_update(old, {"w": torch.zeros(2), "b": torch.zeros(1)})["w"], torch.zeros(2, dtype=torch.float64))


def test_calibration_epochs_round_up_and_stay_positive():
    assert FedEraserSettings(calibration_ratio=0.5).calibration_epochs(2) == 1
    assert FedEraserSettings(calibration_ratio=0.5).calibration_epochs(3) == 2
    assert FedEraserSettings(calibration_ratio=0.1).calibration_epochs(2) == 1
    with pytest.raises(ValueError, match="interval=0"):
        FedEraserSettings(interval=0)


# ----- in-process federations (LocalGrid) -----------------------------------------------------------


class Federation:
    """A LocalGrid federation trained for `rounds` rounds, with an optional recorder (as the runner installs it)."""

    def __init__(self, cfg, tmp_path, rounds: int, recorder: TrainingRecorder | None = None) -> None:
        self.cfg = cfg
        self.data = DatasetStore.get(app_config.data_spec_for(cfg))
        self.meter = CostMeter()
        self.grid = MeteredGrid(
            LocalGrid(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))), cfg.num_clients), self.meter
        )
        self.directory = discover_clients(self.grid, cfg.num_clients)
        torch.manual_seed(0)
        self.model = build_model("mlp", self.data.input_shape, self.data.num_classes)
        self.layout = ParamLayout.of(self.model)
        self.initial = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in self.model.state_dict().items()))
        self.strategy = IAUFed(
            layout=self.layout,
            iau=app_config.iau_settings_for(cfg),
            gradient_dtype="float64",
            directory=self.directory,
            train=app_config.train_settings_for(cfg),
            seed=cfg.seed,
            update_recorder=recorder,
        )
        self.arrays = self.strategy.start(grid=self.grid, initial_arrays=self.initial, num_rounds=rounds).arrays
        self.strategy.update_recorder = None
        self.rounds = rounds

    def fedavg(self, ledger=(), round_offset=0, label="x"):  # noqa: ANN001, ANN201
        return UnlearningFedAvg(
            directory=self.directory,
            train=app_config.train_settings_for(self.cfg),
            seed=self.cfg.seed,
            ledger=ledger,
            round_offset=round_offset,
        )

    def context(self, cfg, request: DeletionRequest, **extra) -> MethodContext:  # noqa: ANN003
        # Each method gets its own branch of the strategy, as the runner gives it.
        return MethodContext(
            cfg=cfg,
            grid=self.grid,
            strategy=self.strategy.branch(),
            initial_arrays=self.initial,
            arrays=self.arrays,
            request=request,
            forget_count=len(forget_indices(self.data, request)),
            fedavg=self.fedavg,
            request_round=self.rounds,
            **extra,
        )


def test_finetune_with_zero_rounds_returns_the_original_model(small_cfg, tmp_path):
    fed = Federation(small_cfg, tmp_path, rounds=1)
    request = DeletionRequest(client=small_cfg.forget_client)
    before = fed.meter.get("finetune")
    with fed.meter.phase("finetune"):
        outcome = get_method("finetune").run(fed.context(small_cfg.replace(finetune_rounds=0), request))
    assert fed.meter.get("finetune").rounds == before.rounds == 0
    torch.testing.assert_close(arrays_to_vector(outcome.arrays, fed.layout), arrays_to_vector(fed.arrays, fed.layout), rtol=0, atol=0)
    assert outcome.details["storage"] == {"server_bytes": 0, "client_bytes": 0}
    with fed.meter.phase("finetune-1"):
        one = get_method("finetune").run(fed.context(small_cfg.replace(finetune_rounds=1), request))
    assert fed.meter.get("finetune-1").rounds == 1
    assert fed.meter.get("finetune-1").participations == small_cfg.num_clients - 1  # the withdrawn client is not asked
    assert not torch.equal(arrays_to_vector(one.arrays, fed.layout), arrays_to_vector(fed.arrays, fed.layout))


def test_gradient_ascent_equals_iau_without_correction_and_the_pooled_reference(small_cfg, tmp_path):
    small_cfg = small_cfg.replace(iau_step_rule="sgd", iau_steps=1)  # the pooled reference below is one sgd step
    fed = Federation(small_cfg, tmp_path, rounds=1)
    fed.strategy.fill_caches(fed.grid, fed.arrays)
    request = DeletionRequest(client=small_cfg.forget_client)
    with fed.meter.phase("gradient-ascent"):
        outcome = get_method("gradient-ascent").run(fed.context(small_cfg, request))
    cost = fed.meter.get("gradient-ascent")
    assert cost.rounds == 1 and cost.participations == 1  # only the withdrawing client is asked
    got = arrays_to_vector(outcome.arrays, fed.layout)

    # The same request through IAUFed with the correction switched off.
    settings = one_step(eta=small_cfg.iau_eta, steps=small_cfg.iau_steps, step_rule=small_cfg.iau_step_rule, correction=False)
    plain = fed.strategy.branch()
    plain.iau = settings
    direct, _ = plain.unlearn(fed.grid, fed.arrays, request, len(forget_indices(fed.data, request)))
    torch.testing.assert_close(got, arrays_to_vector(direct, fed.layout), rtol=0, atol=0)

    # Pooled single process: theta + eta * mean forget gradient (sgd rule).
    theta = arrays_to_vector(fed.arrays, fed.layout)
    load_model_vector(fed.model, theta)
    forget = forget_indices(fed.data, request)
    forget_sum, _, _ = gradient_sum(fed.model, fed.data.x_train[forget], fed.data.y_train[forget], batch_size=1000)
    expected = theta + small_cfg.iau_eta * forget_sum / len(forget)
    torch.testing.assert_close(got, expected.float().double(), rtol=1e-5, atol=1e-6)

    # With the correction it is a different update (the ablation is not a no-op).
    corrected, _ = fed.strategy.branch().unlearn(fed.grid, fed.arrays, request, len(forget))
    assert not torch.allclose(arrays_to_vector(corrected, fed.layout), got, atol=1e-4)


def test_federaser_replay_matches_a_single_process_reference(small_cfg, tmp_path):
    """Round 1 is replayed from the stored updates; round 3 is calibrated by local training we redo in this process."""
    history = UpdateHistory(interval=2)
    recorder = TrainingRecorder(history=history)
    fed = Federation(small_cfg, tmp_path, rounds=3, recorder=recorder)
    assert history.rounds == [1, 3] and history.partitions(1) == list(range(small_cfg.num_clients))
    request = DeletionRequest(client=small_cfg.forget_client)
    remaining = [p for p in range(small_cfg.num_clients) if p != request.client]
    with fed.meter.phase("federaser"):
        outcome = get_method("federaser").run(fed.context(small_cfg, request, recorded=recorder))
    cost = fed.meter.get("federaser")
    assert cost.rounds == 1 and cost.participations == len(remaining)  # round 1 needs no calibration
    assert outcome.details["unlearning"]["calibration_rounds"] == 1
    p = fed.layout.numel
    assert outcome.details["storage"]["server_bytes"] == history.nbytes + 4 * p == 2 * small_cfg.num_clients * 4 * p + 4 * p

    def mean_stored(server_round: int) -> dict[str, torch.Tensor]:
        weights = {k: float(len(fed.data.client_train[k])) for k in remaining}
        return {
            name: sum(weights[k] * history.update(server_round, k)[name].double() for k in remaining) / sum(weights.values())
            for name in fed.layout.names
        }

    initial = fed.initial.to_torch_state_dict()
    theta1 = {name: (initial[name].double() + update).float() for name, update in mean_stored(1).items()}
    # Calibration of round 3: each remaining client trains ceil(0.5 * E) epochs from theta1 with its round-3 shuffle.
    settings = app_config.train_settings_for(small_cfg)
    settings = type(settings)(
        **{**settings.__dict__, "epochs": FedEraserSettings(calibration_ratio=0.5).calibration_epochs(settings.epochs)}
    )
    calibration = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in theta1.items()}
    total = 0
    for k in remaining:
        model = build_model("mlp", fed.data.input_shape, fed.data.num_classes)
        model.load_state_dict(theta1)
        idx = kept_indices(fed.data, k, [request])
        generator = torch.Generator().manual_seed(small_cfg.seed * 1_000_003 + 3 * 10_007 + k)
        local_train(model, fed.data.x_train[idx], fed.data.y_train[idx], settings, generator)
        for name, value in model.state_dict().items():
            calibration[name] += len(idx) * (value.double() - theta1[name].double())
        total += len(idx)
    old3 = mean_stored(3)
    got = outcome.arrays.to_torch_state_dict()
    for name in fed.layout.names:
        cal = calibration[name] / total
        expected = theta1[name].double() + old3[name].norm() * cal / cal.norm()
        torch.testing.assert_close(got[name].double(), expected, rtol=1e-4, atol=1e-5)
        # The step keeps the stored update's length per layer.
        assert float((got[name].double() - theta1[name].double()).norm()) == pytest.approx(float(old3[name].norm()), rel=1e-4)


def test_federaser_goes_on_without_an_offline_client_and_says_so(small_cfg, tmp_path):
    history = UpdateHistory(interval=2)
    recorder = TrainingRecorder(history=history)
    fed = Federation(small_cfg, tmp_path, rounds=3, recorder=recorder)
    request = DeletionRequest(client=small_cfg.forget_client)
    offline = next(p for p in range(small_cfg.num_clients) if p != request.client)
    fed.grid.grid.offline = {fed.directory.node_of[offline]}
    outcome = get_method("federaser").run(fed.context(small_cfg, request, recorded=recorder))
    assert outcome.details["unlearning"]["missing"] == {3: [offline]}
    fed.grid.grid.offline = {fed.directory.node_of[p] for p in range(small_cfg.num_clients)}
    with pytest.raises(MissingRepliesError, match="no client answered FedEraser's calibration of round 3"):
        get_method("federaser").run(fed.context(small_cfg, request, recorded=recorder))


# ----- whole experiments through Experiment.drive --------------------------------------------------


ALL = ["retrain", "iau", "iau-cached", "finetune", "gradient-ascent", "federaser", "pga", "imu"]


def _drive(cfg, tmp_path):
    experiment = Experiment(cfg, out_dir=tmp_path / "out", show_progress=False)
    experiment.drive(LocalGrid(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))), cfg.num_clients))
    return experiment.results


def test_every_method_runs_in_one_experiment_and_meets_the_contract(tmp_path):
    cfg = tiny(methods=",".join(ALL))
    results = _drive(cfg, tmp_path)
    assert results["status"] == "complete"
    models = results["models"]
    assert list(models) == ["original", *ALL]
    p = results["num_parameters"]
    for name in ALL:
        model = models[name]
        for key in METRIC_KEYS:
            assert key in model, (name, key)
        for key in ("acc_test", "acc_remained", "acc_deleted", "backdoor_asr", "mia_auc"):
            assert 0.0 <= model[key] <= 1.0, (name, key, model[key])
        assert set(model["cost"]) == COST_KEYS
        assert set(model["storage"]) >= {"server_bytes", "client_bytes"}
        assert model["storage"]["server_bytes"] >= 0 and model["storage"]["client_bytes"] >= 0
        if name != "retrain":
            assert set(model["speedup"]) == {"wall", "rounds", "bytes"}
    n = cfg.num_clients
    assert models["finetune"]["cost"]["rounds"] == cfg.finetune_rounds
    assert models["finetune"]["cost"]["participations"] == cfg.finetune_rounds * (n - 1)
    assert models["gradient-ascent"]["cost"]["participations"] == cfg.iau_steps  # only client u, once per step
    assert models["pga"]["cost"]["rounds"] == 1 + cfg.pga_rounds
    assert models["pga"]["storage"]["server_bytes"] == n * 4 * p  # every client's last local model (float32)
    assert models["imu"]["cost"]["rounds"] == 1 and models["imu"]["cost"]["participations"] == 1
    assert models["imu"]["cost"]["bytes_up"] < 4 * p / 10  # only the head travels back
    stored_rounds = models["federaser"]["unlearning"]["stored_rounds"]
    assert stored_rounds == [1, 3] and models["federaser"]["cost"]["rounds"] == len(stored_rounds) - 1
    assert models["federaser"]["storage"]["server_bytes"] == len(stored_rounds) * n * 4 * p + 4 * p
    assert models["iau"]["storage"]["client_bytes"] >= n * 8 * p and models["iau"]["storage"]["server_bytes"] == 0  # float64 caches
    assert models["iau-cached"]["storage"]["server_bytes"] == 8 * p  # G_tot in float64
    assert models["retrain"]["storage"]["server_bytes"] == 4 * p
    # The ablation differs from the corrected update.
    assert models["gradient-ascent"]["dist_para"] != pytest.approx(models["iau"]["dist_para"], rel=1e-6)


def test_baselines_with_a_mid_training_withdrawal(tmp_path):
    cfg = tiny(rounds=4, withdraw_round=2, methods="retrain,finetune,federaser,pga,imu", finetune_rounds=1, pga_rounds=1)
    results = _drive(cfg, tmp_path)
    models = results["models"]
    remaining_rounds = 2
    assert models["federaser"]["unlearning"]["stored_rounds"] == [1]  # only rounds up to the request are stored
    assert models["federaser"]["unlearning_cost"]["rounds"] == 0
    assert models["federaser"]["cost"]["rounds"] == remaining_rounds
    assert models["pga"]["unlearning_cost"]["rounds"] == 2 and models["pga"]["cost"]["rounds"] == 2 + remaining_rounds
    assert models["imu"]["cost"]["rounds"] == 1 + remaining_rounds


def test_sample_level_request_runs_every_baseline(tmp_path):
    cfg = tiny(forget_samples="poisoned", methods="retrain,finetune,gradient-ascent,federaser,pga,imu")
    results = _drive(cfg, tmp_path)
    n = cfg.num_clients
    # The client stays: it calibrates (on what it keeps) from the first replayed round on.
    assert results["models"]["federaser"]["cost"]["participations"] == 2 * n
    assert results["models"]["finetune"]["cost"]["participations"] == cfg.finetune_rounds * n


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"finetune_rounds": -1}, "finetune-rounds=-1: must be >= 0"),
        ({"federaser_interval": 0}, "federaser-interval=0: must be >= 1"),
        ({"federaser_calibration_ratio": 0.0}, "federaser-calibration-ratio=0.0: must be > 0.0 and <= 1.0"),
        ({"pga_lr": 0.0}, "pga-lr=0.0: must be > 0"),
        ({"pga_radius": -1.0}, "pga-radius=-1.0: must be >= 0.0"),
        ({"imu_epochs": 0}, "imu-epochs=0: must be >= 1"),
    ],
)
def test_baseline_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config("default", overrides=overrides)
    assert message in str(err.value)


def test_last_model_store_keeps_the_latest_round_and_its_bytes():
    store = LastModelStore()
    store.record(1, 0, {"w": torch.ones(3)}, 0.5)
    store.record(2, 0, {"w": torch.zeros(3)}, 0.25)
    store.record(2, 1, {"w": torch.ones(3)}, 0.75)
    last = store.get(0)
    assert last is not None and last.server_round == 2 and last.share == 0.25 and torch.equal(last.state["w"], torch.zeros(3))
    assert store.nbytes == 2 * 3 * 4 and store.get(5) is None
