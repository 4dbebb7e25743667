"""Where one simulated round trip goes: a message from the ServerApp to one client and its reply, stage by stage.

    python -m benchmarks.round_trip                      # 40 round trips per setting, Ray engine
    python -m benchmarks.round_trip --trips 10 --out /tmp/round_trip.json

A ServerApp sends `--trips` query messages, one after another, to one SuperNode on Flower's simulation
engine over Ray, and the ClientApp's handler stamps when it started and ended (time.time(): one machine,
one clock). Each trip is split into
  out:     server `push_messages` -> the client's handler starts (the engine's pickup of new messages,
           the Ray actor call, unpickling the message and the ClientApp object);
  handler: the handler's own run (what the client computes);
  back:    the handler returns -> the server holds the reply (the reply's way back through the engine
           into the LinkState, and the server grid's poll for it).
The settings, side by side in one run: Flower's own polls (0.1 s engine pickup, grid pull 0.1 s) and
fedunlearn's (`--grid-poll-interval`, 5 ms both: strategies/engine_tuning.py, strategies/app_config.py),
each with a tiny message and with a model-sized one (the default CNN's parameters, as an iau-cached
correction round sends), and fedunlearn's own layers on top (MeteredGrid, the fault/validation
wrappers are not in this path: MeteredGrid is the one every unlearning round goes through).
Medians in milliseconds. Writes benchmarks/results/round-trip.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, envelope, table, write_json

SETTINGS: tuple[tuple[str, float | None, float | None, str, bool], ...] = (
    # name, engine pickup interval (s, None = Flower's 0.1), grid pull interval (s, None = Flower's), payload, metered
    ("flower-polls, tiny", None, None, "tiny", False),
    ("fedunlearn-polls, tiny", 0.005, 0.005, "tiny", False),
    ("fedunlearn-polls, model", 0.005, 0.005, "model", False),
    ("fedunlearn-polls, model, metered", 0.005, 0.005, "model", True),
    # fedunlearn's own ClientApp answering its `info` query (resident runtime lookup, its records): total only
    ("fedunlearn-polls, fedunlearn ClientApp", 0.005, 0.005, "app", True),
)


def _server_app(trips: int, payload: str, pull: float | None, metered: bool, out: str):  # noqa: ANN202 - a flwr app
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.serverapp import Grid, ServerApp

    from strategies.wire import as_float

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedunlearn.costs import CostMeter
        from fedunlearn.models import build_model
        from strategies.metered_grid import MeteredGrid

        if pull is not None and hasattr(grid, "pull_interval"):
            grid.pull_interval = pull
        meter = CostMeter()
        if metered:
            grid = MeteredGrid(grid, meter)
        while not list(grid.get_node_ids()):
            time.sleep(0.01)
        node = next(iter(grid.get_node_ids()))
        content = RecordDict({"config": ConfigRecord({"n": 0})})
        if payload == "model":
            model = build_model("cnn", (1, 8, 8), 10)
            content["arrays"] = ArrayRecord(model.state_dict())
        rows = []
        with meter.phase("round-trip"):
            for trip in range(trips):
                rows.append(_trip(grid, node, content, trip))
        Path(out).write_text(json.dumps(rows))

    def _trip(grid: Grid, node: int, content: RecordDict, trip: int) -> dict[str, float]:
        """One message to `node` and its reply, with the four timestamps."""
        message = Message(content=content, dst_node_id=node, message_type="query.info" if payload == "app" else "query.echo")
        sent = time.time()
        replies = list(grid.send_and_receive([message], timeout=60))
        received = time.time()
        metrics = replies[0].content.metric_records["metrics"]
        return {
            "trip": trip,
            "sent": sent,
            "received": received,
            "started": as_float(metrics.get("started", "nan")),
            "ended": as_float(metrics.get("ended", "nan")),
        }

    return app


def _client_app():  # noqa: ANN202 - a flwr app
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query("echo")
    def echo(msg: Message, context: Context) -> Message:
        started = time.time()
        return Message(content=RecordDict({"metrics": MetricRecord({"started": started, "ended": time.time()})}), reply_to=msg)

    return app


def _fedunlearn_client_app(cache_dir: str):  # noqa: ANN202 - a flwr app
    """fedunlearn's ClientApp for the default scenario (its handlers; the `info` query touches only the resident runtime)."""
    from fedunlearn.config import build_config
    from strategies import app_config
    from strategies.client_app import build_client_app

    return build_client_app(app_config.client_spec_for(build_config("default"), cache_dir))


def measure(name: str, engine_pickup: float | None, pull: float | None, payload: str, metered: bool, trips: int) -> dict[str, Any]:
    """Run `trips` round trips in one simulation and return per-stage medians (ms), the first trip left out (warm-up)."""
    from flwr.simulation import run_simulation

    from strategies.engine_tuning import faster_message_pickup

    with tempfile.TemporaryDirectory(prefix="fedunlearn-rt-") as tmp:
        out = os.path.join(tmp, "rows.json")
        with faster_message_pickup(engine_pickup if engine_pickup is not None else 0.1):
            run_simulation(
                server_app=_server_app(trips + 1, payload, pull, metered, out),
                client_app=_fedunlearn_client_app(tmp) if payload == "app" else _client_app(),
                num_supernodes=1,
                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
                verbose_logging=False,
            )
        rows = json.loads(Path(out).read_text())[1:]
    stages = {
        "total": [r["received"] - r["sent"] for r in rows],
        "out": [r["started"] - r["sent"] for r in rows],
        "handler": [r["ended"] - r["started"] for r in rows],
        "back": [r["received"] - r["ended"] for r in rows],
    }
    return {
        "setting": name,
        "engine_pickup_s": engine_pickup if engine_pickup is not None else 0.1,
        "grid_pull_s": pull,
        "payload": payload,
        "metered": metered,
        "trips": len(rows),
        "median_ms": {k: _ms(statistics.median(v)) for k, v in stages.items()},
        "p90_ms": {k: _ms(sorted(v)[int(0.9 * (len(v) - 1))]) for k, v in stages.items()},
    }


def _ms(seconds: float) -> float | None:
    """Milliseconds, None where the stage was not stamped (fedunlearn's ClientApp does not stamp its handlers)."""
    return None if math.isnan(seconds) else 1000 * seconds


def main(argv: list[str] | None = None) -> int:
    """Measure every setting in one run, print the medians, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=40, help="round trips per setting (after one warm-up trip)")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/round-trip.json)")
    args = parser.parse_args(argv)
    if args.trips < 1:
        raise SystemExit(f"--trips {args.trips}: must be >= 1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    result = envelope("round-trip", {"trips": args.trips}, argv)
    result["load_average_before"] = list(os.getloadavg())
    result["settings"] = [measure(*setting, trips=args.trips) for setting in SETTINGS]
    result["load_average_after"] = list(os.getloadavg())
    rows = [
        [s["setting"], *("-" if s["median_ms"][k] is None else f"{s['median_ms'][k]:.1f}" for k in ("total", "out", "handler", "back"))]
        for s in result["settings"]
    ]
    print(f"\nOne round trip, median ms over {args.trips} trips ({result['machine']['cpu']}, load {result['load_average_before'][0]:.1f})")
    print(table(["setting", "total", "out (to handler start)", "handler", "back (to server)"], rows))
    out = Path(args.out) if args.out else RESULTS_DIR / "round-trip.json"
    write_json(out, result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
