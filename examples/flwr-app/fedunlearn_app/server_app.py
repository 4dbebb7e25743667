"""The ServerApp: FedAvg training with IAUFed, cache filling, the withdrawal of one client, before/after checks.

Settings come from the Flower run config (`[tool.flwr.app.config]`, `flwr run --run-config`), read once
through `fedunlearn.config.build_config`: the keys are the simulator's CLI options (kebab-case), unknown
keys are errors naming the closest valid key. `make_server_app(overrides)` lets code (tests,
`flwr.simulation.run_simulation`, whose run config is empty) set them too; overrides win.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedunlearn.config import ExperimentConfig, build_config
from fedunlearn.data import DatasetStore, FederatedData
from fedunlearn.deletion import DeletionRequest, forget_indices, kept_indices
from fedunlearn.errors import ConfigError
from fedunlearn.gradients import ParamLayout
from fedunlearn.metrics import evaluate_model
from fedunlearn.models import build_model
from simulations.results import finite_or_none
from strategies import app_config
from strategies.fedavg import UnlearningFedAvg, discover_clients
from strategies.iau_fed import IAUFed
from strategies.methods import get_method
from strategies.methods.iau import PROTOCOL_OF
from strategies.methods.retrain import REFERENCE

# The IAU methods this app runs and their protocols (from the methods' own file); the reference (retraining) is optional.
PROTOCOLS = PROTOCOL_OF
SUPPORTED_METHODS = (REFERENCE, *PROTOCOLS)


def example_config(run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """The run config, then `overrides`, as one validated ExperimentConfig (methods limited to this app's)."""
    cfg = build_config(file_settings=dict(run_config), overrides=dict(overrides or {}))
    unsupported = [m for m in cfg.methods if m not in SUPPORTED_METHODS]
    if unsupported:
        raise ConfigError(
            f"methods={','.join(cfg.methods)}: this app runs {', '.join(SUPPORTED_METHODS)}; "
            f"run {', '.join(unsupported)} with `python -m simulations.run --methods ...`"
        )
    if not any(m in PROTOCOLS for m in cfg.methods):
        raise ConfigError(f"methods={','.join(cfg.methods)}: name at least one of {', '.join(PROTOCOLS)}")
    if cfg.withdraw_round is not None:
        raise ConfigError(
            f"withdraw-round={cfg.withdraw_round}: this app withdraws after training; use "
            "`python -m simulations.run --withdraw-round T` for mid-training requests"
        )
    return cfg


def wait_for_federation(grid: Grid, expected: int, timeout: float, settle: float = 5.0) -> None:
    """Wait for `expected` SuperNodes; a count that settles elsewhere is a configuration error, raised at once.

    The simulation engine registers all its nodes before the ServerApp starts, so a count that has not
    changed for `settle` seconds is final: failing then beats waiting `timeout` for nodes that never come.
    """
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        elif count > 0 and (count >= expected or time.monotonic() - since >= settle):
            break
        time.sleep(0.1 if count < expected else 0.5)  # at the expected count, one more look catches late extras
    if count != expected:
        raise ConfigError(
            f"the federation has {count} SuperNodes but num-clients={expected}: run "
            f"`flwr run . --federation-config 'num-supernodes={expected}'`, or set "
            f"--run-config 'num-clients={count}'"
        )


class Checks:
    """The runner's removal checks (fedunlearn.metrics.evaluate_model) on the data the clients hold."""

    def __init__(self, cfg: ExperimentConfig, data: FederatedData, request: DeletionRequest) -> None:
        self.cfg = cfg
        self.data = data
        self.model_name = app_config.model_name_for(cfg)
        withdrawn = {request.client} if request.client_level else set()
        remained = torch.cat([kept_indices(data, p, [request]) for p in range(data.num_clients) if p not in withdrawn])
        deleted = forget_indices(data, request)
        heldout = torch.cat(data.client_heldout)
        self.test = (data.x_test, data.y_test)
        self.remained = (data.x_train[remained], data.y_train[remained])
        self.deleted = (data.x_train[deleted], data.y_train[deleted])
        self.heldout = (data.x_train[heldout], data.y_train[heldout])
        self.triggered = data.triggered_test()[0] if cfg.backdoor else None

    def model(self, arrays: ArrayRecord) -> torch.nn.Module:
        """A model holding `arrays`, in eval mode."""
        model = build_model(self.model_name, self.data.input_shape, self.data.num_classes)
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        return model.eval()

    def __call__(self, arrays: ArrayRecord, reference: ArrayRecord | None = None) -> dict[str, float]:
        """Accuracies, backdoor ASR, MIA AUC; distances too when the retrained `reference` is given."""
        return evaluate_model(
            self.model(arrays),
            test=self.test,
            remained=self.remained,
            deleted=self.deleted,
            triggered=self.triggered,
            target=self.cfg.backdoor_target,
            heldout=self.heldout,
            reference=self.model(reference) if reference is not None else None,
        )


def train_and_unlearn(grid: Grid, cfg: ExperimentConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train with IAUFed, fill the caches, unlearn the forgetting client with each IAU protocol; return the checks."""
    wait_for_federation(grid, cfg.num_clients, cfg.round_timeout)
    directory = discover_clients(grid, cfg.num_clients, timeout=cfg.round_timeout)
    data = DatasetStore.get(app_config.data_spec_for(cfg))
    request = app_config.deletion_request_for(cfg)
    forget_count = len(forget_indices(data, request))
    checks = Checks(cfg, data, request)

    torch.manual_seed(cfg.seed)
    model = build_model(app_config.model_name_for(cfg), data.input_shape, data.num_classes)
    initial = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items()))
    strategy = IAUFed(
        layout=ParamLayout.of(model),
        iau=app_config.iau_settings_for(cfg),
        directory=directory,
        train=app_config.train_settings_for(cfg),
        seed=cfg.seed,
        fraction_train=cfg.fraction_fit,
        allow_stale=cfg.allow_stale_cache,
        round_timeout=cfg.round_timeout,
        policy=app_config.round_policy_for(cfg),
    )  # unlearn-retries, unlearn-policy, gradient-norm-*
    started = time.perf_counter()
    trained = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds, timeout=cfg.round_timeout).arrays
    say(f"trained {cfg.rounds} rounds on {cfg.num_clients} clients in {time.perf_counter() - started:.1f} s")
    upload = any(get_method(m).uploads_caches for m in cfg.methods)
    final_evaluation = strategy.fill_caches(grid, trained, upload=upload)

    reference = None
    results: dict[str, Any] = {
        "config": cfg.to_dict(),
        "request": asdict(request),
        "forget_count": forget_count,
        "final_evaluation": final_evaluation,
        "models": {},
        "unlearning": {},
    }
    if REFERENCE in cfg.methods:
        started = time.perf_counter()
        retrainer = UnlearningFedAvg(
            directory=directory, train=app_config.train_settings_for(cfg), seed=cfg.seed, fraction_train=cfg.fraction_fit, ledger=(request,)
        )
        reference = retrainer.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds, timeout=cfg.round_timeout).arrays
        say(f"retrained without client {request.client} in {time.perf_counter() - started:.1f} s")
        results["models"][REFERENCE] = checks(reference, reference)
    results["models"]["original"] = checks(trained, reference)
    for method, protocol in PROTOCOLS.items():
        if method not in cfg.methods:
            continue
        started = time.perf_counter()
        branch = strategy.branch()
        unlearned, report = branch.unlearn(grid, trained, request, forget_count, protocol=protocol, method=method)
        # The fresh protocol's repair: --iau-repair-rounds FedAvg rounds among the remaining clients from the corrected
        # model, as the simulator's `iau` runs them; the cached protocol contacts client u alone and never repairs.
        repair = cfg.iau_repair_rounds if protocol == "fresh" else 0
        if repair > 0:
            repairer = UnlearningFedAvg(
                directory=directory,
                train=app_config.train_settings_for(cfg),
                seed=cfg.seed,
                fraction_train=cfg.fraction_fit,
                ledger=branch.ledger,
            )
            unlearned = repairer.start(grid=grid, initial_arrays=unlearned, num_rounds=repair, timeout=cfg.round_timeout).arrays
        seconds = time.perf_counter() - started
        results["models"][method] = checks(unlearned, reference)
        results["unlearning"][method] = report.to_dict() | {"wall_s": seconds, "repair_rounds": repair}
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    """A small before/after table of the checks."""
    lines = [f"{'model':<11} {'acc_test':>8} {'acc_del':>8} {'ASR':>6} {'MIA AUC':>8}"]
    for name, m in results["models"].items():
        lines.append(f"{name:<11} {m['acc_test']:8.3f} {m['acc_deleted']:8.3f} {m['backdoor_asr']:6.3f} {m['mia_auc']:8.3f}")
    return lines


def default_results_path(run_id: int) -> Path:
    """Where a run's checks are written unless the factory is told otherwise."""
    return Path(tempfile.gettempdir()) / "fedunlearn-app" / f"run-{run_id}.json"


def make_server_app(overrides: Mapping[str, Any] | None = None, results_path: str | Path | None = None) -> ServerApp:
    """The ServerApp; settings from the run config, then `overrides`; the checks go to `results_path` as JSON."""
    app = ServerApp()
    fixed = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = example_config(context.run_config, fixed)

        def say(text: str) -> None:
            log(logging.INFO, "[fedunlearn-app] %s", text)

        results = train_and_unlearn(grid, cfg, say)
        results["run_id"] = context.run_id
        for line in summary_lines(results):
            say(line)
        path = Path(results_path) if results_path is not None else default_results_path(context.run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(finite_or_none(results), indent=2) + "\n")  # NaN (e.g. no backdoor) -> null
        say(f"checks written to {path}")

    return app


# What `flwr run` loads ([tool.flwr.app.components] serverapp = "fedunlearn_app.server_app:app").
app = make_server_app()
