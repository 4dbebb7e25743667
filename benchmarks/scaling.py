"""Scaling benchmark: how the speedups of `iau` and `iau-cached` over `retrain` grow with the work retraining redoes.

    python -m benchmarks.scaling                                   # the default grid below (about 30 min on 2 cores)
    python -m benchmarks.scaling --grid 10x10x60,10x30x60          # CLIENTSxROUNDSxEXAMPLES points of your own
    python -m benchmarks.scaling --grid 3x2x20 --engine local --out /tmp/scaling.json   # a miniature (in-process)

One factor at a time around a base point (10 clients, 10 rounds, 60 training examples per client):
training rounds 10 / 30 / 100, clients 10 / 100 / 1000, examples per client 60 / 240 / 600. Every
point is one complete experiment (`simulations.runner.Experiment` in a fresh process: training, cache
filling, `retrain`, `iau`, `iau-cached`) on synthetic 28x28 MNIST files (benchmarks/data.py: the same
loader as MNIST, so any client count fits), the small CNN, 1 local epoch, batch 32, SGD lr 0.05,
client 0 withdrawing. Clients map to SuperNodes one per client below --cohort-from clients and in
cohorts at and above it (1000 Ray actors do not fit 24 GiB; the execution mode is recorded per point).
The speedups are the run's own (results.json: retrain's cost over the method's, wall seconds of each
method's phase, rounds and bytes metered on the real messages). Nothing is extrapolated: a point that
did not run is reported as such. Reports the smallest measured point where `iau-cached` passes 1000x
in wall-clock (smallest by the examples retraining processes: clients x examples x rounds).
Writes benchmarks/results/scaling.json and scaling.png beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import data
from .common import RESULTS_DIR, add_point_arguments, envelope, format_bytes, format_ratio, format_seconds, run_child, table, write_json
from .training import NOISE_NOTE
from .unlearning import CACHED_TARGET, FINISHED, method_row

BASE = (10, 10, 60)  # clients, rounds, examples per client
AXES = {"rounds": (10, 30, 100), "clients": (10, 100, 1000), "examples": (60, 240, 600)}
METHODS = ("retrain", "iau", "iau-cached")
AXIS_INDEX = {"clients": 0, "rounds": 1, "examples": 2}


def default_grid() -> list[tuple[int, int, int]]:
    """The base point and, per axis, the points that change only that axis (no duplicates, base first)."""
    points = [BASE]
    for axis, values in AXES.items():
        for value in values:
            point = list(BASE)
            point[AXIS_INDEX[axis]] = value
            if tuple(point) not in points:
                points.append((point[0], point[1], point[2]))
    return points


def parse_grid(text: str) -> list[tuple[int, int, int]]:
    """'10x10x60,100x10x60' -> [(10, 10, 60), (100, 10, 60)] (clients x rounds x examples per client)."""
    points = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        parts = item.lower().split("x")
        try:
            point = tuple(int(p) for p in parts)
        except ValueError:
            point = ()
        if len(point) != 3 or min(point) < 1:
            raise SystemExit(f"--grid {item!r}: expected CLIENTSxROUNDSxEXAMPLES with positive integers, e.g. 10x10x60")
        points.append((point[0], point[1], point[2]))
    return points


def overrides_for(clients: int, rounds: int, dataset_root: str, args: argparse.Namespace) -> dict[str, Any]:
    """The experiment's settings at one point (CLI keys as `simulations.run` takes them)."""
    cohort = clients >= args.cohort_from
    return {
        "dataset": "mnist",
        "data_dir": dataset_root,
        "model": args.model,
        "num_clients": clients,
        "rounds": rounds,
        "local_epochs": 1,
        "batch_size": 32,
        "lr": 0.05,
        "methods": ",".join(args.methods),
        "seed": args.seed,
        "execution": "cohort" if cohort else "per-node",
        # cheap evaluation: this benchmark is about cost; the removal metrics are other benchmarks' business
        "shadow_mia": False,
        "mia_attacks": "loss",
        "relearn_steps": 0,
        "eval_every": rounds,
        "checkpoint_every": 0,
    }


def crosses(point: dict[str, Any]) -> bool:
    """Whether iau-cached's measured wall-clock speedup at this point reaches the target."""
    speed = ((point.get("methods") or {}).get("iau-cached") or {}).get("speedup_wall")
    return speed is not None and speed >= CACHED_TARGET


def smallest_crossing(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured point with the least retraining work (clients x examples x rounds) where iau-cached passes 1000x."""
    passing = [p for p in points if crosses(p)]
    return min(passing, key=lambda p: p["clients"] * p["examples"] * p["rounds"]) if passing else None


def plot(points: list[dict[str, Any]], path: Path) -> Path | None:
    """Speedup (wall, log scale) against each axis, one panel per axis, a line per method and the 1000x target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, panels = plt.subplots(1, len(AXES), figsize=(4.2 * len(AXES), 3.6), sharey=True)
    for panel, axis in zip(panels, AXES, strict=True):
        others = [a for a in AXIS_INDEX if a != axis]
        on_axis = sorted((p for p in points if all(p[a] == BASE[AXIS_INDEX[a]] for a in others)), key=lambda p: p[axis])
        for method in ("iau", "iau-cached"):
            xs = [p[axis] for p in on_axis if (p["methods"].get(method) or {}).get("speedup_wall")]
            ys = [p["methods"][method]["speedup_wall"] for p in on_axis if (p["methods"].get(method) or {}).get("speedup_wall")]
            if xs:
                panel.plot(xs, ys, marker="o", label=method)
        panel.axhline(CACHED_TARGET, color="grey", linestyle="--", linewidth=1, label=f"{CACHED_TARGET:g}x")
        panel.set_xscale("log")
        panel.set_yscale("log")
        panel.set_xlabel({"rounds": "training rounds", "clients": "clients", "examples": "training examples per client"}[axis])
        panel.set_title(f"{axis} (others at the base point)", fontsize=9)
        panel.grid(True, which="both", alpha=0.3)
    panels[0].set_ylabel("speedup over retrain (wall s)")
    panels[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SCALING_HEADERS = [
    "clients",
    "rounds",
    "examples",
    "execution",
    "retrain s",
    "iau x s",
    "iau x rounds",
    "iau x bytes",
    "iau-cached s",
    "iau-cached x s",
    "iau-cached x rounds",
    "iau-cached x bytes",
    "status",
]


def report_rows(result: dict[str, Any]) -> list[list[Any]]:
    """One row per point (SCALING_HEADERS): retraining's seconds, each method's speedups, the point's status."""
    rows = []
    for p in result.get("points", []):
        m = p.get("methods") or {}

        def cell(method: str, key: str, fmt: Any = format_ratio, m: dict[str, Any] = m) -> str:
            value = (m.get(method) or {}).get(key)
            return "-" if value is None else fmt(value)

        rows.append(
            [
                p["clients"],
                p["rounds"],
                p["examples"],
                p.get("execution", "-"),
                cell("retrain", "wall_s", format_seconds),
                cell("iau", "speedup_wall"),
                cell("iau", "speedup_rounds"),
                cell("iau", "speedup_bytes"),
                cell("iau-cached", "wall_s", format_seconds),
                cell("iau-cached", "speedup_wall"),
                cell("iau-cached", "speedup_rounds"),
                cell("iau-cached", "speedup_bytes"),
                p.get("status", "-"),
            ]
        )
    return rows


def crossing_line(result: dict[str, Any]) -> str:
    """Where iau-cached first passes the wall-clock target, or the best it reached when it never does."""
    crossing = result.get("smallest_crossing")
    if crossing is None:
        best = max(
            (p for p in result.get("points", []) if ((p.get("methods") or {}).get("iau-cached") or {}).get("speedup_wall")),
            key=lambda p: p["methods"]["iau-cached"]["speedup_wall"],
            default=None,
        )
        return f"iau-cached passes {CACHED_TARGET:g}x in wall-clock at none of the measured points" + (
            ""
            if best is None
            else f" (best: {best['methods']['iau-cached']['speedup_wall']:.0f}x at "
            f"{best['clients']} x {best['rounds']} rounds x {best['examples']})"
        )
    return (
        f"smallest measured point where iau-cached passes {CACHED_TARGET:g}x: {crossing['clients']} clients, "
        f"{crossing['rounds']} rounds, {crossing['examples']} examples per client "
        f"({crossing['methods']['iau-cached']['speedup_wall']:.0f}x)"
    )


def print_report(result: dict[str, Any]) -> None:
    """One row per point, then the smallest crossing."""
    print(f"\nScaling ({result['machine']['cpu']}, {result['date']})")
    print(table(SCALING_HEADERS, report_rows(result)))
    print("  " + crossing_line(result))


def main(argv: list[str] | None = None) -> int:
    """Run every point of the grid, writing the JSON after each, then the plot and the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=None, help="comma-separated CLIENTSxROUNDSxEXAMPLES points (default: the grid in the docstring)")
    parser.add_argument("--model", default="cnn", help="model of every point (default cnn, the default scenario's)")
    parser.add_argument("--cohort-from", type=int, default=500, help="clients from which a point runs in cohort mode (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one point may run")
    parser.add_argument("--memory-cap-gb", type=float, default=None)
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods, retrain first (default {','.join(METHODS)}; leave iau out where its rounds over every client would not fit --timeout)",
    )
    add_point_arguments(parser)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/scaling.json; the plot goes beside it)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    if not args.methods or args.methods[0] != "retrain" or not set(args.methods) <= set(METHODS):
        parser.error(f"--methods {','.join(args.methods)!s}: a subset of {','.join(METHODS)} that starts with retrain (the reference)")
    grid = parse_grid(args.grid) if args.grid else default_grid()
    for _, _, examples in grid:
        data.partition_size(examples)  # refuses example counts the held-out split cannot leave exactly, before anything runs
    out = Path(args.out) if args.out else RESULTS_DIR / "scaling.json"
    result = envelope(
        "scaling",
        {**{k: v for k, v in vars(args).items() if k != "out"}, "grid": [list(p) for p in grid], "methods": list(args.methods)},
        argv,
    )
    result["points"] = []
    cap = int(args.memory_cap_gb * 1e9) if args.memory_cap_gb else None
    for index, (clients, rounds, examples) in enumerate(grid):
        dataset = data.prepare(clients, examples, seed=args.seed, root=args.data_root)
        overrides = overrides_for(clients, rounds, dataset.root, args)
        print(
            f"[{index + 1}/{len(grid)}] {clients} clients x {rounds} rounds x {examples} examples ({overrides['execution']}) ...",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="fedunlearn-bench-scaling-") as tmp:
            child = run_child(
                "experiment",
                {"preset": "default", "overrides": overrides, "out_dir": tmp, "engine": args.engine},
                args.timeout,
                cap,
                in_process=args.in_process,
            )
            path = Path(tmp) / "results.json"
            results = json.loads(path.read_text()) if path.exists() else None
        point: dict[str, Any] = {
            "clients": clients,
            "rounds": rounds,
            "examples": examples,
            "execution": overrides["execution"],
            "methods": {},
            "status": (results or {}).get("status", "failed"),
            "error": None if child.get("ok") else child.get("error"),
            "memory": child.get("memory"),
            "load_average_before": child.get("load_average_before"),
            "process_wall_s": child.get("process_wall_s"),
        }
        if results is not None:
            point["methods"] = {name: method_row(model) for name, model in results.get("models", {}).items() if name in args.methods}
            point["training_wall_s"] = (results.get("phases") or {}).get("training", {}).get("wall_s")
        unfinished = [n for n, r in point["methods"].items() if r.get("status") not in FINISHED]
        if unfinished:
            point["unfinished"] = unfinished
        result["points"].append(point)
        write_json(out, result)  # written as produced: a long grid interrupted keeps what it measured
        cached = point["methods"].get("iau-cached") or {}
        print(
            f"    retrain {format_seconds((point['methods'].get('retrain') or {}).get('wall_s'))} s, iau-cached "
            f"{format_ratio(cached.get('speedup_wall'))} in seconds, {format_bytes(cached.get('bytes'))}",
            flush=True,
        )
    crossing = smallest_crossing(result["points"])
    result["smallest_crossing"] = crossing
    result["target"] = {
        "target": f"iau-cached at least {CACHED_TARGET:g}x faster than retrain in wall seconds",
        "met_at": None if crossing is None else [crossing["clients"], crossing["rounds"], crossing["examples"]],
    }
    result["notes"] = [
        NOISE_NOTE,
        "One experiment per point (no repeats): the speedup is a ratio of two phases of the same run, "
        "measured side by side; rerun a point with --grid to check its spread.",
    ]
    if args.engine != "ray":
        result["notes"].insert(0, "engine local: in-process LocalGrid, no Ray and no grid polling: not benchmark figures.")
    write_json(out, result)
    figure = plot(result["points"], out.with_suffix(".png"))
    print_report(result)
    print(f"\nwrote {out}" + (f" and {figure}" if figure else ""))
    return 0 if all(p["status"] == "complete" and not p.get("unfinished") for p in result["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
