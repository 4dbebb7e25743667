"""Where one unlearning call of `iau-cached` spends its time: the engine's round trips, the clients, the server's own code.

    python benchmarks/round_trip_profile.py --calls 5 --out /tmp/profile.json                 # the default scenario, Ray
    python benchmarks/round_trip_profile.py --calls 2 --engine local --set model=mlp --out X  # in-process (tests)

Run by `python -m benchmarks.round_trip` (its `iau-cached` part), once per source tree it compares: this file
imports the product only by absolute name, so with PYTHONPATH set to another checkout it profiles that
checkout's code (the tree before a change, side by side with the tree after it in one run).

One experiment of the default scenario (`--methods iau-cached`; retraining, which the runner always adds, is
replaced by a no-op here: iau-cached neither reads its model nor its state) trains, fills and uploads the
caches, and then the method's server step runs `--calls` times unprofiled and `--calls` times under cProfile,
each on its own branch of the strategy (`IAUFed.branch`, the runner's way of giving each method its own state),
so every call does exactly the work of the one the runner times. Per call:
  wall:            the call's seconds (what the runner's CostMeter would see, before any exclusion);
  metered wall:    the seconds the CostMeter records for the call (what results.json reports as wall_s);
  engine:          seconds inside the Flower grid's `send_and_receive` (Ray, the polls, the ClientApp's
                   handler: the client compute is inside it and reported on its own as well);
  client compute:  what the clients report they computed (`compute-s` of their replies);
  stale drift:     seconds of the simulator's stale-drift measurement (strategies/methods/iau.py), if any;
  server own:      wall - engine - stale drift: fedunlearn's server-side code around the rounds.
The profiled calls attribute the server's own time to fedunlearn functions: each library call is charged to
the fedunlearn function that made it, the engine's `send_and_receive` to "engine".
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ENGINES = ("ray", "local")
OUR_PACKAGES = ("fedunlearn", "strategies", "simulations")


def _tree_commit(tree: Path) -> str | None:
    """The git commit a tree was checked out at (None outside git, e.g. an exported tree)."""
    try:
        out = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def attribute(stats: pstats.Stats, ours: tuple[str, ...], harness: str) -> tuple[dict[str, float], float]:
    """Seconds by fedunlearn function (its own lines plus the library calls it makes) and the engine's seconds.

    A fedunlearn function called from fedunlearn code (or from this harness: the method's server step) is charged
    its cumulative time along those edges, minus what its fedunlearn callees and the engine took along its own
    edges; so a library function's time goes to the fedunlearn function that called it, and fedunlearn code
    called back from a library (a model's forward under torch) stays with that caller. The engine is every call
    into this harness's timed `send_and_receive`, and what only it calls.
    """
    table: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]  # pstats' raw table

    def is_ours(key: tuple[str, int, str]) -> bool:
        return key[0].startswith(ours)

    def is_engine(key: tuple[str, int, str]) -> bool:
        return key[0] == harness and key[2] == "send_and_receive"

    def name(key: tuple[str, int, str]) -> str:
        return f"{os.path.relpath(key[0], os.path.commonpath(ours))}:{key[2]}"

    # In-process (LocalGrid) the clients' code runs under the engine: a function only ever called from there is theirs.
    under_engine = {key for key in table if is_engine(key)}
    grew = True
    while grew:
        grew = False
        for key, (_, _, _, _, callers) in table.items():
            if key not in under_engine and callers and all(caller in under_engine for caller in callers):
                under_engine.add(key)
                grew = True
    charged: dict[tuple[str, int, str], float] = {}
    engine = 0.0
    for key, (_, _, _, cumulative, callers) in table.items():
        if not callers and is_ours(key):  # the method's server step: entered before the profiler was enabled
            charged[key] = cumulative
            continue
        into = sum(
            edge[3]
            for caller, edge in callers.items()
            if caller not in under_engine and (is_ours(caller) or (caller[0] == harness and not is_engine(caller)))
        )
        if is_engine(key):
            engine += into
        elif is_ours(key) and into > 0 and key not in under_engine:
            charged[key] = into
    for key, (_, _, _, _, callers) in table.items():
        if is_ours(key) or is_engine(key):
            for caller, edge in callers.items():
                if caller in charged:
                    charged[caller] -= edge[3]
    by_name: dict[str, float] = {}
    for key, seconds in charged.items():
        by_name[name(key)] = by_name.get(name(key), 0.0) + seconds
    return by_name, engine


def profile(cfg_overrides: dict[str, Any], calls: int, engine: str, method: str = "iau-cached") -> dict[str, Any]:
    """Train, fill the caches, then time and profile `calls` runs of `method`'s server step (see the module docstring)."""
    from flwr.app import Message
    from flwr.serverapp import Grid

    import simulations.runner as runner
    import strategies
    from fedunlearn.config import build_config
    from simulations.methods import REGISTRY, MethodOutcome
    from strategies.fedavg import model_version
    from strategies.grid_wrapper import GridWrapper

    iau_module: Any
    try:
        from strategies.methods import iau as iau_module
    except ImportError:  # an older tree without the method package
        iau_module = None

    class EngineGrid(GridWrapper):
        """Times the wrapped (Flower) grid's send_and_receive: the engine's round trips with the clients inside."""

        def __init__(self, grid: Grid) -> None:
            super().__init__(grid)
            self.seconds = 0.0

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
            """Pass through, timed."""
            start = time.perf_counter()
            try:
                return list(self._inner().send_and_receive(messages, timeout=timeout))
            finally:
                self.seconds += time.perf_counter() - start

    drift = {"seconds": 0.0}
    measure = getattr(iau_module, "stale_drift", None)

    def timed_drift(*args: Any, **kwargs: Any) -> Any:
        assert measure is not None
        start = time.perf_counter()
        try:
            return measure(*args, **kwargs)
        finally:
            drift["seconds"] += time.perf_counter() - start

    plain: list[dict[str, Any]] = []
    versions: set[str] = set()
    profiler = cProfile.Profile()
    original = REGISTRY[method]
    retrain = REGISTRY["retrain"]

    def profiled_run(ctx: Any) -> Any:
        metered = ctx.grid
        outcome = None
        for index in range(2 * calls):
            timed = EngineGrid(metered.grid)
            metered.grid, inner = timed, metered.grid
            drift["seconds"] = 0.0
            branch = dataclasses.replace(ctx, strategy=ctx.strategy.branch())
            profiled = index >= calls
            if iau_module is not None and measure is not None:  # unprofiled calls time the drift; profiled ones see it as it is
                iau_module.stale_drift = measure if profiled else timed_drift
            with metered.meter.phase(f"profile:{index}") as cost:
                start = time.perf_counter()
                if profiled:
                    profiler.enable()
                try:
                    outcome = original.run(branch)
                finally:
                    if profiled:
                        profiler.disable()
                    wall = time.perf_counter() - start
                    metered.grid = inner
            versions.add(model_version(outcome.arrays))
            if not profiled:
                plain.append(
                    {
                        "wall_s": wall,
                        "metered_wall_s": cost.wall_s,
                        "engine_s": timed.seconds,
                        "client_compute_s": cost.client_compute_s,
                        "rounds": cost.rounds,
                        "stale_drift_s": drift["seconds"],
                        "server_own_s": wall - timed.seconds - drift["seconds"],
                    }
                )
        return outcome

    REGISTRY[method] = dataclasses.replace(original, run=profiled_run)
    REGISTRY["retrain"] = dataclasses.replace(retrain, run=lambda ctx: MethodOutcome(ctx.arrays))
    try:
        cfg = build_config("default", overrides={**cfg_overrides, "methods": method})
        with tempfile.TemporaryDirectory(prefix="fedunlearn-profile-") as tmp:
            experiment = runner.Experiment(cfg, out_dir=None, show_progress=False)
            if engine == "ray":
                experiment.run()
            else:
                from strategies import app_config
                from strategies.client_app import build_client_app
                from strategies.local_grid import LocalGrid

                experiment.drive(LocalGrid(build_client_app(app_config.client_spec_for(cfg, tmp)), cfg.num_clients))
    finally:
        REGISTRY[method], REGISTRY["retrain"] = original, retrain
        if iau_module is not None and measure is not None:
            iau_module.stale_drift = measure
    tree = Path(strategies.__file__).resolve().parents[1]
    ours = tuple(str(tree / package) + os.sep for package in OUR_PACKAGES)
    stats = pstats.Stats(profiler)
    charged, engine_s = attribute(stats, ours, EngineGrid.send_and_receive.__code__.co_filename)
    roots = [row[3] for key, row in stats.stats.items() if not row[4] and key[0].startswith(ours)]  # type: ignore[attr-defined]
    functions = sorted(((name, s) for name, s in charged.items() if abs(s) > 0), key=lambda item: -item[1])
    return {
        "tree": str(tree),
        "commit": _tree_commit(tree),
        "engine": engine,
        "method": method,
        "overrides": cfg_overrides,
        "calls": calls,
        "same_model_every_call": len(versions) == 1,
        "plain": plain,
        "median_ms": {key: 1000 * statistics.median(row[key] for row in plain) for key in plain[0] if key != "rounds"} if plain else {},
        "rounds_per_call": plain[0]["rounds"] if plain else None,
        "profiled": {
            "calls": calls,
            "ms_per_call": 1000 * sum(roots) / calls,  # the method's server step under the profiler (slower than unprofiled)
            "attributed_ms_per_call": 1000 * (sum(charged.values()) + engine_s) / calls,
            "engine_ms_per_call": 1000 * engine_s / calls,
            "functions_ms_per_call": [{"function": name, "ms": 1000 * s / calls} for name, s in functions],
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Profile one tree's `iau-cached` and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5, help="unprofiled and profiled calls each (default 5)")
    parser.add_argument("--engine", choices=ENGINES, default="ray", help="ray: Flower's simulation engine; local: in-process LocalGrid")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="scenario setting (a CLI flag without '--')")
    parser.add_argument("--out", required=True, help="JSON file")
    args = parser.parse_args(argv)
    if args.calls < 1:
        raise SystemExit(f"--calls {args.calls}: must be >= 1")
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. --set rounds=5")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    result = profile(overrides, args.calls, args.engine)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
