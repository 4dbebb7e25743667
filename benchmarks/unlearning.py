"""Unlearning benchmark: seconds, rounds and bytes of every registered method against retraining, same scenario.

    python -m benchmarks.unlearning                   # the default scenario (README), 3 repeats
    python -m benchmarks.unlearning --preset smoke --repeats 1
    python -m benchmarks.unlearning --preset smoke --clients 3 --rounds 1 --set model=mlp --set train-limit=300 \
        --repeats 1 --engine local --out /tmp/unlearning.json       # a miniature (in-process, no Ray)

Each repeat runs one `simulations.runner.Experiment` (every method in `simulations.methods.REGISTRY`,
retrain first) in a fresh process and reads the cost blocks of its results.json. Reports medians over
repeats and the issue's targets: `iau-cached` at least 1000x faster than `retrain` in wall seconds,
`iau` at least (training rounds / 2)x; a missed target says by how much and why.
Writes benchmarks/results/unlearning-<preset>.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, envelope, format_bytes, format_ratio, format_seconds, median, run_child, table, write_json
from .training import NOISE_NOTE

REFERENCE = "retrain"
CACHED_TARGET = 1000.0
FINISHED = ("complete", "renormalised", "fallback")  # a method's status when it produced an unlearned model
ENGINES = ("ray", "local")


def registered_methods() -> list[str]:
    """Every method registered with the runner (others add baselines: never a fixed list)."""
    import importlib

    importlib.import_module("simulations.runner")  # importing the runner registers every method it knows
    from simulations.methods import REGISTRY

    return [REFERENCE, *[name for name in REGISTRY if name != REFERENCE]]


def grid_pull_interval(scenario: dict[str, Any] | None = None, engine: str = "ray") -> float | None:
    """Seconds the server's grid sleeps between polls for replies: the floor of any round trip (None in-process).

    The runner sets it from the experiment's `grid-poll-interval` where the configuration has that
    setting; otherwise Flower's InMemoryGrid default applies.
    """
    if engine == "local":
        return None  # LocalGrid answers synchronously: no polling
    configured = (scenario or {}).get("grid-poll-interval")
    if configured is not None:
        return float(configured)
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return float(inspect.signature(InMemoryGrid.__init__).parameters["pull_interval"].default)


def parse_set(items: list[str]) -> dict[str, str]:
    """--set key=value pairs (the CLI's flags without '--')."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. --set num-clients=20")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def method_row(model: dict[str, Any]) -> dict[str, Any]:
    """Cost, speedup and status of one method in one results.json."""
    cost = model.get("cost") or {}
    speed = model.get("speedup") or {}
    return {
        "wall_s": cost.get("wall_s"),
        "client_compute_s": cost.get("client_compute_s"),
        "rounds": cost.get("rounds"),
        "participations": cost.get("participations"),
        "bytes": (cost.get("bytes_down") or 0) + (cost.get("bytes_up") or 0),
        "speedup_wall": speed.get("wall"),
        "speedup_rounds": speed.get("rounds"),
        "speedup_bytes": speed.get("bytes"),
        "status": model.get("status", "complete"),
        "error": model.get("error"),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats in which the method finished; how many did not, and why."""
    keys = ("wall_s", "client_compute_s", "rounds", "participations", "bytes", "speedup_wall", "speedup_rounds", "speedup_bytes")
    finished = [r for r in rows if r.get("status", "complete") in FINISHED]
    unfinished = [f"{r.get('status')}: {r.get('error') or 'no unlearned model'}" for r in rows if r not in finished]
    return {k: median(r.get(k) for r in finished) for k in keys} | {
        "repeats": len(rows),
        "repeats_finished": len(finished),
        "statuses": sorted({str(r.get("status", "complete")) for r in rows}),
        "unfinished": unfinished,
        "wall_s_each": [r.get("wall_s") for r in rows],
    }


def targets_for(methods: dict[str, dict[str, Any]], training_rounds: int, pull: float | None) -> list[dict[str, Any]]:
    """The issue's two unlearning targets, met or missed by how much and why (`pull`: the grid's poll interval, None in-process)."""
    retrain_wall = methods.get(REFERENCE, {}).get("wall_s")
    out = []
    for name, required in (("iau-cached", CACHED_TARGET), ("iau", training_rounds / 2)):
        entry: dict[str, Any] = {
            "target": f"{name} at least {required:g}x faster than retrain in wall seconds",
            "method": name,
            "required": required,
            "better": "higher",
        }
        summary = methods.get(name)
        measured = None if summary is None else summary.get("speedup_wall")
        if summary is None or measured is None or retrain_wall is None:
            why = (
                f"{name} did not finish in any repeat: {'; '.join(summary['unfinished'])[:500]}"
                if summary is not None and summary.get("unfinished") and not summary.get("repeats_finished")
                else f"{name} or retrain did not run"
            )
            out.append({**entry, "measured": None, "met": None, "note": f"not measured ({why})"})
            continue
        met = measured >= required
        wall, rounds, compute = summary["wall_s"], summary["rounds"] or 0, summary["client_compute_s"] or 0.0
        note = (
            f"measured {measured:.1f}x: {name} took {format_seconds(wall)} s for {rounds:g} round(s) (client compute "
            f"{format_seconds(compute)} s), retrain {format_seconds(retrain_wall)} s"
        )
        ceiling = retrain_wall / (rounds * pull) if pull and rounds else None
        if not met:
            note += f"; missed by {required / measured:.1f}x."
            if rounds:
                overhead = (wall - compute) / rounds
                note += (
                    f" Why: the clients computed {format_seconds(compute)} s; the rest, about {format_seconds(overhead)} s per "
                    "round, is the simulation's fixed cost of one round trip (the server's and the engine's polls"
                    + (f", {pull:g} s each" if pull else "")
                    + ", the Ray actor call, (de)serialising the messages), which no "
                    "method can go below;"
                )
            note += (
                f" {required:g}x would need retraining to take at least {format_seconds(required * wall)} s at the measured "
                f"{format_seconds(wall)} s (a longer training run, more or larger clients)"
            )
        out.append({**entry, "measured": measured, "met": met, "ceiling_from_poll_interval": ceiling, "note": note})
    return out


def print_report(result: dict[str, Any]) -> None:
    """Medians per method, then the targets."""
    rows = []
    for name, s in result["methods"].items():
        finished = s.get("repeats_finished", s.get("repeats"))
        rows.append(
            [
                name,
                format_seconds(s["wall_s"]),
                format_seconds(s["client_compute_s"]),
                "-" if s["rounds"] is None else f"{s['rounds']:g}",
                format_bytes(s["bytes"]),
                format_ratio(s["speedup_wall"]),
                format_ratio(s["speedup_rounds"]),
                format_ratio(s["speedup_bytes"]),
                f"{finished}/{s.get('repeats')}",
            ]
        )
    cfg = result["scenario"]
    engine = result["settings"].get("engine", "ray")
    print(
        f"\nUnlearning, preset {result['settings']['preset']}: {cfg.get('dataset')}, {cfg.get('num-clients')} clients, "
        f"{cfg.get('rounds')} rounds, {result['settings']['repeats']} repeat(s) ({result['machine']['cpu']}, {result['date']})"
        + ("" if engine == "ray" else f" [engine {engine}: in-process LocalGrid, no Ray]")
    )
    print(table(["method", "wall s", "client compute s", "rounds", "bytes", "x wall", "x rounds", "x bytes", "finished"], rows))
    for target in result["targets"]:
        status = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[target["met"]]
        print(f"  [{status}] {target['target']}: {target['note']}")
    for name, s in result["methods"].items():
        for why in s.get("unfinished", []):
            print(f"  {name} did not finish a repeat: {why[:500]}")
    for error in result.get("errors", []):
        print(f"  failed run: {str(error)[:2000]}")


def main(argv: list[str] | None = None) -> int:
    """Run the unlearning benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", help="scenario preset of simulations.run (default: the default scenario)")
    parser.add_argument("--clients", type=int, default=None, help="override num-clients")
    parser.add_argument("--rounds", type=int, default=None, help="override the training rounds")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every registered method)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other setting of simulations.run")
    parser.add_argument(
        "--shadow-mia", action="store_true", help="keep the shadow-model attack (off: it costs minutes and no method's cost)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one experiment may run")
    parser.add_argument("--memory-cap-gb", type=float, default=None)
    parser.add_argument(
        "--engine",
        default="ray",
        choices=ENGINES,
        help="ray: simulations.runner on Flower's simulation engine (what is benchmarked); local: the same "
        "Experiment driven in-process through LocalGrid (miniatures; no Ray, no grid polling)",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="run the experiments in this process instead of a fresh child each (tests, debugging)"
    )
    parser.add_argument("--out", default=None, help="JSON file to write (default under benchmarks/results/)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else registered_methods()
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)
    overrides: dict[str, Any] = {"methods": ",".join(methods), "shadow_mia": args.shadow_mia, **parse_set(args.set)}
    if args.clients is not None:
        overrides["num_clients"] = args.clients
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "methods": methods, "overrides": overrides}
    result = envelope("unlearning", settings, argv)
    per_method: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    runs, errors, scenario = [], [], {}
    cap = int(args.memory_cap_gb * 1e9) if args.memory_cap_gb else None
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="fedunlearn-bench-exp-") as tmp:
            print(f"[{repeat + 1}/{args.repeats}] experiment (preset {args.preset}, methods {','.join(methods)}) ...", flush=True)
            child = run_child(
                "experiment",
                {"preset": args.preset, "overrides": overrides, "out_dir": tmp, "engine": args.engine},
                args.timeout,
                cap,
                in_process=args.in_process,
            )
            path = Path(tmp) / "results.json"
            results = json.loads(path.read_text()) if path.exists() else None
        if not child.get("ok") or results is None or results.get("status") != "complete":
            errors.append(child.get("error") or (results or {}).get("status"))
            print(f"    FAILED: {str(errors[-1])[:2000]}", flush=True)
        if results is None:
            continue
        scenario = results.get("config", {})
        rows = {name: method_row(model) for name, model in results.get("models", {}).items() if name != "original"}
        for name, row in rows.items():
            per_method.setdefault(name, []).append(row)
        runs.append(
            {
                "status": results.get("status"),
                "total_wall_s": results.get("total_wall_s"),
                "methods": rows,
                "phases": results.get("phases"),
                "forget_count": results.get("forget_count"),
                "memory": child.get("memory"),
                "load_average_before": child.get("load_average_before"),
                "process_wall_s": child.get("process_wall_s"),
            }
        )
        print(
            "    "
            + ", ".join(
                f"{n} {format_seconds(r['wall_s'])} s" + ("" if r["status"] in FINISHED else f" ({r['status']})") for n, r in rows.items()
            ),
            flush=True,
        )
    result["scenario"] = scenario
    result["methods"] = {name: summarise(rows) for name, rows in per_method.items() if rows}
    pull = grid_pull_interval(scenario, args.engine)
    result["grid_pull_interval_s"] = pull
    result["targets"] = targets_for(result["methods"], int(scenario.get("rounds") or 0), pull)
    result["runs"] = runs
    result["errors"] = errors
    result["notes"] = [
        NOISE_NOTE,
        "Costs are those of results.json: wall seconds of each method's own phase (driver-side evaluation "
        "excluded), rounds and bytes metered on the real messages; speedups are retrain's cost over the "
        "method's, per repeat, then the median, over the repeats in which the method finished (status "
        "complete, renormalised or fallback); a method that aborted or failed is listed under 'unfinished'.",
    ]
    if args.engine != "ray":
        result["notes"].insert(
            0,
            f"engine {args.engine}: the experiments ran in-process through LocalGrid (no Ray, no grid "
            "polling); these are not benchmark figures, only a check that every method runs.",
        )
    out = Path(args.out) if args.out else RESULTS_DIR / f"unlearning-{args.preset}.json"
    write_json(out, result)
    print_report(result)
    print(f"\nwrote {out}")
    unfinished = any(s["unfinished"] for s in result["methods"].values())
    return 0 if not errors and result["methods"] and not unfinished else 1


if __name__ == "__main__":
    sys.exit(main())
