"""Unlearning under faults (in-process, LocalGrid): dropouts, crashes, an offline withdrawing client, a malicious one."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np
import pooled
import pytest
import torch
from flwr.app import ArrayRecord
from one_step import one_step
from snapshots import strategy_state

from fedunlearn.cache import CacheStore
from fedunlearn.costs import CostMeter
from fedunlearn.data import DatasetStore
from fedunlearn.deletion import DeletionRequest, forget_indices, kept_indices
from fedunlearn.errors import UnlearningAbortedError
from fedunlearn.gradients import ParamLayout
from fedunlearn.models import build_model
from simulations.runner import Experiment
from strategies import app_config, keys
from strategies.client_app import build_client_app
from strategies.faults import FaultPlan, FaultyClientApp, with_faults
from strategies.fedavg import discover_clients, model_version
from strategies.iau_fed import IAUFed, RoundPolicy, arrays_to_vector
from strategies.local_grid import LocalGrid
from strategies.metered_grid import MeteredGrid

ETA = 0.5
MISSING = [3, 6, 8]  # 30% of the 10 clients


@pytest.fixture
def cfg(small_cfg):
    """Ten clients (64 training examples each), client 1 withdraws."""
    return small_cfg.replace(num_clients=10, train_limit=800)


class Federation:
    """Ten in-process clients (optionally behind a FaultPlan) and an IAUFed strategy at seeded initial weights.

    The reference comparison holds at any parameters, so no training round is spent here (the whole-run tests train).
    """

    def __init__(self, cfg, tmp_path, policy: RoundPolicy, plan: FaultPlan | None = None, keep_uploads: bool = False) -> None:
        self.cfg = cfg
        self.cache_dir = str(tmp_path / "caches")
        self.data = DatasetStore.get(app_config.data_spec_for(cfg))
        self.app = with_faults(build_client_app(app_config.client_spec_for(cfg, self.cache_dir)), plan)
        self.local = LocalGrid(self.app, cfg.num_clients, capture_errors=True)
        self.grid = MeteredGrid(self.local, CostMeter())
        self.directory = discover_clients(self.grid, cfg.num_clients)
        torch.manual_seed(0)
        self.model = build_model("mlp", self.data.input_shape, self.data.num_classes)
        self.layout = ParamLayout.of(self.model)
        self.strategy = IAUFed(
            layout=self.layout,
            iau=one_step(eta=ETA, step_rule="sgd"),
            gradient_dtype="float64",
            directory=self.directory,
            train=app_config.train_settings_for(cfg),
            seed=cfg.seed,
            policy=policy,
            keep_client_uploads=keep_uploads,
        )
        initial = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in self.model.state_dict().items()))
        self.arrays = initial
        self.theta = arrays_to_vector(self.arrays, self.layout)

    def set_offline(self, partitions: list[int]) -> None:
        """These clients stop answering (as nodes that left)."""
        self.local.offline = {self.directory.node_of[p] for p in partitions}

    def reference(
        self, theta: torch.Tensor, request: DeletionRequest, answering: list[int], ledger=()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """theta - eta * d with d on pooled data, one process, independently of the code under test (tests/pooled.py):
        g_r over what `answering` clients keep, g_f over S. Returns the parameters and their float32 error bound."""
        forget = forget_indices(self.data, request)
        remaining = torch.cat([kept_indices(self.data, p, [*ledger, request]) for p in answering])
        x, y = self.data.x_train, self.data.y_train
        direction = pooled.direction(
            pooled.pooled_sums(self.model, theta, x[remaining], y[remaining]), pooled.pooled_sums(self.model, theta, x[forget], y[forget])
        )
        return pooled.step(theta, direction.d, "sgd", eta=ETA), pooled.step_error(theta, direction, "sgd", eta=ETA)

    def expected(self, theta: torch.Tensor, request: DeletionRequest, answering: list[int], ledger=()) -> torch.Tensor:
        """The reference parameters alone."""
        return self.reference(theta, request, answering, ledger)[0]

    def answering(self, request: DeletionRequest, missing: list[int]) -> list[int]:
        """Partitions whose kept data forms g_r: everyone not missing, the withdrawing client only if it keeps data."""
        return [p for p in range(self.cfg.num_clients) if p not in missing and not (p == request.client and request.client_level)]


def forget_count(fed: Federation, request: DeletionRequest) -> int:
    return len(forget_indices(fed.data, request))


def assert_params(got: ArrayRecord, reference: tuple[torch.Tensor, torch.Tensor], fed: Federation) -> None:
    vector = arrays_to_vector(got, fed.layout)
    assert torch.isfinite(vector).all()
    pooled.assert_within(vector, *reference)


@pytest.mark.parametrize(
    "request_", [DeletionRequest(client=1), DeletionRequest(client=1, samples="poisoned")], ids=["client-level", "sample-level"]
)
def test_thirty_percent_dropped_renormalised_update_equals_reference_over_answering_clients(cfg, tmp_path, request_):
    fed = Federation(cfg, tmp_path, RoundPolicy(retries=2, on_missing="renormalise"))
    fed.strategy.fill_caches(fed.grid, fed.arrays)
    fed.set_offline(MISSING)
    new, report = fed.strategy.unlearn(fed.grid, fed.arrays, request_, forget_count(fed, request_))
    assert_params(new, fed.reference(fed.theta, request_, fed.answering(request_, MISSING)), fed)
    # Not what full participation would give: the missing clients' share really was left out and renormalised.
    assert not torch.allclose(
        arrays_to_vector(new, fed.layout), fed.expected(fed.theta, request_, fed.answering(request_, [])), rtol=1e-4, atol=1e-5
    )
    assert report.status == "renormalised" and report.missing_clients == MISSING and report.retries == 2
    assert report.renormalised_count == sum(len(kept_indices(fed.data, p, [request_])) for p in fed.answering(request_, MISSING))
    assert report.rounds == 3 + (0 if request_.client_level else 1)  # sample-level: u is asked once more with n_A
    assert sorted({f["partition"] for f in report.failures}) == MISSING and len(report.failures) == 3 * len(MISSING)
    assert report.clients_answered == [p for p in range(cfg.num_clients) if p not in MISSING]


def test_abort_policy_leaves_model_bit_identical_and_a_later_request_succeeds(cfg, tmp_path):
    fed = Federation(cfg, tmp_path, RoundPolicy(retries=1, on_missing="abort"), keep_uploads=True)
    fed.strategy.fill_caches(fed.grid, fed.arrays, upload=True)  # the aggregate cache and the uploads are state too
    request = DeletionRequest(client=1)
    before = {name: array.numpy().tobytes() for name, array in fed.arrays.items()}
    state = strategy_state(fed.strategy)
    assert state["total"] is not None and state["uploads"]
    version = model_version(fed.arrays)
    fed.set_offline(MISSING)
    with pytest.raises(UnlearningAbortedError, match=r"client\(s\) \[3, 6, 8\] did not answer the correction round after 1 retries") as err:
        fed.strategy.unlearn(fed.grid, fed.arrays, request, forget_count(fed, request))
    assert err.value.report["status"] == "aborted" and err.value.report["missing_clients"] == MISSING
    assert {name: array.numpy().tobytes() for name, array in fed.arrays.items()} == before and model_version(fed.arrays) == version
    assert strategy_state(fed.strategy) == state  # the strategy's own ledger, counts and caches, not only the caller's record
    assert fed.strategy.ledger == () and 1 in fed.strategy.active_partitions()
    fed.set_offline([])  # they come back: the same request now goes through over everyone
    new, report = fed.strategy.unlearn(fed.grid, fed.arrays, request, forget_count(fed, request))
    assert report.status == "complete"
    assert_params(new, fed.reference(fed.theta, request, fed.answering(request, [])), fed)


def test_client_missing_from_the_correction_comes_back_and_refreshes_its_cache(cfg, tmp_path):
    fed = Federation(cfg, tmp_path, RoundPolicy(retries=0, on_missing="renormalise"))
    fed.strategy.fill_caches(fed.grid, fed.arrays)
    first = DeletionRequest(client=1)
    fed.set_offline([3])
    new, report = fed.strategy.unlearn(fed.grid, fed.arrays, first, forget_count(fed, first))
    assert report.missing_clients == [3]
    store = CacheStore(fed.cache_dir, "float64")
    assert store.get(3).version == model_version(fed.arrays)  # its cache is at the model before the correction
    fed.set_offline([])
    second = DeletionRequest(client=2, samples="random", fraction=0.3)
    newer, report2 = fed.strategy.unlearn(fed.grid, new, second, forget_count(fed, second))
    assert store.get(3).version == model_version(new)  # it got the new model and recomputed its cache there
    assert report2.cache_hits == 0 and report2.stale_caches == []  # no cache at the old version was used
    theta_new = arrays_to_vector(new, fed.layout)
    assert_params(newer, fed.reference(theta_new, second, [p for p in range(cfg.num_clients) if p != 1], ledger=(first,)), fed)


def test_offline_withdrawing_client_uses_its_uploaded_cache_or_fails_clearly(cfg, tmp_path):
    plan = FaultPlan(offline_client=1)
    fed = Federation(cfg, tmp_path, RoundPolicy(retries=1), plan=plan, keep_uploads=True)
    fed.strategy.fill_caches(fed.grid, fed.arrays, upload=True)
    request = DeletionRequest(client=1)
    expected = fed.reference(fed.theta, request, fed.answering(request, []))
    for protocol in ("fresh", "cached"):
        new, report = fed.strategy.branch().unlearn(fed.grid, fed.arrays, request, forget_count(fed, request), protocol=protocol)
        assert report.status == "fallback" and report.fallback == "uploaded-cache", protocol
        assert_params(new, expected, fed)
    assert [e["fault"] for e in fed.app.log] == ["offline"] * 4  # two attempts per protocol, never answered
    sample = DeletionRequest(client=1, samples="poisoned")
    with pytest.raises(UnlearningAbortedError, match="G_S cannot be taken from it"):
        fed.strategy.branch().unlearn(fed.grid, fed.arrays, sample, forget_count(fed, sample))
    fed.strategy.client_uploads.clear()
    with pytest.raises(UnlearningAbortedError, match="withdrawing client 1 did not answer and the server holds no cache it uploaded"):
        fed.strategy.unlearn(fed.grid, fed.arrays, request, forget_count(fed, request))


def test_gradient_of_norm_1e6_is_clipped_or_rejected(cfg, tmp_path):
    fed = Federation(cfg, tmp_path, RoundPolicy(), plan=FaultPlan(malicious_client=3, malicious_norm=1e6))
    fed.strategy.fill_caches(fed.grid, fed.arrays)
    request = DeletionRequest(client=1)
    count = forget_count(fed, request)
    honest = fed.expected(fed.theta, request, fed.answering(request, []))

    def change(policy: RoundPolicy):
        branch = fed.strategy.branch()
        branch.policy = policy
        new, report = branch.unlearn(fed.grid, fed.arrays, request, count)
        return float((arrays_to_vector(new, fed.layout) - fed.theta).norm()), new, report

    unbounded, _, _ = change(RoundPolicy())
    bound = 5.0
    clipped, _, clip_report = change(RoundPolicy(norm_bound=bound))
    rejected, new, reject_report = change(RoundPolicy(retries=1, on_missing="renormalise", norm_bound=bound, norm_action="reject"))
    honest_change = float((honest - fed.theta).norm())
    assert unbounded > 0.4 * ETA * 1e6  # one client moved the model by about eta * 1e6
    assert clip_report.clipped_clients == [3] and clipped <= honest_change + ETA * bound + 1e-6
    assert [r["partition"] for r in reject_report.rejected] == [3, 3] and reject_report.missing_clients == [3]
    assert "exceeds the bound 5" in reject_report.rejected[0]["reason"]
    assert_params(new, fed.reference(fed.theta, request, fed.answering(request, [3])), fed)
    assert rejected == pytest.approx(float((fed.expected(fed.theta, request, fed.answering(request, [3])) - fed.theta).norm()), rel=1e-4)


def test_dropout_draws_are_seeded_and_retries_draw_again():
    from strategies.faults import dropout_draw

    # The documented contract: the first uniform of PCG64 seeded by SeedSequence([seed, partition, counter]).
    expected = [np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, 2, k]))).random() for k in range(200)]
    draws = [dropout_draw(7, 2, k) for k in range(200)]
    assert draws == expected
    # Each of seed, partition and counter changes the draw (a retry is a new counter, so a new draw).
    assert draws != [dropout_draw(8, 2, k) for k in range(200)] and draws != [dropout_draw(7, 3, k) for k in range(200)]
    assert len(set(draws)) == 200
    assert 0.2 < sum(d < 0.3 for d in draws) / 200 < 0.4


def test_the_faulty_app_drops_exactly_the_messages_whose_draw_is_below_the_probability(cfg, tmp_path):
    """Message k of a client is dropped iff dropout_draw(seed, partition, k) < p; the retry of a dropped one is k + 1."""
    from strategies.faults import dropout_draw

    plan = FaultPlan(seed=5, dropout_prob=0.4, dropout_types=(keys.QUERY_GRADIENT,))
    fed = Federation(cfg, tmp_path, RoundPolicy(retries=2, on_missing="renormalise"), plan=plan)
    fed.strategy.fill_caches(fed.grid, fed.arrays)
    request = DeletionRequest(client=1)
    fed.strategy.unlearn(fed.grid, fed.arrays, request, forget_count(fed, request))
    dropped = sorted((e["partition"], e["counter"]) for e in fed.app.log if e["fault"] == "dropout")
    asked: dict[int, int] = {}
    for p in range(cfg.num_clients):  # first attempt is counter 0; a dropped client is asked again (up to 2 retries)
        k = 0
        while dropout_draw(5, p, k) < 0.4 and k < 2:
            k += 1
        asked[p] = k + 1
    expected = sorted((p, k) for p, n in asked.items() for k in range(n) if dropout_draw(5, p, k) < 0.4)
    assert dropped == expected and dropped  # this seed drops some


def run_in_process(cfg, tmp_path, plan: FaultPlan):
    app = FaultyClientApp(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))), plan)
    experiment = Experiment(cfg, out_dir=tmp_path / "out", show_progress=False)
    experiment.drive(LocalGrid(app, cfg.num_clients, capture_errors=True))
    return experiment.results, app.log


def runner_cfg(**changes):
    from fedunlearn.config import build_config

    return build_config(
        "smoke",
        overrides={
            "model": "mlp",
            "rounds": 2,
            "local_epochs": 1,
            "num_clients": 6,
            "train_limit": 360,
            "shadow_mia": False,
            "methods": "retrain,iau,iau-cached",
            **changes,
        },
    )


def test_whole_run_survives_crash_dropouts_and_offline_withdrawing_client(tmp_path):
    cfg = runner_cfg(
        crash_client=2, crash_round=1, dropout_prob=0.3, unlearn_retries=1, unlearn_policy="renormalise", withdrawing_offline=True, seed=3
    )
    # Dropouts only in the correction rounds here (the config's plan drops in every round type).
    plan = dataclasses.replace(app_config.fault_plan_for(cfg), dropout_types=(keys.QUERY_GRADIENT,))
    results, log = run_in_process(cfg, tmp_path, plan)
    assert results["status"] == "complete"
    reliability = results["reliability"]
    assert reliability["results_lost"] == 0 and set(results["models"]) == {"original", "retrain", "iau", "iau-cached"}
    crashes = [e for e in log if e["fault"] == "crash"]
    assert len(crashes) == 2 and reliability["failed_by_phase"]["train"] == 2  # round 1 of training and of retraining
    iau = results["models"]["iau"]
    assert iau["status"] in ("renormalised", "fallback") and iau["unlearning"]["fallback"] == "uploaded-cache"
    # iau is the first method to send gradient queries: its first attempt is each client's draw 0, the retry draw 1.
    first = {e["partition"] for e in log if e["fault"] == "dropout" and e["counter"] == 0}
    again = {e["partition"] for e in log if e["fault"] == "dropout" and e["counter"] == 1}
    assert first - again, "this seed should have clients that came back on the retry"
    assert iau["unlearning"]["missing_clients"] == sorted(first & again) and iau["unlearning"]["retries"] == 1
    unlearn_faults = sum(1 for e in log if e["fault"] in ("dropout", "offline"))
    assert reliability["failed_by_phase"]["unlearn"] == unlearn_faults
    causes = reliability["failed_by_cause"]  # the server-side count, which Ray runs also have
    assert causes["crash"] == 2 and causes.get("dropout", 0) + causes["offline"] == unlearn_faults
    n_test = len(DatasetStore.get(app_config.data_spec_for(cfg)).y_test)
    for name, model in results["models"].items():
        hits = model["acc_test"] * n_test  # a fraction of the test split: k / n for a whole k
        assert 0 <= model["acc_test"] <= 1 and abs(hits - round(hits)) < 1e-6, (name, model["acc_test"])


def test_whole_run_records_an_aborted_method_with_the_model_unchanged(tmp_path):
    cfg = runner_cfg(methods="retrain,iau", withdrawing_offline=True, unlearn_retries=0)
    results, _ = run_in_process(cfg, tmp_path, app_config.fault_plan_for(cfg))
    assert results["status"] == "complete" and results["reliability"]["results_lost"] == 0
    iau, original = results["models"]["iau"], results["models"]["original"]
    assert iau["status"] == "aborted" and "no cache it uploaded" in iau["error"]
    assert results["reliability"]["methods"]["iau"]["status"] == "aborted"
    for key in ("acc_test", "acc_deleted", "backdoor_asr", "dist_para", "mia_auc"):
        assert iau[key] == original[key], key  # the unchanged model is the trained one
