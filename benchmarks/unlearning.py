"""Unlearning benchmark: seconds, rounds and bytes of every registered method against retraining, same scenario.

    python -m benchmarks.unlearning                   # the default scenario (README), 3 repeats
    python -m benchmarks.unlearning --preset smoke --repeats 1

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


def registered_methods() -> list[str]:
    """Every method registered with the runner (others add baselines: never a fixed list)."""
    import importlib

    importlib.import_module("simulations.runner")  # importing the runner registers every method it knows
    from simulations.methods import REGISTRY

    return [REFERENCE, *[name for name in REGISTRY if name != REFERENCE]]


def grid_pull_interval() -> float:
    """Seconds Flower's in-memory grid sleeps between polls for replies: the floor of any round trip."""
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
    """Cost and speedup of one method in one results.json."""
    cost = model.get("cost") or {}
    speed = model.get("speedup") or {}
    return {"wall_s": cost.get("wall_s"), "client_compute_s": cost.get("client_compute_s"), "rounds": cost.get("rounds"),
            "participations": cost.get("participations"), "bytes": (cost.get("bytes_down") or 0) + (cost.get("bytes_up") or 0),
            "speedup_wall": speed.get("wall"), "speedup_rounds": speed.get("rounds"), "speedup_bytes": speed.get("bytes")}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats of every figure."""
    keys = ("wall_s", "client_compute_s", "rounds", "participations", "bytes", "speedup_wall", "speedup_rounds", "speedup_bytes")
    return {k: median(r.get(k) for r in rows) for k in keys} | {"repeats": len(rows),
                                                               "wall_s_each": [r.get("wall_s") for r in rows]}


def targets_for(methods: dict[str, dict[str, Any]], training_rounds: int, pull: float) -> list[dict[str, Any]]:
    """The issue's two unlearning targets, met or missed by how much and why."""
    retrain_wall = methods.get(REFERENCE, {}).get("wall_s")
    out = []
    for name, required in (("iau-cached", CACHED_TARGET), ("iau", training_rounds / 2)):
        entry: dict[str, Any] = {"target": f"{name} at least {required:g}x faster than retrain in wall seconds", "method": name,
                                 "required": required}
        summary = methods.get(name)
        measured = None if summary is None else summary.get("speedup_wall")
        if measured is None or retrain_wall is None:
            out.append({**entry, "measured": None, "met": None, "note": f"not measured ({name} or retrain did not run)"})
            continue
        met = measured >= required
        wall, rounds, compute = summary["wall_s"], summary["rounds"] or 1, summary["client_compute_s"] or 0.0
        ceiling = retrain_wall / (rounds * pull)
        note = (f"measured {measured:.1f}x: {name} took {wall:.3f} s for {rounds:g} round(s) (client compute {compute:.3f} s), "
                f"retrain {retrain_wall:.2f} s")
        if not met:
            note += (f"; missed by {required / measured:.1f}x. Why: every Flower round trip waits at least one poll of the "
                     f"grid ({pull:g} s, flwr's InMemoryGrid pull_interval), so against this retrain a {rounds:g}-round method "
                     f"can reach at most about {ceiling:.0f}x; {required:g}x would need retraining to take at least "
                     f"{required * wall:.0f} s at the measured {wall:.3f} s (a longer training run, more or larger clients)")
        out.append({**entry, "measured": measured, "met": met, "ceiling_from_poll_interval": ceiling, "note": note})
    return out


def print_report(result: dict[str, Any]) -> None:
    """Medians per method, then the targets."""
    rows = []
    for name, s in result["methods"].items():
        rows.append([name, format_seconds(s["wall_s"]), format_seconds(s["client_compute_s"]),
                     "-" if s["rounds"] is None else f"{s['rounds']:g}", format_bytes(s["bytes"]), format_ratio(s["speedup_wall"]),
                     format_ratio(s["speedup_rounds"]), format_ratio(s["speedup_bytes"])])
    cfg = result["scenario"]
    print(f"\nUnlearning, preset {result['settings']['preset']}: {cfg.get('dataset')}, {cfg.get('num-clients')} clients, "
          f"{cfg.get('rounds')} rounds, {result['settings']['repeats']} repeat(s) ({result['machine']['cpu']}, {result['date']})")
    print(table(["method", "wall s", "client compute s", "rounds", "bytes", "x wall", "x rounds", "x bytes"], rows))
    for target in result["targets"]:
        status = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[target["met"]]
        print(f"  [{status}] {target['target']}: {target['note']}")
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
    parser.add_argument("--shadow-mia", action="store_true", help="keep the shadow-model attack (off: it costs minutes and no method's cost)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one experiment may run")
    parser.add_argument("--memory-cap-gb", type=float, default=None)
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
            child = run_child("experiment", {"preset": args.preset, "overrides": overrides, "out_dir": tmp}, args.timeout, cap)
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
        runs.append({"status": results.get("status"), "total_wall_s": results.get("total_wall_s"), "methods": rows,
                     "phases": results.get("phases"), "forget_count": results.get("forget_count"),
                     "memory": child.get("memory"), "load_average_before": child.get("load_average_before"),
                     "process_wall_s": child.get("process_wall_s")})
        print("    " + ", ".join(f"{n} {format_seconds(r['wall_s'])} s" for n, r in rows.items()), flush=True)
    result["scenario"] = scenario
    result["methods"] = {name: summarise(rows) for name, rows in per_method.items() if rows}
    pull = grid_pull_interval()
    result["grid_pull_interval_s"] = pull
    result["targets"] = targets_for(result["methods"], int(scenario.get("rounds") or 0), pull)
    result["runs"] = runs
    result["errors"] = errors
    result["notes"] = [NOISE_NOTE,
                       "Costs are those of results.json: wall seconds of each method's own phase (driver-side evaluation "
                       "excluded), rounds and bytes metered on the real messages; speedups are retrain's cost over the "
                       "method's, per repeat, then the median."]
    out = Path(args.out) if args.out else RESULTS_DIR / f"unlearning-{args.preset}.json"
    write_json(out, result)
    print_report(result)
    print(f"\nwrote {out}")
    return 0 if not errors and result["methods"] else 1


if __name__ == "__main__":
    sys.exit(main())
