"""One experiment end to end: FedAvg on Flower's simulation engine (Ray), caches, unlearning methods, evaluation.

The ServerApp's `main` drives every phase through one metered Grid, so each phase's rounds,
participations, bytes and client compute come from the real messages. The driver evaluates
every model on the same data the clients hold and writes results as they are produced.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedunlearn.band import band_stats, versus_band
from fedunlearn.config import ExperimentConfig
from fedunlearn.costs import CostMeter, PhaseCost, speedup
from fedunlearn.data import DatasetStore, FederatedData
from fedunlearn.deletion import DeletionRequest, forget_indices
from fedunlearn.durability import relearn_steps
from fedunlearn.errors import ConfigError, FedUnlearnError, UnlearningAbortedError
from fedunlearn.gradients import ParamLayout
from fedunlearn.iau import CorrectionStepper
from fedunlearn.metrics import accuracy, attack_success_rate
from fedunlearn.mia import MIN_SCORED, membership_sets
from fedunlearn.models import build_model, check_model_fits
from strategies import app_config, keys
from strategies.client_app import build_client_app
from strategies.engine_tuning import faster_message_pickup
from strategies.faults import FAULT_PREFIX, with_faults
from strategies.fedavg import UnlearningFedAvg, discover_clients
from strategies.iau_fed import IAUFed
from strategies.metered_grid import MeteredGrid
from strategies.methods.retrain import REFERENCE
from strategies.update_recorder import fan_out
from strategies.wire import as_float

from .checkpoint import Checkpoints, differing_settings
from .client_errors import ClientErrors, ClientFailure
from .evaluation import Evaluator, attacks_of
from .lifecycle import private_ray, ray_init_args
from .methods import MethodContext, MethodOutcome, check_methods, get_method
from .preflight import check_data, check_devices, kebab_keys
from .progress import Progress
from .results import check_writable, existing_status, write_results
from .shadows import ShadowBank, train_shadow_bank
from .tracking import tracker_for

# What the band of retrained models describes (distances only over the extra retrains: the reference is at 0 from itself).
BAND_METRICS = ("acc_test", "acc_remained", "acc_deleted", "backdoor_asr", "mia_auc", "mia_shadow_auc", "mia_lira_auc")
BAND_DISTANCES = ("dist_para", "dist_output", "dist_output_deleted", "dist_output_triggered")

logger = logging.getLogger("fedunlearn.runner")


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    import flwr

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class Experiment:
    """Runs one configured experiment and collects its results (`run()` returns the results dict)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: str | Path | None = None,
        show_progress: bool = True,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.cfg = cfg
        self.methods = check_methods(self._method_names(cfg))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        try:
            self.request = app_config.deletion_request_for(cfg)
            self.requests = app_config.deletion_requests_for(cfg)  # more than one: a stream of withdrawals
            self.data_spec = app_config.data_spec_for(cfg)
        except ValueError as err:  # the data and deletion layers check their own settings too
            raise ConfigError(kebab_keys(str(err))) from None
        self.progress = Progress(enabled=show_progress)
        self.meter = CostMeter()
        self.results: dict[str, Any] = {
            "config": cfg.to_dict(),
            "machine": machine_info(),
            "status": "running",
            "request": asdict(self.request),
            "models": {},
            "phases": {},
            "history": {},
        }
        if len(self.requests) > 1:
            self.results["requests"] = [asdict(r) for r in self.requests]
            self.results["stream"] = []
        self._error: BaseException | None = None
        self.cache_dir: str | None = None  # the clients' cache folder while run() runs (benchmarks measure it on disk)
        # Every strategy the run drives, by label: their rejected replies and failures feed results["reliability"].
        self._observed: list[tuple[str, UnlearningFedAvg]] = []
        self._checkpoint_label: str | None = None
        self._checkpoint_until = 0
        self.checkpoints = Checkpoints(self.out_dir) if self.out_dir is not None else None
        self.resume_state: dict[str, Any] | None = None
        # The pre-flight: everything that can be found wrong before Ray or any training starts (exit 2 on the CLI).
        check_devices(cfg)
        self._prepare_out_dir(resume, overwrite)
        data = check_data(self.data_spec)  # loaded once here (the driver keeps it for the run)
        # A plug-in PKG.MODULE:FACTORY that does not fit the data fails with one line, before Ray starts.
        check_model_fits(app_config.model_name_for(self.cfg), data.x_train[:2], data.num_classes)
        self._check_membership(data)
        self.tracker = tracker_for(cfg, self.out_dir)  # --tracking: checked here, before Ray; opened at its first event
        if overwrite and not resume and self.checkpoints is not None and self.checkpoints.root.exists():
            # Every check passed: a new run must not leave the old run's checkpoint behind for a later --resume.
            shutil.rmtree(self.checkpoints.root)

    def _check_membership(self, data: FederatedData) -> None:
        """Costly attacks on sets too small to score are refused before anything starts."""
        costly = [a for a in attacks_of(self.cfg) if a in ("lira", "ulira")]
        if not costly:
            return
        try:
            sets = membership_sets(data, self.requests)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data: {err}") from None
        if sets.too_small:
            raise ConfigError(
                f"mia-attacks={','.join(costly)}: {sets.scored()['which']}: too few to score (at least "
                f"{MIN_SCORED} each); forget more clean examples (e.g. --forget-samples random --forget-fraction 0.5, "
                "or the memorization preset) or drop these attacks"
            )

    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> None:
        """--out is a writable folder; finished, failed or interrupted runs there are not overwritten by accident.

        On --resume the checkpoint is loaded and checked (same settings, a method that can resume); without it,
        a folder holding anything of another run is refused unless --overwrite, and the message offers --resume
        only where resuming would work.
        """
        if self.out_dir is None:
            if resume:
                raise ConfigError("--resume needs --out DIR: the directory of the interrupted run")
            return
        out = self.out_dir
        if str(out).strip() == "":
            raise ConfigError("out='': give the folder results go to, e.g. --out results")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out={str(out)!r}: is a file, not a folder; give a folder (created if missing), e.g. --out results")
        assert self.checkpoints is not None
        status = existing_status(out)
        state = self.checkpoints.load_state()  # a damaged state.json raises ConfigError naming it
        blocker = self._resume_blocker(state, status)
        if resume:
            if blocker is not None:
                raise ConfigError(f"--resume: {blocker}")
            assert state is not None
            self.checkpoints.load_arrays("training")  # a damaged model file is found now, not after Ray started
            self.resume_state = state
            self.results["resumed_from_round"] = state["round"]
        elif (status is not None or state is not None) and not overwrite:
            held = (
                f"{out / 'results.json'} already holds results (status: {status})"
                if status is not None
                else f"{self.checkpoints.root} holds the checkpoint of an interrupted run (round {state['round'] if state else '?'})"
            )
            advice = "use --resume to continue it, " if blocker is None else ""
            why = f" (--resume cannot: {blocker})" if blocker is not None and state is not None and status != "complete" else ""
            raise ConfigError(f"{held}; {advice}--overwrite to replace it, or another --out DIR{why}")
        check_writable(out)

    def _resume_blocker(self, state: dict[str, Any] | None, status: str | None) -> str | None:
        """Why --resume cannot continue what DIR holds, or None when it can."""
        assert self.checkpoints is not None and self.out_dir is not None
        if status == "complete":
            return f"{self.out_dir / 'results.json'} holds a complete run: nothing to resume"
        if state is None:
            return (
                f"{self.out_dir} holds no checkpoint ({self.checkpoints.root / 'state.json'}; checkpoints are written every "
                "--checkpoint-every rounds of training): start it again with --overwrite or another --out"
            )
        differing = differing_settings(state.get("config", {}), self.cfg.to_dict())
        if differing:
            detail = ", ".join(f"{k}: checkpoint {v[0]!r} vs now {v[1]!r}" for k, v in differing.items())
            return (
                f"the checkpoint was made with other settings ({detail}); resume with the settings saved under 'config' "
                f"in {self.checkpoints.root / 'state.json'}, or start a new run with --overwrite or another --out"
            )
        recording = [m.name for m in self.methods if m.recorder is not None]  # the method says so, not its name
        if state.get("round", 0) > 0 and recording:
            return (
                f"{' and '.join(recording)} record client updates during training that are not checkpointed; "
                "start again with --overwrite, or drop those methods"
            )
        return None

    @staticmethod
    def _method_names(cfg: ExperimentConfig) -> list[str]:
        names = list(cfg.methods)
        if REFERENCE not in names:  # every distance and speedup is measured against retraining
            names.insert(0, REFERENCE)
        return [REFERENCE, *[n for n in names if n != REFERENCE]]

    # ----- the outer shell: Ray, Flower, files -------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Start the Flower simulation on Ray, run every phase, write and return the results."""
        from flwr.simulation import run_simulation

        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        if not self.cfg.verbose:  # errors still show; Flower's per-round INFO and deprecation notices do not
            for name in ("flwr", "ray"):
                logging.getLogger(name).setLevel(logging.ERROR)
        cache_dir = self.cache_dir = tempfile.mkdtemp(prefix="fedunlearn-caches-")
        spec = app_config.client_spec_for(self.cfg, cache_dir)
        client_app, num_supernodes = app_config.supernode_app(
            self.cfg, spec, with_faults(build_client_app(spec), app_config.fault_plan_for(self.cfg))
        )
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                self.drive(grid)
            except BaseException as err:  # kept so run() can re-raise it after the engine shuts down
                self._error = err
                self.results["status"] = f"failed: {type(err).__name__}: {err}"
                self.results["traceback"] = traceback.format_exc()
                self._write()
                raise

        backend_config: dict[str, Any] = {
            "client_resources": {"num_cpus": self.cfg.num_cpus_per_client, "num_gpus": self.cfg.num_gpus_per_client},
            "init_args": ray_init_args(self.cfg.ray_address, self.cfg.verbose, None),  # used only if Ray is not up yet
        }
        started = time.perf_counter()
        client_errors = ClientErrors(enabled=not self.cfg.verbose)
        try:
            with (
                self.progress,
                client_errors,
                private_ray(self.cfg.ray_address, self.cfg.verbose),
                faster_message_pickup(self.cfg.grid_poll_interval) as tuned,
            ):
                self.results.setdefault("execution", {})["engine_pickup_interval_s"] = self.cfg.grid_poll_interval if tuned else 0.1
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=num_supernodes,
                    backend_config=backend_config,
                    verbose_logging=self.cfg.verbose,
                )
        except KeyboardInterrupt as err:  # SIGINT or SIGTERM (lifecycle.Interrupted): Ray is down by now; say so on disk
            self.results["status"] = f"interrupted: {err or 'SIGINT'}"
            self._record_client_errors(client_errors)
            self._write()
            raise
        except Exception as err:  # run_simulation re-raises the ServerApp's error (kept in self._error) or its own
            if self._error is None:
                self._error = err
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
            self.tracker.finish(self.results)  # a failed run's tracking ends too (a finished one's already did)
        self._record_client_errors(client_errors)
        if self._error is not None:
            if client_errors.count:
                # What failed first is a client: its own message leads, once, instead of the engine's retries of it.
                raise ClientFailure(client_errors.summary(), self._error) from self._error
            raise self._error
        if self.results["status"] != "complete":
            self.results["status"] = "failed: the simulation ended before the experiment finished (see the Flower/Ray log above)"
            self._write()
            if client_errors.count:
                raise ClientFailure(client_errors.summary(), None)
            raise RuntimeError(self.results["status"])
        if client_errors.count:  # the run coped (retries, dropouts, injected faults): said once, not per message
            print(
                f"[fedunlearn] {client_errors.count} client message{'s' if client_errors.count != 1 else ''} failed during the run "
                f"(first: {client_errors.first}); see results.json: client_errors and reliability",
                file=sys.stderr,
            )
        self.results["total_wall_s"] = time.perf_counter() - started
        self._write()
        return self.results

    def _record_client_errors(self, errors: ClientErrors) -> None:
        if errors.count:
            self.results["client_errors"] = errors.to_dict()
            if self.results["status"] != "complete":
                self._write()

    def _write(self) -> None:
        if self._observed:
            self.results["reliability"] = self._reliability()
        if self.out_dir is not None:
            write_results(self.out_dir, self.results)

    # ----- the inside: every phase, driven through one metered grid -----------------------------
    def drive(self, grid: Grid) -> None:
        """All phases of the experiment on `grid` (a Flower Grid, or a LocalGrid in tests)."""
        cfg = self.cfg
        grid, execution = app_config.server_grid(cfg, grid)
        self.results["execution"] = {**self.results.get("execution", {}), **execution}
        metered = MeteredGrid(grid, self.meter)
        with self.meter.phase("setup"):
            directory = discover_clients(metered, cfg.num_clients, timeout=cfg.round_timeout)
            data = DatasetStore.get(self.data_spec)
            forget_count = len(forget_indices(data, self.request))
            # torch.optim's first step() in a process imports torch._dynamo (about 2 s here): pay it during setup,
            # not inside the first unlearning method's measured seconds.
            CorrectionStepper(torch.zeros(1, dtype=torch.float64), app_config.iau_settings_for(cfg)).step(
                torch.ones(1, dtype=torch.float64)
            )
            torch.manual_seed(cfg.seed)
            initial_model = build_model(app_config.model_name_for(cfg), data.input_shape, data.num_classes)
            initial = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in initial_model.state_dict().items()))
        self.results["forget_count"] = forget_count
        self.results["num_parameters"] = ParamLayout.of(initial_model).numel
        self.data_input_shape, self.data_num_classes = data.input_shape, data.num_classes
        self.evaluator = Evaluator(cfg, data, (self.request,), bank=self._shadow_bank(data))

        def fedavg(
            ledger: tuple[DeletionRequest, ...] = (), round_offset: int = 0, label: str = "original", seed: int | None = None
        ) -> UnlearningFedAvg:
            made = UnlearningFedAvg(
                directory=directory,
                train=app_config.train_settings_for(cfg),
                seed=cfg.seed if seed is None else seed,
                fraction_train=cfg.fraction_fit,
                ledger=ledger,
                round_offset=round_offset,
                on_round_end=self._round_hook(label),
                partial_sums=cfg.cohort_partial_sums,
            )
            self._observed.append((label, made))
            return made

        strategy = IAUFed(
            layout=ParamLayout.of(initial_model),
            iau=app_config.iau_settings_for(cfg),
            allow_stale=cfg.allow_stale_cache,
            round_timeout=cfg.round_timeout,
            directory=directory,
            train=app_config.train_settings_for(cfg),
            seed=cfg.seed,
            fraction_train=cfg.fraction_fit,
            on_round_end=self._round_hook("original"),
            policy=app_config.round_policy_for(cfg),
            keep_client_uploads=cfg.withdrawing_offline,
            partial_sums=cfg.cohort_partial_sums,
        )
        self._observed.append(("original", strategy))
        # What some methods need from training (FedEraser the client updates of every Delta_t-th round, PGA each
        # client's last local model): each selected method's own recorder (their storage is reported with them).
        recorded = {m.name: m.recorder(cfg) for m in self.methods if m.recorder is not None}
        if recorded:
            strategy.update_recorder = fan_out(list(recorded.values()))
        request_round = cfg.withdraw_round or cfg.rounds
        start_round, start_arrays = 0, initial
        if self.resume_state is not None and self.checkpoints is not None:
            saved = self.checkpoints.load_arrays("training")
            if saved is not None and 0 < self.resume_state["round"] <= request_round:
                start_round, start_arrays = int(self.resume_state["round"]), saved
                self.results["history"] = self.resume_state["history"]
                self.meter.phases["training"] = PhaseCost(**self.resume_state["training_cost"])
        strategy.round_offset = start_round
        self._checkpoint_label = "original"
        self._checkpoint_until = request_round
        self.progress.start_phase("training", request_round - start_round)
        with self.meter.phase("training"):
            trained = (
                start_arrays
                if start_round == request_round
                else strategy.start(
                    grid=metered, initial_arrays=start_arrays, num_rounds=request_round - start_round, timeout=cfg.round_timeout
                ).arrays
            )
        strategy.round_offset = 0
        self._checkpoint_label = None
        strategy.update_recorder = None
        # The final evaluation of training fills every client's gradient cache (and uploads it for iau-cached).
        upload = any(m.uploads_caches for m in self.methods)
        self.progress.start_phase("caching (final evaluation)", 1)
        with self.meter.phase("caching"):
            self.results["final_evaluation"] = strategy.fill_caches(metered, trained, upload=upload)
        self.progress.advance()
        original = trained
        self.original_arrays = trained
        if cfg.withdraw_round is not None:  # what the model would have become had nobody asked
            self.progress.start_phase("original: training on", cfg.rounds - request_round)
            with self.meter.phase("original-continuation"):
                original = (
                    fedavg(ledger=(), round_offset=request_round, label="original")
                    .start(grid=metered, initial_arrays=trained, num_rounds=cfg.rounds - request_round, timeout=cfg.round_timeout)
                    .arrays
                )
        self.results["phases"] = {name: cost.to_dict() for name, cost in self.meter.phases.items()}
        self.results["models"]["original"] = self.evaluator.full(original, None)
        self._write()

        # Each method serves the requests with its own branch of the strategy (its ledger, counts, aggregate cache) and
        # from its own previous model: in a stream, request j is served by every method before request j+1 arrives.
        states = {m.name: strategy.branch() for m in self.methods}
        current = {m.name: trained for m in self.methods}
        totals: dict[str, PhaseCost] = {}
        for index, request in enumerate(self.requests):
            evaluator = self.evaluator if index == 0 else Evaluator(cfg, data, self.requests[: index + 1], bank=self.evaluator.bank)
            count = forget_count if index == 0 else len(forget_indices(data, request))
            step = self._serve(
                index, request, count, evaluator, states, current, original, initial, metered, fedavg, request_round, recorded, totals
            )
            self.results["models"] = step
            self._write()
            self.tracker.on_method("original", step["original"], step=index + 1)
        if len(self.requests) > 1:  # the headline of a stream: the final models, at the cost of serving every request
            reference_total = totals.get(REFERENCE)
            self.results["models"] = copy.deepcopy(self.results["models"])  # results["stream"] keeps the last request's own
            for name, entry in self.results["models"].items():
                if name in totals:
                    entry["cost_last_request"] = entry["cost"]
                    entry["cost"] = totals[name].to_dict()
                    if name != REFERENCE and reference_total is not None:
                        entry["speedup"] = speedup(reference_total, totals[name])
        self.results["status"] = "complete"
        self._write()
        self.tracker.finish(self.results)

    def _serve(
        self,
        index: int,
        request: DeletionRequest,
        forget_count: int,
        evaluator: Evaluator,
        states: dict[str, IAUFed],
        current: dict[str, ArrayRecord],
        original: ArrayRecord,
        initial: ArrayRecord,
        metered: Grid,
        fedavg: Callable[..., UnlearningFedAvg],
        request_round: int,
        recorded: dict[str, Any],
        totals: dict[str, PhaseCost],
    ) -> dict[str, Any]:
        """Every method serves one request; returns the models' entries (original, retrain, methods) after it."""
        cfg = self.cfg
        stream = len(self.requests) > 1
        suffix = f"#{index + 1}" if stream else ""
        models: dict[str, Any] = {}  # "original" is evaluated once retraining gives the reference (retrain runs first)
        if stream:
            self.results["stream"].append({"request": asdict(request), "forget_count": forget_count, "models": models})
        reference: ArrayRecord | None = None
        reference_cost: PhaseCost | None = None
        for method in self.methods:
            label = f"{method.name} (request {index + 1}/{len(self.requests)})" if stream else method.name
            self.progress.start_phase(f"unlearning: {label}", cfg.rounds if method.name == REFERENCE else 1)
            state = states[method.name]
            context = MethodContext(
                cfg=cfg,
                grid=metered,
                strategy=state,
                initial_arrays=initial,
                arrays=current[method.name],
                request=request,
                forget_count=forget_count,
                fedavg=fedavg,
                request_round=request_round,
                recorded=recorded.get(method.name),
                round_hook=self._round_hook,
                untimed=self.meter.untimed,
            )
            phase = f"unlearn:{method.name}{suffix}"
            with self.meter.phase(phase):
                try:
                    outcome = method.run(context)
                except FedUnlearnError as err:  # recorded with the unchanged model; the other methods still run
                    if method.name == REFERENCE:
                        raise
                    outcome = self._unfinished(method.name, context, err)
            if method.name != REFERENCE:
                self.progress.advance()
            cost = self.meter.get(phase)
            arrays = outcome.arrays
            entry: dict[str, Any] = {}
            if cfg.withdraw_round is not None and method.continues:
                remaining = cfg.rounds - request_round
                self.progress.start_phase(f"{method.name}: training on without the forgotten data", remaining)
                with self.meter.phase(f"continue:{method.name}"):
                    arrays = (
                        fedavg(
                            ledger=(*state.ledger, request) if request not in state.ledger else state.ledger,
                            round_offset=request_round,
                            label=method.name,
                        )
                        .start(grid=metered, initial_arrays=arrays, num_rounds=remaining, timeout=cfg.round_timeout)
                        .arrays
                    )
                entry["unlearning_cost"] = cost.to_dict()
                cost = cost + self.meter.get(f"continue:{method.name}")
            if outcome.details.get("status") not in ("aborted", "failed"):
                state.record_request(request, forget_count)  # the next request of a stream sees this one in force
            current[method.name] = arrays
            entry.update(evaluator.full(arrays, reference if method.name != REFERENCE else arrays, method=method.name))
            if method.name == REFERENCE:
                reference, reference_cost = arrays, cost
                models = {"original": evaluator.full(original, reference), **models}
                if stream:
                    self.results["stream"][index]["models"] = models
                if cfg.retrain_seeds > 0:
                    band = self._retrain_band(index, evaluator, entry, reference, metered, fedavg, suffix)
                    if stream:
                        self.results["stream"][index]["retrain_band"] = band
                    models["original"]["vs_retrain_band"] = versus_band(models["original"], band, BAND_DISTANCES)
            elif "retrain_band" in self.results:
                entry["vs_retrain_band"] = versus_band(entry, self.results["retrain_band"], BAND_DISTANCES)
            if cfg.relearn_rounds > 0:
                entry["durability"] = self._durability(
                    method.name, arrays, evaluator, metered, fedavg, ledger=tuple(self.requests[: index + 1]), suffix=suffix
                )
            if cfg.relearn_steps > 0:
                entry["relearn_probe"] = self._relearn_probe(evaluator, arrays, original)
                if method.name == REFERENCE:
                    models["original"]["relearn_probe"] = self._relearn_probe(evaluator, original, original)
            entry["cost"] = cost.to_dict()
            totals[method.name] = totals[method.name] + cost if method.name in totals else cost
            if method.name != REFERENCE and reference_cost is not None:
                entry["speedup"] = speedup(reference_cost, cost)
            entry.update(outcome.details)
            unlearning = entry.get("unlearning")
            entry.setdefault("status", unlearning.get("status", "complete") if isinstance(unlearning, dict) else "complete")
            models[method.name] = entry
            if not stream:
                self.results["models"] = models
            self.results["phases"] = {name: c.to_dict() for name, c in self.meter.phases.items()}
            self.progress.note(label, entry)
            self.tracker.on_method(method.name, entry, step=index + 1)
            self._write()
        return models

    def _retrain_band(
        self,
        index: int,
        evaluator: Evaluator,
        reference_entry: dict[str, Any],
        reference: ArrayRecord,
        grid: Grid,
        fedavg: Callable[..., UnlearningFedAvg],
        suffix: str,
    ) -> dict[str, Any]:
        """--retrain-seeds more retrainings with other seeds (initial weights, shuffles, sampling); the band over all of them."""
        cfg = self.cfg
        ledger = tuple(self.requests[: index + 1])
        runs: list[dict[str, Any]] = []
        for j in range(1, cfg.retrain_seeds + 1):
            seed = int(np.random.SeedSequence([cfg.seed, 11, j]).generate_state(1)[0])
            torch.manual_seed(seed)
            model = build_model(app_config.model_name_for(cfg), self.data_input_shape, self.data_num_classes)
            initial = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items()))
            label = f"retrain-band-{j}"
            self.progress.start_phase(f"retrain band: seed {j} of {cfg.retrain_seeds}{suffix}", cfg.rounds)
            phase = f"{label}{suffix}"
            with self.meter.phase(phase):
                arrays = (
                    fedavg(ledger=ledger, round_offset=0, label=label, seed=seed)
                    .start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds, timeout=cfg.round_timeout)
                    .arrays
                )
            metrics = evaluator.full(arrays, reference)
            runs.append(
                {"seed": seed, **{k: metrics.get(k) for k in (*BAND_METRICS, *BAND_DISTANCES)}, "cost": self.meter.get(phase).to_dict()}
            )
        band = {**band_stats([reference_entry, *runs], BAND_METRICS), **band_stats(runs, BAND_DISTANCES)}
        self.results["retrain_band"] = band
        self.results["retrain_band_runs"] = runs
        return band

    def _durability(
        self,
        name: str,
        arrays: ArrayRecord,
        evaluator: Evaluator,
        grid: Grid,
        fedavg: Callable[..., UnlearningFedAvg],
        ledger: tuple[DeletionRequest, ...],
        suffix: str,
        rounds: int | None = None,
    ) -> dict[str, Any]:
        """`rounds` (--relearn-rounds) more FedAvg rounds on the remaining clients from `arrays`, same seeds for every model."""
        cfg = self.cfg
        rounds = cfg.relearn_rounds if rounds is None else rounds
        label = f"durability:{name}"
        continued = arrays
        if rounds > 0:
            self.progress.start_phase(f"durability: {name}, {rounds} more rounds{suffix}", rounds)
            with self.meter.phase(f"{label}{suffix}"):
                continued = (
                    fedavg(ledger=ledger, round_offset=cfg.rounds, label=label)
                    .start(grid=grid, initial_arrays=arrays, num_rounds=rounds, timeout=cfg.round_timeout)
                    .arrays
                )
        after = evaluator.full(continued, None)
        return {
            "rounds": rounds,
            "acc_test": after["acc_test"],
            "backdoor_asr": after["backdoor_asr"],
            "mia_auc": after["mia_auc"],
            "mia": after["mia"],
        }

    def _relearn_probe(self, evaluator: Evaluator, arrays: ArrayRecord, original: ArrayRecord) -> dict[str, Any]:
        """Steps of SGD on the forget set until its ASR (backdoor) or accuracy is back at 90% of the original model's."""
        cfg = self.cfg
        if evaluator.triggered is not None:
            triggered = evaluator.triggered[:1000]
            metric = "backdoor_asr"

            def measure(model: torch.nn.Module) -> float:
                return attack_success_rate(model, triggered, cfg.backdoor_target)
        else:
            metric = "acc_deleted"

            def measure(model: torch.nn.Module) -> float:
                return accuracy(model, *evaluator.deleted)

        if evaluator.relearn_threshold is None:  # the original's level, once per request (evaluator), not once per model
            evaluator.relearn_threshold = 0.9 * measure(evaluator.model(original))
        threshold = evaluator.relearn_threshold
        result = relearn_steps(
            evaluator.model(arrays),
            *evaluator.deleted,
            measure=measure,
            threshold=threshold,
            lr=cfg.relearn_lr or cfg.lr / 10,
            batch_size=cfg.batch_size,
            max_steps=cfg.relearn_steps,
            momentum=cfg.momentum,
            seed=cfg.seed,
        )
        return {"metric": metric, **result.to_dict()}

    def _shadow_bank(self, data: FederatedData) -> ShadowBank | None:
        """The shadows the selected attacks need (shadow, lira, ulira), trained before the target's phases are scored."""
        cfg = self.cfg
        attacks = attacks_of(cfg)
        if not set(attacks) & {"shadow", "lira", "ulira"}:
            return None
        sets = membership_sets(data, self.requests)  # every request's candidates: a stream scores subsets of this pool
        if sets.too_small:
            self.results["membership"] = {"skipped": f"{sets.scored()['which']}: too few to train shadows on"}
            return None
        pool = torch.unique(torch.cat([sets.members, sets.non_members]))
        count = max(cfg.lira_shadows if set(attacks) & {"lira", "ulira"} else 0, cfg.shadow_models if "shadow" in attacks else 0)
        ulira = []
        if "ulira" in attacks:
            ulira = [get_method(name) for name in (cfg.ulira_methods or tuple(m.name for m in self.methods if m.name != REFERENCE))]
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # shadows seed torch themselves; the target's run keeps its own stream
            bank = train_shadow_bank(
                cfg,
                data,
                pool,
                self.request,
                num_shadows=count,
                with_shadow_attack="shadow" in attacks,
                ulira_methods=ulira,
                progress=self.progress,
            )
        self.results["membership"] = {
            "pool": int(len(pool)),
            **sets.scored(),
            "global_variance": bank.global_variance,
            "wall_s": time.perf_counter() - started,
            **bank.cost,
        }
        self._write()
        return bank

    def _unfinished(self, name: str, context: MethodContext, err: FedUnlearnError) -> MethodOutcome:
        """A method that ended without an unlearned model: the model it was given stays, and the results say why."""
        aborted = isinstance(err, UnlearningAbortedError)
        details: dict[str, Any] = {"status": "aborted" if aborted else "failed", "error": f"{type(err).__name__}: {err}"}
        report = getattr(err, "report", None)  # what the method's rounds recorded (retries, the clients' failures)
        if report:
            details["unlearning"] = report
        logger.warning("method %s %s: %s", name, details["status"], err)
        return MethodOutcome(context.arrays, details=details)

    def _reliability(self) -> dict[str, Any]:
        """What went wrong in the run and what was done about it: failed and rejected replies, per-method outcomes."""
        failed: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        for label, strategy in self._observed:
            failed.extend({"run": label, **entry} for entry in strategy.failures)
            rejected.extend({"run": label, **entry} for entry in strategy.rejected)
        methods: dict[str, Any] = {}
        for name, model in self.results["models"].items():
            if name == "original":
                continue
            report = model.get("unlearning") if isinstance(model.get("unlearning"), dict) else {}
            failed.extend({"run": name, **entry} for entry in report.get("failures", []))
            rejected.extend({"run": name, **entry} for entry in report.get("rejected", []))
            methods[name] = {
                "status": model.get("status", "complete"),
                "missing_clients": report.get("missing_clients", []),
                "retries": report.get("retries", 0),
                "clipped_clients": report.get("clipped_clients", []),
                "fallback": report.get("fallback", ""),
            }
        by_phase: dict[str, int] = {}
        by_cause: dict[str, int] = {}
        for entry in failed:
            by_phase[entry["phase"]] = by_phase.get(entry["phase"], 0) + 1
            reason = str(entry["reason"])
            # Injected faults name their kind in the reason ("fault-injection: dropout of client 3, ...").
            cause = (
                reason.split(f"{FAULT_PREFIX}: ", 1)[1].split(" ", 1)[0]
                if f"{FAULT_PREFIX}: " in reason
                else ("no reply" if reason.startswith("no reply") else "client error")
            )
            by_cause[cause] = by_cause.get(cause, 0) + 1
        expected = [m.name for m in self.methods]
        done = self.results["status"] == "complete"
        return {
            "failed_replies": len(failed),
            "failed_by_phase": by_phase,
            "failed_by_cause": by_cause,
            "rejected_replies": len(rejected),
            "rejected": rejected[:100],
            "methods": methods,
            "results_lost": sum(1 for n in expected if n not in self.results["models"]) if done else None,
        }

    def _round_hook(self, label: str) -> Callable[[int, ArrayRecord, MetricRecord | None], None]:
        """Per-round progress and curves; its evaluation time is taken out of the phase's wall seconds."""

        def hook(server_round: int, arrays: ArrayRecord, metrics: MetricRecord | None) -> None:
            start = time.perf_counter()
            point: dict[str, float] = {"round": server_round}
            if metrics is not None and keys.TRAIN_LOSS in metrics:
                point["train_loss"] = as_float(metrics[keys.TRAIN_LOSS])
            if server_round % self.cfg.eval_every == 0 or server_round == self.cfg.rounds:
                point.update(self.evaluator.quick(arrays))
            self.results["history"].setdefault(label, []).append(point)
            self.progress.advance(point)
            self.tracker.on_round(label, point)
            if (
                label == self._checkpoint_label
                and self.checkpoints is not None
                and self.cfg.checkpoint_every > 0
                and server_round % self.cfg.checkpoint_every == 0
                and server_round <= self._checkpoint_until
            ):
                self.checkpoints.save_arrays("training", arrays)
                self.checkpoints.save_state(
                    {
                        "round": server_round,
                        "config": self.cfg.to_dict(),
                        "history": self.results["history"],
                        "training_cost": self.meter.get("training").to_dict(),
                    }
                )
            self.meter.exclude_wall(time.perf_counter() - start)

        return hook
