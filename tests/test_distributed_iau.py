"""The distributed IAU-Fed update equals a single-process reference computed on the pooled data."""

from __future__ import annotations

from collections import OrderedDict

import pooled
import pytest
import torch
from flwr.app import ArrayRecord
from one_step import one_step

from fedunlearn.costs import CostMeter
from fedunlearn.data import DatasetStore
from fedunlearn.deletion import DeletionRequest, forget_indices, kept_indices
from fedunlearn.gradients import ParamLayout, load_model_vector, model_vector
from fedunlearn.iau import IAUSettings
from fedunlearn.models import build_model
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.fedavg import discover_clients
from strategies.iau_fed import IAUFed, arrays_to_vector
from strategies.local_grid import LocalGrid
from strategies.metered_grid import MeteredGrid

REQUESTS = {
    "client-level": DeletionRequest(client=1),
    "sample-poisoned": DeletionRequest(client=1, samples="poisoned"),
    "sample-random": DeletionRequest(client=2, samples="random", fraction=0.3),
}


class Setup:
    """LocalGrid federation + a model at a non-trivial point (one FedAvg round)."""

    def __init__(self, cfg, tmp_path, iau: IAUSettings, train_rounds: int = 1) -> None:
        # The wire precision follows the cache precision: float64 both, or the default float32 both.
        self.cfg = cfg
        self.data = DatasetStore.get(app_config.data_spec_for(cfg))
        self.app = build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches")))
        self.meter = CostMeter()
        self.grid = MeteredGrid(LocalGrid(self.app, cfg.num_clients), self.meter)
        self.directory = discover_clients(self.grid, cfg.num_clients)
        torch.manual_seed(0)
        self.model = build_model("mlp", self.data.input_shape, self.data.num_classes)
        self.layout = ParamLayout.of(self.model)
        self.strategy = IAUFed(
            layout=self.layout,
            iau=iau,
            gradient_dtype=cfg.cache_dtype,
            directory=self.directory,
            train=app_config.train_settings_for(cfg),
            seed=cfg.seed,
        )
        initial = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in self.model.state_dict().items()))
        self.arrays = self.strategy.start(grid=self.grid, initial_arrays=initial, num_rounds=train_rounds).arrays

    def reference_direction(self, theta: torch.Tensor, request: DeletionRequest, ledger=(), weight: float = 1.0) -> pooled.Direction:
        """d on pooled data, one process, independently of the code under test: g_r over everything kept, g_f over S."""
        forget = forget_indices(self.data, request)
        withdrawn = {r.client for r in [*ledger, request] if r.client_level}
        remaining = torch.cat([kept_indices(self.data, p, [*ledger, request]) for p in range(self.cfg.num_clients) if p not in withdrawn])
        x, y = self.data.x_train, self.data.y_train
        return pooled.direction(
            pooled.pooled_sums(self.model, theta, x[remaining], y[remaining]),
            pooled.pooled_sums(self.model, theta, x[forget], y[forget]),
            weight,
        )


CACHE_DTYPES = ["float64", "float32"]  # float32 = the default cache and wire precision


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("step_rule,eta", [("sgd", 0.5), ("adam-first-step", 1e-3)])
@pytest.mark.parametrize("protocol", ["fresh", "cached"])
@pytest.mark.parametrize("kind", list(REQUESTS))
def test_distributed_update_equals_pooled_reference(small_cfg, tmp_path, kind, protocol, step_rule, eta, cache_dtype):
    cfg = small_cfg.replace(forget_client=REQUESTS[kind].client, cache_dtype=cache_dtype)
    setup = Setup(cfg, tmp_path, one_step(eta=eta, step_rule=step_rule))
    request = REQUESTS[kind]
    theta = arrays_to_vector(setup.arrays, setup.layout)
    reference = setup.reference_direction(theta, request)
    expected = pooled.step(theta, reference.d, step_rule, eta=eta)

    setup.strategy.fill_caches(setup.grid, setup.arrays, upload=(protocol == "cached"))
    assert setup.strategy.current_examples() - reference.forget_count == reference.remaining_count
    new_arrays, report = setup.strategy.unlearn(setup.grid, setup.arrays, request, reference.forget_count, protocol=protocol)
    got = arrays_to_vector(new_arrays, setup.layout)

    assert report.direction_norm == pytest.approx(float(reference.d.norm()), rel=1e-4)
    assert not torch.equal(got, theta)
    pooled.assert_within(got, expected, pooled.step_error(theta, reference, step_rule, eta=eta))
    assert report.rounds == 1
    if protocol == "cached":
        assert report.clients_asked == [request.client]
    else:
        assert report.clients_asked == list(range(cfg.num_clients))


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_direction_matches_reference_closely(small_cfg, tmp_path, cache_dtype):
    """The summed client vectors reproduce d itself (not only the stepped parameters), entry by entry."""
    setup = Setup(small_cfg.replace(cache_dtype=cache_dtype), tmp_path, one_step(eta=0.1, step_rule="sgd"))
    request = REQUESTS["sample-poisoned"]
    theta = arrays_to_vector(setup.arrays, setup.layout)
    reference = setup.reference_direction(theta, request)
    setup.strategy.fill_caches(setup.grid, setup.arrays)
    new_arrays, _ = setup.strategy.unlearn(setup.grid, setup.arrays, request, reference.forget_count)
    step = (theta - arrays_to_vector(new_arrays, setup.layout)) / 0.1
    # The stepped parameters are float32: dividing by eta turns their half-ulp into an error on d of ulp / eta.
    pooled.assert_within(step, reference.d, reference.error + pooled.EPS32 * theta.abs() / 0.1, "direction")


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_fresh_protocol_with_k_steps_recomputes_direction(small_cfg, tmp_path, cache_dtype):
    setup = Setup(small_cfg.replace(cache_dtype=cache_dtype), tmp_path, one_step(eta=0.3, steps=2, step_rule="sgd"))
    request = REQUESTS["client-level"]
    theta = arrays_to_vector(setup.arrays, setup.layout)
    first = setup.reference_direction(theta, request)
    theta1 = pooled.step(theta, first.d, "sgd", eta=0.3).to(torch.float32).to(torch.float64)
    second = setup.reference_direction(theta1, request)
    expected = pooled.step(theta1, second.d, "sgd", eta=0.3)
    setup.strategy.fill_caches(setup.grid, setup.arrays)
    new_arrays, report = setup.strategy.unlearn(setup.grid, setup.arrays, request, first.forget_count)
    assert report.rounds == 2
    # The second direction is taken at a theta1 that is itself off by the first step's error: both bounds add.
    bound = pooled.step_error(theta, first, "sgd", eta=0.3) * 2 + pooled.step_error(theta1, second, "sgd", eta=0.3)
    pooled.assert_within(arrays_to_vector(new_arrays, setup.layout), expected, bound)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_cached_protocol_stays_consistent_over_a_stream_of_requests(small_cfg, tmp_path, cache_dtype):
    """After a first request G_tot is reduced by G_S, so a second request matches a fresh pooled reference."""
    setup = Setup(small_cfg.replace(cache_dtype=cache_dtype), tmp_path, one_step(eta=0.2, step_rule="sgd"))
    first, second = DeletionRequest(client=2, samples="random", fraction=0.3), DeletionRequest(client=1, samples="poisoned")
    theta = arrays_to_vector(setup.arrays, setup.layout)
    setup.strategy.fill_caches(setup.grid, setup.arrays, upload=True)
    count1 = len(forget_indices(setup.data, first))
    setup.strategy.unlearn(setup.grid, setup.arrays, first, count1, protocol="cached")
    # Second request, evaluated at the same cached version (the aggregate is at theta).
    reference = setup.reference_direction(theta, second, ledger=(first,))
    new_arrays, _ = setup.strategy.unlearn(setup.grid, setup.arrays, second, reference.forget_count, protocol="cached")
    expected = pooled.step(theta, reference.d, "sgd", eta=0.2)
    # G_tot - G_S1 - G_S2: the first request's subtraction adds its own rounding, bounded by the same scale.
    pooled.assert_within(arrays_to_vector(new_arrays, setup.layout), expected, 2 * pooled.step_error(theta, reference, "sgd", eta=0.2))


def test_fresh_round_answers_from_caches_without_recomputing(small_cfg, tmp_path):
    setup = Setup(small_cfg, tmp_path, one_step(eta=1e-3))
    request = REQUESTS["client-level"]
    setup.strategy.fill_caches(setup.grid, setup.arrays)
    forget_count = len(forget_indices(setup.data, request))
    _, report = setup.strategy.unlearn(setup.grid, setup.arrays, request, forget_count)
    assert report.cache_hits == small_cfg.num_clients  # every client answered from its cache at this version


def test_repeated_withdrawal_is_idempotent_and_unknown_or_withdrawn_client_refused(small_cfg, tmp_path):
    setup = Setup(small_cfg, tmp_path, one_step(eta=1e-3))
    setup.strategy.fill_caches(setup.grid, setup.arrays)
    request = REQUESTS["client-level"]
    forget_count = len(forget_indices(setup.data, request))
    unlearned, first = setup.strategy.unlearn(setup.grid, setup.arrays, request, forget_count)
    rounds_before = sum(c.rounds for c in setup.meter.phases.values())
    ledger_before = setup.strategy.ledger
    # The same request again: the current model comes back unchanged, nothing is sent, the ledger is not extended.
    again, report = setup.strategy.unlearn(setup.grid, unlearned, request, forget_count)
    assert again is unlearned and report.status == "repeat" and report.rounds == 0 and first.status == "complete"
    assert setup.strategy.ledger == ledger_before
    assert sum(c.rounds for c in setup.meter.phases.values()) == rounds_before
    with pytest.raises(ValueError, match="already withdrawn"):
        setup.strategy.unlearn(setup.grid, unlearned, DeletionRequest(client=1, samples="poisoned"), 5)
    with pytest.raises(ValueError, match="unknown client"):
        setup.strategy.unlearn(setup.grid, setup.arrays, DeletionRequest(client=99), 1)


def test_model_vector_roundtrip(small_cfg, tmp_path):
    setup = Setup(small_cfg, tmp_path, one_step(), train_rounds=1)
    theta = arrays_to_vector(setup.arrays, setup.layout)
    load_model_vector(setup.model, theta.float())
    torch.testing.assert_close(model_vector(setup.model).double(), theta)
