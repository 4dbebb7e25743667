"""Overhead of secure aggregation on IAU-Fed's rounds, in-process (LocalGrid): seconds, bytes and rounds, plain vs secure.

python -m benchmarks.secagg_overhead                      # 10 and 100 clients, the default model (digits: the CNN)
python -m benchmarks.secagg_overhead --clients 10 --repeats 1 --out /tmp/secagg.json

For each client count: one IAU correction step (the fresh protocol's round) and the caching round with upload (the
cached protocol's G_tot) at the initial model, once plain and once through SecAgg+, each through its own metered
grid. Seconds are wall seconds of this process with every client in it (client compute included): compare them
only within one run. Writes benchmarks/results/secagg-overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedunlearn.config import build_config
from fedunlearn.costs import CostMeter
from fedunlearn.data import DatasetStore
from fedunlearn.models import build_model
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.iau_fed import IAUFed
from strategies.library import unlearning_strategy
from strategies.local_grid import LocalGrid
from strategies.metered_grid import MeteredGrid

from .common import envelope, format_bytes, format_ratio, format_seconds, table, write_json

NORM_BOUND = 10.0  # above every contribution at the initial model (the run records how many clipped: 0)


def measure(action: Callable[[MeteredGrid], Any], grid: LocalGrid, repeats: int) -> dict[str, Any]:
    """Median wall seconds of `action` over `repeats`, and the rounds and bytes of the last one."""
    seconds, meter = [], CostMeter()
    for _ in range(repeats):
        meter = CostMeter()
        start = time.perf_counter()
        action(MeteredGrid(grid, meter))
        seconds.append(time.perf_counter() - start)
    cost = meter.get("setup")
    return {"wall_s": statistics.median(seconds), "rounds": cost.rounds, "bytes_down": cost.bytes_down, "bytes_up": cost.bytes_up}


def run(num_clients: int, repeats: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Plain and secure costs of the correction round and of the caching upload at `num_clients`."""
    cfg = build_config(
        "default",
        overrides={
            "num_clients": num_clients,
            "gradient_norm_bound": NORM_BOUND,
            "iau_steps": 1,
            "unlearn_retries": 0,
            "secure_aggregation": True,
            **overrides,
        },
    )
    spec = app_config.client_spec_for(cfg, tempfile.mkdtemp(prefix="secagg-bench-"))
    grid = LocalGrid(build_client_app(spec), num_clients)
    data = DatasetStore.get(app_config.data_spec_for(cfg))
    model = build_model(app_config.model_name_for(cfg), data.input_shape, data.num_classes)
    arrays = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items()))
    secure_policy = app_config.round_policy_for(cfg)
    strategy = unlearning_strategy(
        grid, model, num_clients, iau=app_config.iau_settings_for(cfg), policy=replace(secure_policy, secure=None)
    )
    strategy.fill_caches(grid, arrays)
    request = app_config.deletion_request_for(cfg)
    count = strategy.directory.num_train[request.client]

    def with_policy(secure: bool) -> IAUFed:
        branch = strategy.branch()
        branch.policy = secure_policy if secure else replace(secure_policy, secure=None)
        return branch

    out: dict[str, Any] = {"clients": num_clients, "parameters": strategy.layout.numel}
    for secure in (False, True):
        key = "secure" if secure else "plain"

        def correction(g: MeteredGrid, s: bool = secure) -> None:
            with_policy(s).unlearn(g, arrays, request, count)

        def caching(g: MeteredGrid, s: bool = secure) -> None:
            with_policy(s).fill_caches(g, arrays, upload=True)

        out[f"correction_{key}"] = measure(correction, grid, repeats)
        out[f"caching_{key}"] = measure(caching, grid, repeats)
    reference = with_policy(True)
    _, report = reference.unlearn(grid, arrays, request, count)
    out["stages"] = report.secure_aggregation[0]["stages"]
    out["error_bound"] = report.secure_aggregation[0]["error_bound"]
    out["clipped"] = report.secure_aggregation[0]["clipped"]
    out["neighbours"], out["threshold"] = report.secure_aggregation[0]["neighbours"], report.secure_aggregation[0]["threshold"]
    out["direction_norm"] = report.direction_norm
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the table; write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100", help="comma-separated client counts")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per measurement (median seconds)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another setting of the scenario")
    parser.add_argument("--out", default="benchmarks/results/secagg-overhead.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    overrides = dict(item.split("=", 1) for item in args.set)
    rows, runs = [], []
    for n in (int(c) for c in args.clients.split(",")):
        result = run(n, args.repeats if n <= 10 else 1, overrides)
        runs.append(result)
        for round_name in ("correction", "caching"):
            plain, secure = result[f"{round_name}_plain"], result[f"{round_name}_secure"]
            rows.append(
                [
                    n,
                    round_name,
                    f"{format_seconds(plain['wall_s'])} / {format_seconds(secure['wall_s'])}",
                    format_ratio(secure["wall_s"] / plain["wall_s"]),
                    f"{plain['rounds']} / {secure['rounds']}",
                    f"{format_bytes(plain['bytes_down'] + plain['bytes_up'])} / {format_bytes(secure['bytes_down'] + secure['bytes_up'])}",
                    format_ratio((secure["bytes_down"] + secure["bytes_up"]) / (plain["bytes_down"] + plain["bytes_up"])),
                ]
            )
    print(table(["clients", "round", "seconds plain / secure", "x", "rounds", "bytes plain / secure", "x"], rows))
    path = write_json(
        args.out, {**envelope("secagg_overhead", {"clients": args.clients, "repeats": args.repeats, "set": args.set}, argv), "runs": runs}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
