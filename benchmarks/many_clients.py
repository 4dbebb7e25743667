"""Many virtual clients on one box: a whole experiment at 10,000 clients, its peak memory and seconds per phase.

    python -m benchmarks.many_clients                              # 10,000 clients (about 10 min on 2 cores)
    python -m benchmarks.many_clients --clients 2000,10000         # how the figures grow with the clients
    python -m benchmarks.many_clients --clients 40 --engine local --in-process --out /tmp/many.json   # a miniature

Each point is one complete `simulations.runner.Experiment` in a fresh process, as `python -m simulations.run`
runs it: cohort execution (each Ray worker hosts cohorts of virtual clients), --fraction-fit 0.05, the small
`mlp` model, disk-backed gradient caches, methods `retrain`, `iau` and `iau-cached`, client 0 withdrawing,
on synthetic 28x28 MNIST files with 20 training examples per client (benchmarks/data.py). Per phase
(setup, training, caching, each method) it reports the wall seconds, rounds and bytes metered on the real
messages (results.json), the peak RSS of the driver and of all processes while the phase ran (sampled every
0.25 s), and the bytes and files of the clients' cache folder on disk when it ended. The target is the one of
issue 15: training, caching, `iau` and `iau-cached` run to the end on this machine. A point whose processes
pass --memory-cap-gb is stopped and reported as such (others share the machine).
Writes benchmarks/results/many-clients-10000.json (the largest client count names the file).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import data
from .common import RESULTS_DIR, add_point_arguments, envelope, format_bytes, format_seconds, run_child, table, write_json
from .training import NOISE_NOTE

METHODS = ("retrain", "iau", "iau-cached")
MAIN_PHASES = ("setup", "training", "caching", *(f"unlearn:{m}" for m in METHODS))
TARGET = (
    "10,000 virtual clients (cohort, fraction-fit 0.05, disk caches, a small model): training, caching, iau and iau-cached run to the end"
)


def int_list(text: str) -> list[int]:
    """'2000,10000' -> [2000, 10000]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"--clients {text!r}: expected comma-separated positive integers, e.g. 2000,10000")
    return values


def overrides_for(clients: int, dataset_root: str, args: argparse.Namespace) -> dict[str, Any]:
    """The experiment's settings at one client count (CLI keys as `simulations.run` takes them)."""
    return {
        "dataset": "mnist",
        "data_dir": dataset_root,
        "model": args.model,
        "num_clients": clients,
        "execution": "cohort",
        "fraction_fit": args.fraction_fit,
        "rounds": args.rounds,
        "local_epochs": 1,
        "batch_size": 32,
        "lr": 0.05,
        "cache_dtype": args.cache_dtype,
        "methods": ",".join(METHODS),
        "seed": args.seed,
        # cheap evaluation: this benchmark is about scale; the removal metrics are other benchmarks' business
        "shadow_mia": False,
        "mia_attacks": "loss",
        "relearn_steps": 0,
        "eval_every": args.rounds,
        "checkpoint_every": 0,
    }


def phase_rows(results: dict[str, Any] | None, spans: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per phase: the run's metered cost (results.json) beside the memory and cache figures measured around it."""
    costs = (results or {}).get("phases") or {}
    rows: dict[str, dict[str, Any]] = {}
    for name in [*MAIN_PHASES, *(n for n in costs if n not in MAIN_PHASES)]:
        cost, span = costs.get(name), spans.get(name)
        if cost is None and span is None:
            continue
        rows[name] = {
            "wall_s": (cost or {}).get("wall_s"),
            "rounds": (cost or {}).get("rounds"),
            "participations": (cost or {}).get("participations"),
            "bytes": None if cost is None else cost["bytes_down"] + cost["bytes_up"],
            "driver_rss_peak_bytes": (span or {}).get("driver_rss_peak_bytes"),
            "total_rss_peak_bytes": (span or {}).get("total_rss_peak_bytes"),
            "cache_bytes_on_disk_after": (span or {}).get("cache_bytes_after"),
            "cache_files_after": (span or {}).get("cache_files_after"),
        }
    return rows


def point_of(
    clients: int, examples: int, child: dict[str, Any], results: dict[str, Any] | None, results_bytes: int | None
) -> dict[str, Any]:
    """One client count's figures from the child's result and the run's results.json."""
    memory = child.get("memory") or {}
    models = (results or {}).get("models") or {}
    statuses = {m: (models.get(m) or {}).get("status", "missing") for m in METHODS}
    phases = phase_rows(results, child.get("phases") or {})
    caching = phases.get("caching") or {}
    return {
        "clients": clients,
        "examples_per_client": examples,
        "status": (results or {}).get("status", "failed"),
        "methods": statuses,
        "error": None if child.get("ok") else child.get("error"),
        "execution": (results or {}).get("execution"),
        "num_parameters": (results or {}).get("num_parameters"),
        "process_wall_s": child.get("process_wall_s"),
        "total_wall_s": (results or {}).get("total_wall_s"),
        "driver_peak_rss_bytes": memory.get("driver_peak_rss_bytes"),
        "worker_peak_rss_max_bytes": memory.get("worker_peak_rss_max_bytes"),
        "workers_peak_rss_sum_bytes": memory.get("workers_peak_rss_sum_bytes"),
        "total_rss_peak_bytes": memory.get("total_rss_peak_bytes") or child.get("tree_rss_peak_bytes_sampled"),
        "num_worker_processes": memory.get("num_worker_processes"),
        "load_1min_mean": memory.get("load_1min_mean"),
        "cache_bytes_on_disk": caching.get("cache_bytes_on_disk_after"),
        "cache_files": caching.get("cache_files_after"),
        "results_json_bytes": results_bytes,
        "phases": phases,
        "finished": (results or {}).get("status") == "complete" and all(s == "complete" for s in statuses.values()),
    }


def target_check(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the 10,000-client point ran every phase to the end (not measured without one)."""
    point = next((p for p in points if p["clients"] == 10_000), None)
    if point is None:
        return {"target": TARGET, "met": None, "note": "not measured: run with --clients including 10000"}
    note = (
        f"driver peak {format_bytes(point['driver_peak_rss_bytes'])}, all processes {format_bytes(point['total_rss_peak_bytes'])}, "
        f"{format_seconds(point['process_wall_s'])} s; caches {format_bytes(point['cache_bytes_on_disk'])} in {point['cache_files']} files"
    )
    if not point["finished"]:
        note = f"did not finish ({point['status']}; methods {point['methods']}): " + str(point["error"] or "")[:300]
    return {"target": TARGET, "met": point["finished"], "note": note}


def print_report(result: dict[str, Any]) -> None:
    """One table of the points, then one per point of its phases, then the target."""
    print(f"\nMany clients ({result['machine']['cpu']}, {result['machine']['cpus']} CPUs, {result['date']})")
    print(
        table(
            ["clients", "status", "wall s", "driver peak RSS", "all processes peak RSS", "cache on disk", "cache files", "results.json"],
            [
                [
                    p["clients"],
                    p["status"],
                    format_seconds(p["process_wall_s"]),
                    format_bytes(p["driver_peak_rss_bytes"]),
                    format_bytes(p["total_rss_peak_bytes"]),
                    format_bytes(p["cache_bytes_on_disk"]),
                    p["cache_files"] if p["cache_files"] is not None else "-",
                    format_bytes(p["results_json_bytes"]),
                ]
                for p in result["points"]
            ],
        )
    )
    for p in result["points"]:
        print(f"\n{p['clients']} clients: per phase")
        print(
            table(
                ["phase", "wall s", "rounds", "bytes", "driver peak RSS", "all processes peak RSS", "cache on disk after"],
                [
                    [
                        name,
                        format_seconds(row["wall_s"]),
                        row["rounds"] if row["rounds"] is not None else "-",
                        format_bytes(row["bytes"]),
                        format_bytes(row["driver_rss_peak_bytes"]),
                        format_bytes(row["total_rss_peak_bytes"]),
                        format_bytes(row["cache_bytes_on_disk_after"]),
                    ]
                    for name, row in p["phases"].items()
                ],
            )
        )
    target = result["target"]
    print(f"\n  [{ {True: 'MET', False: 'MISSED', None: 'NOT MEASURED'}[target['met']] }] {target['target']}: {target['note']}")
    for p in result["points"]:
        if p["error"]:
            print(f"  {p['clients']} clients: {str(p['error'])[:1500]}")


def main(argv: list[str] | None = None) -> int:
    """Run one experiment per client count, writing the JSON after each, then the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10000", help="comma-separated virtual client counts (default 10000)")
    parser.add_argument("--examples", type=int, default=20, help="training examples per client (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="training rounds (retrain redoes them; default 2)")
    parser.add_argument("--fraction-fit", type=float, default=0.05, help="fraction of clients trained per round (default 0.05)")
    parser.add_argument("--model", default="mlp", help="model (default mlp, 109k parameters)")
    parser.add_argument("--cache-dtype", default="float32", help="storage precision of the client caches (default float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one point may run")
    parser.add_argument("--memory-cap-gb", type=float, default=10.0, help="stop a point whose processes hold more (default 10)")
    add_point_arguments(parser)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/many-clients-<largest>.json)")
    args = parser.parse_args(argv)
    clients = int_list(args.clients)
    data.partition_size(args.examples)  # refuses an example count the held-out split cannot leave exactly, before anything runs
    out = Path(args.out) if args.out else RESULTS_DIR / f"many-clients-{max(clients)}.json"
    result = envelope("many_clients", {**{k: v for k, v in vars(args).items() if k != "out"}, "methods": list(METHODS)}, argv)
    result["points"] = []
    cap = int(args.memory_cap_gb * 1e9) if args.memory_cap_gb else None
    for index, n in enumerate(clients):
        dataset = data.prepare(n, args.examples, seed=args.seed, root=args.data_root)
        print(f"[{index + 1}/{len(clients)}] {n} clients x {args.examples} examples (cohort) ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="fedunlearn-bench-many-") as tmp:
            spec = {"preset": "default", "overrides": overrides_for(n, dataset.root, args), "out_dir": tmp, "engine": args.engine}
            child = run_child("experiment", {**spec, "phase_memory": True}, args.timeout, cap, in_process=args.in_process)
            path = Path(tmp) / "results.json"
            results = json.loads(path.read_text()) if path.exists() else None
            results_bytes = path.stat().st_size if path.exists() else None
        point = point_of(n, args.examples, child, results, results_bytes)
        point["data"] = dataset.to_dict()
        result["points"].append(point)
        write_json(out, result)  # written as produced: an interrupted series keeps what it measured
    result["target"] = target_check(result["points"])
    result["notes"] = [
        NOISE_NOTE,
        "Per-phase RSS peaks are the largest of the 0.25 s samples taken while the phase ran (plus one at its end); "
        "the whole run's driver and worker peaks are the kernel's high-water marks (VmHWM).",
        "Time outside the phases is the driver's evaluation of each model on every client's data and the results files.",
    ]
    if args.engine != "ray":
        result["notes"].insert(0, "engine local: in-process LocalGrid, no Ray workers: the driver holds everything; not benchmark figures.")
    write_json(out, result)
    print_report(result)
    print(f"\nwrote {out}")
    return 0 if all(p["finished"] for p in result["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
