"""The paths being compared, each run in its own process: `python -m benchmarks.variants NAME --spec JSON --out FILE`.

- `flower-quickstart` (a): the plain Flower app of `benchmarks.flower_quickstart` with Flower's FedAvg,
  on `flwr.simulation.run_simulation` (Ray, one CPU per client actor);
- `single-process-loop` (b): plain PyTorch in one process, the clients trained one after another;
- `fedunlearn` (c): fedunlearn's own path, as `simulations/runner.py` assembles it: `build_client_app`
  (resident data and model per worker, tensor slicing) and `IAUFed` (an `UnlearningFedAvg`) on
  `run_simulation` through a `MeteredGrid`; with `caches`, also the cache-filling round, the `iau-cached`
  and `iau` corrections, and the bytes the gradient caches occupy;
- `fedunlearn-cohort` (d): the same with `execution = "cohort"` (each SuperNode hosts a cohort of virtual
  clients trained as one vectorised computation), assembled from the ExperimentConfig as the runner does;
- `fedunlearn-gathered`, `fedunlearn-cohort-gathered`: (c) and (d) with the training round gathered before it is
  aggregated (`UnlearningFedAvg(streaming=False)`, Flower's own `send_and_receive`), the path before issue 15,
  for side-by-side comparisons with the streamed default; not in the default `--variants`;
- `experiment`: one `simulations.runner.Experiment` (the unlearning benchmark reads its results.json).

`engine = "local"` in the spec serves the ClientApps in-process through `strategies.local_grid.LocalGrid`
instead of Flower's simulation engine on Ray (no Ray start, no worker processes): the same ServerApp and
ClientApp code, for miniatures and profiling. Each writes one JSON object (timings in seconds, memory in
bytes) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import QUIET_ENV, PeakMonitor, median, write_json

VARIANTS = ("flower-quickstart", "single-process-loop", "fedunlearn", "fedunlearn-cohort")
LABELS = {
    "flower-quickstart": "(a) plain Flower app (quickstart style)",
    "single-process-loop": "(b) single-process loop",
    "fedunlearn": "(c) fedunlearn, per-node",
    "fedunlearn-cohort": "(d) fedunlearn, cohort",
}
# The gathered training round (before issue 15), only when asked for by name: streamed vs gathered side by side.
# And cohort mode with one model per client in each worker's reply (streamed, no partial sums): the path between.
GATHERED_VARIANTS = ("fedunlearn-gathered", "fedunlearn-cohort-gathered", "fedunlearn-cohort-unsummed")
LABELS.update(
    {
        "fedunlearn-gathered": "(c') fedunlearn, per-node, gathered round",
        "fedunlearn-cohort-gathered": "(d') fedunlearn, cohort, gathered round",
        "fedunlearn-cohort-unsummed": "(d'') fedunlearn, cohort, streamed, no partial sums",
    }
)
ENGINES = ("ray", "local")


@dataclass(frozen=True)
class Scale:
    """One benchmark configuration: the federation's size and the local training of each client."""

    clients: int
    examples: int
    rounds: int
    data_dir: str
    batch_size: int = 32
    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9  # the quickstart's SGD(momentum=0.9); every path uses the same optimiser
    seed: int = 0
    timeout: float = 3600.0
    caches: bool = False  # fedunlearn: fill caches and run the IAU corrections after training
    cache_dtype: str = "float32"
    loop_threads: int = 0  # single-process loop: torch threads (0: per round, the faster of 1 and torch's default)
    engine: str = "ray"  # ray: Flower's simulation engine; local: LocalGrid in-process (miniatures, profiling)
    cohort_size: int = 0  # fedunlearn-cohort: virtual clients per SuperNode (0: the runner's automatic size)
    cohort_train: str = "auto"  # fedunlearn-cohort: vmap, loop or auto (vmap on a GPU, loop on a CPU)
    device: str = "auto"  # loop and fedunlearn: auto (cuda when visible, as the quickstart app picks), cpu, cuda

    def __post_init__(self) -> None:
        if self.clients < 2 or self.examples < 1 or self.rounds < 1:
            raise ValueError(
                f"clients={self.clients}, examples={self.examples}, rounds={self.rounds}: need clients >= 2, examples >= 1 and rounds >= 1"
            )
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}: must be one of {', '.join(ENGINES)}")
        if not 0 <= self.cohort_size <= self.clients:
            raise ValueError(f"cohort_size={self.cohort_size}: must be in [0, clients={self.clients}] (0: automatic)")


def resolve_device(device: str) -> str:
    """`auto` becomes cuda when a GPU is visible (the quickstart app's own choice), else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ----- timing -----------------------------------------------------------------------------------------


class RoundClock:
    """When each training round started and ended (driver clock), and how many clients answered."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.ended: dict[int, float] = {}
        self.replies: dict[int, int] = {}
        self.torch_threads: set[int] = set()

    def round_seconds(self, ready_at: float) -> list[float]:
        """Round 1 from when both the strategy and Ray were ready; every later round from the previous round's end.

        Measuring from end to end puts everything the round loop does (sampling, sending, waiting,
        aggregating, the empty evaluation step) into some round.
        """
        out, previous = [], None
        for rnd in sorted(self.ended):
            begin = max(self.started[rnd], ready_at) if previous is None else previous
            out.append(self.ended[rnd] - begin)
            previous = self.ended[rnd]
        return out


class ClockedStrategy:
    """Mixin for a Flower strategy: stamps configure_train and aggregate_train into `self.clock`."""

    clock: RoundClock

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        """Stamp the round's start, then configure as the strategy does."""
        self.clock.started.setdefault(server_round, time.perf_counter())
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> Any:
        """Count the replies as they pass to the strategy's own aggregation (a streamed round is never listed), stamp the round's end."""
        self.clock.replies[server_round] = 0

        def counted() -> Iterator[Any]:
            for reply in replies:
                if not reply.has_error():
                    self.clock.replies[server_round] += 1
                    metrics = reply.content.metric_records.get("metrics")
                    if metrics is not None and "torch-threads" in metrics:
                        self.clock.torch_threads.add(int(metrics["torch-threads"]))
                    summed = reply.content.config_records.get("cohort-sum-info")  # a cohort's partial sum: its clients' metrics
                    if summed is not None:
                        for client in json.loads(str(summed["client-metrics"])):
                            if "torch-threads" in client:
                                self.clock.torch_threads.add(int(client["torch-threads"]))
                yield reply

        out = super().aggregate_train(server_round, counted())  # type: ignore[misc]
        self.clock.ended[server_round] = time.perf_counter()
        return out


class RayWatcher:
    """Notes when `ray.is_initialized()` first turns true: the end of Ray's start-up inside run_simulation."""

    def __init__(self, interval: float = 0.005) -> None:
        self.ready_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="ray-watcher", daemon=True)

    def __enter__(self) -> RayWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self, interval: float) -> None:
        import ray

        while not self._stop.wait(interval):
            if ray.is_initialized():
                self.ready_at = time.perf_counter()
                return


def quiet_logs() -> None:
    """Errors still show; Flower's per-round INFO lines do not (they would dominate the output)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)


def simulate(
    body: Callable[[Any], None], client_app: Any, num_nodes: int, timeout: float, engine: str = "ray", pickup_interval: float | None = None
) -> dict[str, float | None]:
    """Run `body(grid)` as a ServerApp's main against `num_nodes` nodes serving `client_app`; returns when it was called, Ray ready, returned.

    engine "ray": Flower's simulation engine (Ray, num_cpus=1 per client actor); "local": a LocalGrid
    in this process (no Ray: `ray_ready` is None). An exception raised by `body` is re-raised here.
    `pickup_interval`: how often the engine looks for new messages, as simulations/runner.py sets it
    (None: Flower's own 0.1 s, what a plain Flower app gets).
    """
    called = time.perf_counter()
    if engine == "local":
        from strategies.local_grid import LocalGrid

        body(LocalGrid(client_app, num_nodes))
        return {"called": called, "ray_ready": None, "returned": time.perf_counter()}
    from flwr.simulation import run_simulation

    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"address": "local", "include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False},
    }
    errors: list[BaseException] = []
    from strategies.engine_tuning import faster_message_pickup

    with RayWatcher() as watcher, faster_message_pickup(pickup_interval if pickup_interval is not None else 0.1):
        run_simulation(
            server_app=_server_main(body, errors), client_app=client_app, num_supernodes=num_nodes, backend_config=backend_config
        )
    if errors:
        raise errors[0]
    return {"called": called, "ray_ready": watcher.ready_at, "returned": time.perf_counter()}


def startup_times(times: dict[str, float | None], first_round_end: float, engine: str) -> dict[str, float | None]:
    """Ray's start (None in-process) and the seconds from the call to the end of round 1."""
    called = times["called"]
    assert called is not None
    ready = times["ray_ready"] or called
    return {"ray_start_s": ready - called if engine == "ray" else None, "to_first_round_end_s": first_round_end - called}


def round_summary(rounds: list[float]) -> dict[str, Any]:
    """First round, steady-state median (rounds 2..R) and the list."""
    return {
        "first_round_s": rounds[0] if rounds else None,
        "steady_round_s": median(rounds[1:]) if len(rounds) > 1 else None,
        "round_s": rounds,
        "rounds_measured": len(rounds),
    }


def _server_main(body: Callable[[Any], None], errors: list[BaseException]) -> Any:
    """A ServerApp whose main runs `body(grid)`; an exception is kept so the caller can re-raise it."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            body(grid)
        except BaseException as err:  # re-raised after the engine shuts down
            errors.append(err)
            raise

    return app


# ----- (a) the plain Flower app -----------------------------------------------------------------------


def run_flower_quickstart(scale: Scale) -> dict[str, Any]:
    """Baseline (a): the quickstart-style ClientApp with Flower's FedAvg on run_simulation."""
    from flwr.serverapp.strategy import FedAvg

    from . import flower_quickstart as qs

    class ClockedFedAvg(ClockedStrategy, FedAvg):
        """Flower's FedAvg with round timestamps."""

    clock, marks = RoundClock(), {}
    poll: dict[str, float | None] = {}

    def body(grid: Any) -> None:
        marks["main"] = time.perf_counter()
        poll["grid_poll_interval_s"] = getattr(grid, "pull_interval", None)  # Flower's default: what a plain app gets
        strategy = ClockedFedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=scale.clients, min_available_nodes=scale.clients
        )
        strategy.clock = clock
        config = qs.train_config(scale.batch_size, scale.epochs, scale.lr, scale.momentum, scale.data_dir)
        qs.run_rounds(strategy, grid, qs.initial_arrays(scale.seed), config, scale.rounds, scale.timeout)

    with PeakMonitor() as monitor:
        times = simulate(body, qs.app, scale.clients, scale.timeout, scale.engine)
    called, returned = times["called"], times["returned"]
    assert called is not None and returned is not None  # simulate() always sets both; only ray_ready may be None
    rounds = clock.round_seconds(times["ray_ready"] or called)
    return {
        "ok": True,
        "engine": scale.engine,
        **startup_times(times, clock.ended[1], scale.engine),
        **round_summary(rounds),
        "replies_per_round": [clock.replies[r] for r in sorted(clock.replies)],
        "worker_torch_threads": sorted(clock.torch_threads),
        "wall_s": returned - called,
        **poll,
        "memory": monitor.report(),
    }


# ----- (b) the single-process loop ----------------------------------------------------------------------


def client_train_indices(num_train: int, clients: int) -> list[Any]:
    """Each client's training indices: contiguous shards, 80/20 split with seed 42 (as the quickstart app)."""
    import math

    import torch

    from .data import HELDOUT_FRACTION

    size = num_train // clients
    out = []
    for client in range(clients):
        order = torch.arange(client * size, (client + 1) * size)[torch.randperm(size, generator=torch.Generator().manual_seed(42))]
        out.append(order[math.ceil(HELDOUT_FRACTION * size) :])
    return out


def faster_thread_count(model: Any, x: Any, y: Any, scale: Scale, default_threads: int, steps: int = 6) -> int:
    """1 or torch's default thread count, whichever trains faster right now (untimed, weights restored).

    On a shared 2-core machine a second thread helps when the other core is free and costs several
    times over when it is not (the threads wait on each other), so a fair loop picks per round.
    """
    import copy

    import torch
    import torch.nn.functional as F

    if default_threads <= 1:
        return 1
    probe = copy.deepcopy(model)
    optimizer = torch.optim.SGD(probe.parameters(), lr=scale.lr, momentum=scale.momentum)
    xb, yb = x[: scale.batch_size], y[: scale.batch_size]
    seconds = {}
    for threads in (1, default_threads):
        torch.set_num_threads(threads)
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(probe(xb), yb).backward()
            optimizer.step()
            times.append(time.perf_counter() - begin)
        seconds[threads] = median(times[1:])
    return min(seconds, key=lambda t: seconds[t] or float("inf"))


def run_single_process_loop(scale: Scale) -> dict[str, Any]:
    """Baseline (b): plain PyTorch, one process, FedAvg with the clients trained one after another."""
    import torch
    import torch.nn.functional as F
    from torchvision.datasets.mnist import read_image_file, read_label_file

    from . import flower_quickstart as qs

    default_threads = torch.get_num_threads()
    device = torch.device(resolve_device(scale.device))
    if scale.loop_threads:
        torch.set_num_threads(scale.loop_threads)
    with PeakMonitor() as monitor:
        started = time.perf_counter()
        raw = Path(scale.data_dir) / "MNIST" / "raw"
        x = read_image_file(str(raw / "train-images-idx3-ubyte")).to(torch.float32).div_(255.0).unsqueeze(1).to(device)
        y = read_label_file(str(raw / "train-labels-idx1-ubyte")).to(torch.int64).to(device)
        shards = [s.to(device) for s in client_train_indices(len(y), scale.clients)]
        torch.manual_seed(scale.seed)
        model = qs.Net().to(device)
        global_state = {k: v.detach().clone().to(device) for k, v in qs.initial_arrays(scale.seed).to_torch_state_dict().items()}
        data_s = time.perf_counter() - started
        rounds, threads_used, examples_per_round = [], [], 0
        for server_round in range(1, scale.rounds + 1):
            if not scale.loop_threads and device.type == "cpu":
                torch.set_num_threads(faster_thread_count(model, x[shards[0]], y[shards[0]], scale, default_threads))
            threads_used.append(torch.get_num_threads())
            begin = time.perf_counter()
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
            examples_per_round = 0
            for client, shard in enumerate(shards):
                model.load_state_dict(global_state)
                model.train()
                optimizer = torch.optim.SGD(model.parameters(), lr=scale.lr, momentum=scale.momentum)
                xk, yk = x[shard], y[shard]
                generator = torch.Generator().manual_seed(scale.seed * 1_000_003 + server_round * 10_007 + client)
                for _ in range(scale.epochs):
                    order = torch.randperm(len(yk), generator=generator).to(device)
                    for start in range(0, len(yk), scale.batch_size):
                        batch = order[start : start + scale.batch_size]
                        optimizer.zero_grad()
                        loss = F.cross_entropy(model(xk[batch]), yk[batch])
                        loss.backward()
                        optimizer.step()
                        loss.item()  # what a training loop logs; also keeps the step synchronous like the other paths
                for name, value in model.state_dict().items():
                    total[name] += value.to(torch.float64) * len(yk)
                examples_per_round += len(yk)
            global_state = {k: (v / examples_per_round).to(global_state[k].dtype) for k, v in total.items()}
            rounds.append(time.perf_counter() - begin)
    torch.set_num_threads(default_threads)  # in-process runs (--in-process) share this process with what comes next
    return {
        "ok": True,
        "engine": None,
        "device": device.type,
        "ray_start_s": None,
        "data_load_s": data_s,
        "to_first_round_end_s": data_s + rounds[0],
        **round_summary(rounds),
        "examples_per_round": examples_per_round,
        "torch_threads_per_round": threads_used,
        "default_torch_threads": default_threads,
        "wall_s": time.perf_counter() - started,
        "memory": monitor.report(),
    }


# ----- (c) fedunlearn's own path ------------------------------------------------------------------------


def fedunlearn_config(scale: Scale, execution: str = "per-node") -> Any:
    """The ExperimentConfig fedunlearn's path is built from: MNIST-shaped data, the McMahan CNN, no backdoor."""
    from fedunlearn.config import ExperimentConfig

    settings: dict[str, Any] = dict(
        dataset="mnist",
        data_dir=scale.data_dir,
        num_clients=scale.clients,
        model="mcmahan-cnn",
        backdoor=False,
        rounds=scale.rounds,
        local_epochs=scale.epochs,
        batch_size=scale.batch_size,
        lr=scale.lr,
        momentum=scale.momentum,
        heldout_fraction=0.2,
        seed=scale.seed,
        cache_dtype=scale.cache_dtype,
        round_timeout=scale.timeout,
        shadow_mia=False,
        device=resolve_device(scale.device),
        execution=execution,
    )
    if execution == "cohort":  # the cohort settings are refused with per-node execution (they would have no effect)
        settings.update(cohort_size=scale.cohort_size, cohort_train=scale.cohort_train)
    return ExperimentConfig(**settings)


def execution_setup(cfg: Any, client_app: Any, spec: Any) -> tuple[Any, int, Callable[[Any], Any], dict[str, Any]]:
    """The ClientApp the nodes run, how many nodes, and the grid the strategies see: the runner's own helpers.

    `strategies.app_config.supernode_app` and `server_grid` are what `Experiment.run` and the start of
    `Experiment.drive` call (poll interval; cohort: a CohortGrid under the MeteredGrid).
    """
    from strategies import app_config

    node_app, nodes = app_config.supernode_app(cfg, spec, client_app)
    info: dict[str, Any] = {"execution": cfg.execution, "grid_poll_interval_s": cfg.grid_poll_interval}
    if cfg.execution == "cohort":
        info.update(cohort_size=app_config.cohort_size_of(cfg), supernodes=nodes, cohort_train=app_config.cohort_train_of(cfg))
    return node_app, nodes, lambda grid: app_config.server_grid(cfg, grid)[0], info


def run_fedunlearn_cohort(scale: Scale) -> dict[str, Any]:
    """Path (d): fedunlearn with execution = cohort."""
    return run_fedunlearn(scale, execution="cohort")


def run_fedunlearn_gathered(scale: Scale) -> dict[str, Any]:
    """Path (c'): (c) with the training round gathered before aggregation."""
    return run_fedunlearn(scale, streaming=False)


def run_fedunlearn_cohort_gathered(scale: Scale) -> dict[str, Any]:
    """Path (d'): (d) with the training round gathered before aggregation."""
    return run_fedunlearn(scale, execution="cohort", streaming=False)


def run_fedunlearn_cohort_unsummed(scale: Scale) -> dict[str, Any]:
    """Path (d''): (d) with each worker replying one model per client (no partial sums)."""
    return run_fedunlearn(scale, execution="cohort", partial_sums=False)


def run_fedunlearn(scale: Scale, execution: str = "per-node", streaming: bool = True, partial_sums: bool = True) -> dict[str, Any]:
    """Path (c): build_client_app + IAUFed through a MeteredGrid on run_simulation, as simulations/runner.py does."""
    from collections import OrderedDict

    import torch
    from flwr.app import ArrayRecord

    from fedunlearn.cache import CacheStore
    from fedunlearn.costs import CostMeter
    from fedunlearn.deletion import DeletionRequest
    from fedunlearn.gradients import ParamLayout
    from fedunlearn.models import build_model
    from strategies import app_config
    from strategies.client_app import build_client_app
    from strategies.fedavg import discover_clients
    from strategies.iau_fed import IAUFed
    from strategies.metered_grid import MeteredGrid
    from strategies.methods.iau import METHOD_OF

    class ClockedIAUFed(ClockedStrategy, IAUFed):
        """fedunlearn's training strategy with round timestamps."""

    cfg = fedunlearn_config(scale, execution)
    cache_dir = tempfile.mkdtemp(prefix="fedunlearn-bench-caches-")
    spec = app_config.client_spec_for(cfg, cache_dir)
    client_app, num_nodes, prepare_grid, execution_info = execution_setup(cfg, build_client_app(spec), spec)
    clock, marks = RoundClock(), {}
    phases: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    monitor = PeakMonitor()

    def phase_done(name: str, started: float, cost: Any = None) -> None:
        monitor.sample()
        report = monitor.report()
        phases[name] = {
            "wall_s": time.perf_counter() - started,
            "driver_peak_rss_bytes_so_far": report["driver_peak_rss_bytes"],
            "total_rss_peak_bytes_so_far": report["total_rss_peak_bytes"],
        }
        if cost is not None:
            phases[name].update({"rounds": cost.rounds, "bytes": cost.bytes_down + cost.bytes_up})

    def body(grid: Any) -> None:
        meter = CostMeter()
        marks["main"] = started = time.perf_counter()
        metered = MeteredGrid(prepare_grid(grid), meter)
        with meter.phase("setup"):
            directory = discover_clients(metered, cfg.num_clients, timeout=cfg.round_timeout)
        phase_done("discovery", started, meter.get("setup"))
        marks["discovered"] = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = build_model("mcmahan-cnn", (1, 28, 28), 10)
        initial = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items()))
        layout = ParamLayout.of(model)
        strategy = ClockedIAUFed(
            layout=layout,
            iau=app_config.iau_settings_for(cfg),
            round_timeout=cfg.round_timeout,
            directory=directory,
            train=app_config.train_settings_for(cfg),
            seed=cfg.seed,
            fraction_train=cfg.fraction_fit,
            streaming=streaming,
            partial_sums=partial_sums,
        )
        strategy.clock = clock
        started = time.perf_counter()
        with meter.phase("training"):
            trained = strategy.start(grid=metered, initial_arrays=initial, num_rounds=cfg.rounds, timeout=cfg.round_timeout).arrays
        phase_done("training", started, meter.get("training"))
        extra["bytes_per_round"] = (meter.get("training").bytes_down + meter.get("training").bytes_up) / cfg.rounds
        # What the rounds computed: both execution modes must train the same model (up to float rounding).
        extra["final_parameter_norm"] = float(sum(v.double().pow(2).sum() for v in trained.to_torch_state_dict().values()) ** 0.5)
        if not scale.caches:
            return
        store = CacheStore(cache_dir, cfg.cache_dtype)
        started = time.perf_counter()
        with meter.phase("caching"):
            strategy.fill_caches(metered, trained, upload=True)
        phase_done("caching (fill + upload)", started, meter.get("caching"))
        extra["client_cache_bytes"] = store.total_bytes()
        extra["client_cache_files"] = len(list(Path(cache_dir).glob("client-*.safetensors")))
        assert strategy.gradient_total is not None  # fill_caches just set it
        extra["server_aggregate_cache_bytes"] = int(strategy.gradient_total.numel() * strategy.gradient_total.element_size())
        request = DeletionRequest(client=0)
        forget_count = directory.num_train[0]
        for protocol in ("cached", "fresh"):
            method = METHOD_OF[protocol]
            started = time.perf_counter()
            with meter.phase(method):
                strategy.branch().unlearn(metered, trained, request, forget_count, protocol=protocol, method=method)
            phase_done(f"unlearn:{method}", started, meter.get(method))
        extra["client_cache_bytes_after"] = store.total_bytes()

    try:
        with monitor:
            times = simulate(body, client_app, num_nodes, scale.timeout, scale.engine, pickup_interval=cfg.grid_poll_interval)
    finally:
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)
    called, returned = times["called"], times["returned"]
    assert called is not None and returned is not None  # simulate() always sets both; only ray_ready may be None
    rounds = clock.round_seconds(times["ray_ready"] or called)
    return {
        "ok": True,
        "engine": scale.engine,
        "device": cfg.device,
        **execution_info,
        "training_round": ("streamed" if streaming else "gathered")
        + (", partial sums" if streaming and partial_sums and execution == "cohort" else ""),
        **startup_times(times, clock.ended[1], scale.engine),
        "discovery_s": marks["discovered"] - marks["main"],
        **round_summary(rounds),
        "replies_per_round": [clock.replies[r] for r in sorted(clock.replies)],
        "wall_s": returned - called,
        "phases": phases,
        **extra,
        "memory": monitor.report(),
    }


# ----- calibration: how fast one training step is on this machine right now -----------------------------


def run_calibration(scale: Scale, steps: int = 20) -> dict[str, Any]:
    """Seconds per SGD step of the model (batch `scale.batch_size`) with 1 torch thread and with torch's default.

    A shared machine runs at a different speed from hour to hour; this says how fast it was during the
    run, and `steps x step_s_1_thread / cores` is the round time of a perfectly parallel 2-core run.
    """
    import torch
    import torch.nn.functional as F

    from . import flower_quickstart as qs

    default_threads = torch.get_num_threads()
    torch.manual_seed(scale.seed)
    model = qs.Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=scale.lr, momentum=scale.momentum)
    x = torch.rand(scale.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (scale.batch_size,))
    out: dict[str, Any] = {"ok": True, "default_threads": default_threads, "steps": steps}
    for label, threads in (("step_s_1_thread", 1), ("step_s_default_threads", default_threads)):
        torch.set_num_threads(threads)
        times = []
        for i in range(steps + 3):
            begin = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if i >= 3:  # warm-up steps are not timed
                times.append(time.perf_counter() - begin)
        out[label] = median(times)
    torch.set_num_threads(default_threads)
    return out


# ----- the whole experiment (unlearning benchmark) ------------------------------------------------------


def drive_in_process(cfg: Any, out_dir: str | Path, experiment: Any = None) -> None:
    """One Experiment driven through a LocalGrid in this process: the runner's phases without Ray (engine "local")."""
    import shutil

    from simulations.runner import Experiment
    from strategies import app_config
    from strategies.client_app import build_client_app
    from strategies.faults import with_faults
    from strategies.local_grid import LocalGrid

    cache_dir = tempfile.mkdtemp(prefix="fedunlearn-bench-caches-")
    try:
        spec = app_config.client_spec_for(cfg, cache_dir)
        client_app, num_nodes, _, _ = execution_setup(cfg, with_faults(build_client_app(spec), app_config.fault_plan_for(cfg)), spec)
        experiment = experiment if experiment is not None else Experiment(cfg, out_dir=out_dir, show_progress=False)
        experiment.cache_dir = cache_dir
        experiment.drive(LocalGrid(client_app, num_nodes, capture_errors=True))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def folder_bytes(folder: str | Path | None) -> tuple[int, int]:
    """(bytes, files) of the plain files directly in `folder` ((0, 0) if it is gone or not given)."""
    if folder is None:
        return 0, 0
    total = files = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                    files += 1
    except FileNotFoundError:
        return 0, 0
    return total, files


def spanned_meter(monitor: PeakMonitor, experiment: Any) -> Any:
    """A CostMeter that, at the end of each phase, notes its span, the RSS peaks inside it and the cache folder's size."""
    from contextlib import contextmanager

    from fedunlearn.costs import CostMeter

    class SpannedMeter(CostMeter):
        """CostMeter plus, per phase, when it ran and what the processes held meanwhile (benchmarks only)."""

        def __init__(self) -> None:
            super().__init__()
            self.spans: dict[str, dict[str, Any]] = {}

        @contextmanager
        def phase(self, name: str) -> Any:
            start = time.perf_counter()
            try:
                with super().phase(name) as cost:
                    yield cost
            finally:
                monitor.sample()  # one sample at the very end: a short phase still gets one
                end = time.perf_counter()
                cache_bytes, cache_files = folder_bytes(experiment.cache_dir)
                span = self.spans.setdefault(name, {"runs": 0, "driver_rss_peak_bytes": None, "total_rss_peak_bytes": None})
                peaks = monitor.peaks_between(start, end)
                for key in ("driver_rss_peak_bytes", "total_rss_peak_bytes"):
                    values = [v for v in (span[key], peaks[key]) if v is not None]
                    span[key] = max(values) if values else None
                span.update(runs=span["runs"] + 1, cache_bytes_after=cache_bytes, cache_files_after=cache_files)

    return SpannedMeter()


def run_experiment(spec: dict[str, Any]) -> dict[str, Any]:
    """One simulations.runner.Experiment (on Ray, or in-process with spec engine "local"); the caller reads its results.json.

    With spec `phase_memory`, the result also holds per phase the peak RSS of the driver and of all processes
    and the bytes and files of the clients' cache folder when the phase ended (`phases`).
    """
    from fedunlearn.config import build_config
    from simulations.runner import Experiment

    engine = spec.get("engine", "ray")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: must be one of {', '.join(ENGINES)}")
    cfg = build_config(spec.get("preset", "default"), overrides=spec.get("overrides", {}))
    per_phase = bool(spec.get("phase_memory", False))
    started = time.perf_counter()
    meter = None
    with PeakMonitor(timeline=per_phase) as monitor:
        experiment = Experiment(cfg, out_dir=spec["out_dir"], show_progress=False)
        if per_phase:
            meter = experiment.meter = spanned_meter(monitor, experiment)
        if engine == "local":
            drive_in_process(cfg, spec["out_dir"], experiment)
        else:
            experiment.run()
    result: dict[str, Any] = {
        "ok": True,
        "engine": engine,
        "results_path": str(Path(spec["out_dir"]) / "results.json"),
        "wall_s": time.perf_counter() - started,
        "memory": monitor.report(),
    }
    if meter is not None:
        result["phases"] = meter.spans
    return result


RUNNERS: dict[str, Callable[[Scale], dict[str, Any]]] = {
    "flower-quickstart": run_flower_quickstart,
    "single-process-loop": run_single_process_loop,
    "fedunlearn": run_fedunlearn,
    "fedunlearn-cohort": run_fedunlearn_cohort,
    "fedunlearn-gathered": run_fedunlearn_gathered,
    "fedunlearn-cohort-gathered": run_fedunlearn_cohort_gathered,
    "fedunlearn-cohort-unsummed": run_fedunlearn_cohort_unsummed,
    "calibration": run_calibration,
}


def run_variant(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one variant in this process and return its result (what the child process writes to --out)."""
    if variant not in RUNNERS and variant != "experiment":
        raise ValueError(f"variant {variant!r}: choose from {', '.join([*RUNNERS, 'experiment'])}")
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if variant == "experiment":
        result = run_experiment(spec)
    else:
        scale = Scale(**spec)
        result = RUNNERS[variant](scale)
        result["scale"] = asdict(scale)
    result["variant"] = variant
    # Other people's jobs share the cores: the load average says how busy the machine was around this run.
    result["load_average_before"] = load_before
    result["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def main(argv: list[str] | None = None) -> int:
    """Child-process entry point: run one variant and write its JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=[*RUNNERS, "experiment"])
    parser.add_argument("--spec", required=True, help="JSON: the Scale fields (or, for experiment, preset/overrides/out_dir)")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    quiet_logs()
    write_json(args.out, run_variant(args.variant, json.loads(args.spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
