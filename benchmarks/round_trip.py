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
Medians in milliseconds.

Then the `iau-cached` part (`--profile-calls`, 0 skips it): where one unlearning call of `iau-cached` on the
default scenario goes (benchmarks/round_trip_profile.py, in a fresh process per source tree): the engine's round
trips, the clients' compute, the simulator's stale-drift measurement and the server's own code, by function.
`--before REF` profiles another version beside this tree in the same run (a commit of this repository, exported
with `git archive`, or a checkout's folder), so before and after a change are measured side by side;
`--profile-scenario` (repeatable, comma-separated KEY=VALUE settings, `default` for none) picks the scenarios.

    python -m benchmarks.round_trip --before e71bb60 --profile-scenario default --profile-scenario iau-steps=1
Writes benchmarks/results/round-trip.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import QUIET_ENV, REPO_ROOT, RESULTS_DIR, envelope, table, write_json

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


def scenario_settings(scenario: str) -> list[str]:
    """`default` (or nothing): the default scenario; else comma-separated KEY=VALUE settings on top of it."""
    items = [item.strip() for item in scenario.split(",") if item.strip() and item.strip() != "default"]
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--profile-scenario {scenario!r}: {item!r} is not KEY=VALUE, e.g. --profile-scenario iau-steps=1")
    return items


def export_commit(ref: str, into: Path) -> str:
    """`git archive` of commit `ref` of this repository into `into`; returns the commit's full id."""
    resolved = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"], capture_output=True, text=True)
    if resolved.returncode != 0:
        raise SystemExit(f"--before {ref}: neither a folder nor a commit of this repository ({resolved.stderr.strip()})")
    commit = resolved.stdout.strip()
    archive = subprocess.Popen(["git", "-C", str(REPO_ROOT), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"--before {ref}: git archive failed")
    return commit


def profile_tree(label: str, tree: Path, calls: int, settings: list[str], timeout: float = 1800) -> dict[str, Any]:
    """benchmarks/round_trip_profile.py on `tree`'s code (its PYTHONPATH, Ray's workers' too), in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="fedunlearn-rt-profile-") as tmp:
        out = Path(tmp) / "profile.json"
        command = [sys.executable, str(REPO_ROOT / "benchmarks" / "round_trip_profile.py"), "--calls", str(calls), "--out", str(out)]
        for item in settings:
            command += ["--set", item]
        env = dict(os.environ, **QUIET_ENV, PYTHONPATH=str(tree))
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0 or not out.exists():
            return {"label": label, "tree": str(tree), "ok": False, "error": done.stderr[-2000:]}
        return {"label": label, "ok": True, **json.loads(out.read_text())}


def _profile_rows(trees: list[dict[str, Any]]) -> list[list[str]]:
    """One table row per tree: the first call (what results.json measures), then the medians of the later calls."""
    rows = []
    for tree in trees:
        if not tree["ok"]:
            rows.append([tree["label"], "failed", *["-"] * 7])
            continue
        first, later = tree["plain"][0], tree["plain"][1:] or tree["plain"]

        def ms(key: str, calls: list[dict[str, Any]] = later) -> str:
            return f"{1000 * statistics.median(c[key] for c in calls):.1f}"

        rows.append(
            [
                tree["label"],
                f"{1000 * first['metered_wall_s']:.1f}",
                ms("metered_wall_s"),
                ms("wall_s"),
                ms("engine_s"),
                ms("client_compute_s"),
                ms("stale_drift_s"),
                ms("server_own_s"),
                str(tree["rounds_per_call"]),
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure every setting in one run, print the medians, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=40, help="round trips per setting (after one warm-up trip; 0: the profile only)")
    parser.add_argument(
        "--profile-calls", type=int, default=7, help="iau-cached calls profiled per tree, unprofiled and profiled each (0: none)"
    )
    parser.add_argument("--before", default=None, metavar="REF", help="a commit (or a checkout's folder) profiled beside this tree")
    parser.add_argument(
        "--profile-scenario", action="append", default=None, metavar="SETTINGS", help="KEY=VALUE,... on the default scenario (repeatable)"
    )
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/round-trip.json)")
    args = parser.parse_args(argv)
    if args.trips < 0 or args.profile_calls < 0:
        raise SystemExit(f"--trips {args.trips} --profile-calls {args.profile_calls}: must be >= 0")
    scenarios = args.profile_scenario or ["default"]
    settings_of = {scenario: scenario_settings(scenario) for scenario in scenarios}  # bad input ends here, before anything runs
    exported = tempfile.TemporaryDirectory(prefix="fedunlearn-rt-before-")
    before: Path | None = None
    before_commit: str | None = None
    if args.before is not None and Path(args.before).is_dir():
        before = Path(args.before).resolve()
        if not (before / "strategies" / "iau_fed.py").is_file():
            raise SystemExit(f"--before {args.before}: not a fedunlearn checkout (no strategies/iau_fed.py there)")
    elif args.before is not None:
        before, before_commit = Path(exported.name), export_commit(args.before, Path(exported.name))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    result = envelope("round-trip", {"trips": args.trips, "profile_calls": args.profile_calls, "profile_scenarios": scenarios}, argv)
    result["load_average_before"] = list(os.getloadavg())
    result["settings"] = [measure(*setting, trips=args.trips) for setting in SETTINGS] if args.trips else []
    if args.profile_calls:
        trees = [("before", before)] if before is not None else []
        trees.append(("after" if before is not None else "this tree", REPO_ROOT))
        result["iau_cached"] = []
        for scenario in scenarios:
            profiles = []
            for label, tree in trees:
                load = os.getloadavg()[0]
                profiles.append({**profile_tree(label, tree, args.profile_calls, settings_of[scenario]), "load_average_at_start": load})
                if label == "before" and before_commit is not None:
                    profiles[-1]["commit"] = before_commit
            result["iau_cached"].append({"scenario": scenario, "calls": args.profile_calls, "trees": profiles})
    exported.cleanup()
    result["load_average_after"] = list(os.getloadavg())
    if result["settings"]:
        rows = [
            [s["setting"], *("-" if s["median_ms"][k] is None else f"{s['median_ms'][k]:.1f}" for k in ("total", "out", "handler", "back"))]
            for s in result["settings"]
        ]
        print(
            f"\nOne round trip, median ms over {args.trips} trips ({result['machine']['cpu']}, load {result['load_average_before'][0]:.1f})"
        )
        print(table(["setting", "total", "out (to handler start)", "handler", "back (to server)"], rows))
    for part in result.get("iau_cached", []):
        print(f"\nOne iau-cached call, {part['scenario']} (ms; the first call, then medians of the {args.profile_calls - 1 or 1} after it)")
        headers = ["tree", "first: metered", "metered", "wall", "engine", "client compute", "stale drift", "server own", "rounds"]
        print(table(headers, _profile_rows(part["trees"])))
    out = Path(args.out) if args.out else RESULTS_DIR / "round-trip.json"
    write_json(out, result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
