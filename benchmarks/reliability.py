"""Reliability under injected faults, in-process (LocalGrid): what was injected, what the run survived, what it rejected.

python -m benchmarks.reliability                 # the table run (default scenario + faults) and the norm-bound effect
python -m benchmarks.reliability --preset smoke  # a faster, smaller scenario
python -m benchmarks.reliability --preset smoke --set model=mlp --set train-limit=300 --set local-epochs=1 \
    --out /tmp/reliability.json                  # a miniature

Part 1 runs a whole experiment (Experiment.drive) with every fault kind injected and counts, per
kind, the faults injected (the wrapper's own log, tagged with the phase it hit), the faults
survived (the round or method went on to a correct, recorded outcome), the replies rejected by
validation, and the results lost (methods missing from results.json; must be 0). Part 2 trains
once and measures what one client sending a gradient of norm 1e6 does to the model, without a
bound, clipped, and rejected. Writes benchmarks/results/reliability.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedunlearn.config import build_config
from fedunlearn.data import DatasetStore
from fedunlearn.deletion import forget_indices
from fedunlearn.gradients import ParamLayout
from fedunlearn.metrics import accuracy, attack_success_rate
from fedunlearn.models import build_model
from simulations.runner import Experiment
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.faults import FaultPlan, FaultyClientApp
from strategies.fedavg import discover_clients
from strategies.iau_fed import IAUFed, RoundPolicy, arrays_to_vector
from strategies.local_grid import LocalGrid

from .common import RESULTS_DIR, envelope, write_json
from .unlearning import parse_set

RESULTS = RESULTS_DIR / "reliability.json"
SURVIVABLE = ("complete", "renormalised", "fallback")
FAULTS = {
    "shadow_mia": False,
    "dropout_prob": 0.1,
    "crash_client": 2,
    "crash_round": 3,
    "slow_clients": "4",
    "slow_seconds": 0.05,
    "withdrawing_offline": True,
    "malicious_client": 3,
    "malicious_norm": 1e6,
    "unlearn_retries": 2,
    "unlearn_policy": "renormalise",
    "gradient_norm_bound": 5.0,
    "gradient_norm_action": "reject",
}


def fault_table(preset: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one experiment with every fault kind and count injected / survived / rejected / lost per kind (`extra`: more settings)."""
    cfg = build_config(preset, overrides={**FAULTS, **(extra or {})})
    out = Path(tempfile.mkdtemp(prefix="reliability-"))
    app = FaultyClientApp(build_client_app(app_config.client_spec_for(cfg, str(out / "caches"))), app_config.fault_plan_for(cfg))
    experiment = Experiment(cfg, out_dir=out / "results", show_progress=False)
    note = app._note

    def tagged(kind: str, partition: int, message: Any, **extra: Any) -> str:
        reason = note(kind, partition, message, **extra)
        app.log[-1]["phase"] = experiment.meter.current  # which phase of the run the fault hit
        return reason

    app._note = tagged  # type: ignore[method-assign]
    started = time.perf_counter()
    experiment.drive(LocalGrid(app, cfg.num_clients, capture_errors=True))
    wall = time.perf_counter() - started
    results = json.loads((out / "results" / "results.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    models = results["models"]
    reliability = results["reliability"]
    complete = results["status"] == "complete"
    finite = all(all(not isinstance(v, float) or math.isfinite(v) for v in m.values()) for m in models.values())

    def survived(entry: dict[str, Any]) -> bool:
        phase = entry["phase"]
        method = phase.split(":", 1)[1] if phase.startswith("unlearn:") else None
        if entry["fault"] == "malicious":
            report = models[method].get("unlearning", {})
            return entry["partition"] in report.get("clipped_clients", []) or any(
                r["partition"] == entry["partition"] for r in report.get("rejected", [])
            )
        if method is not None and method != "retrain":
            return models[method]["status"] in SURVIVABLE
        return complete  # a training or caching round that went on without the client (or after re-asking it)

    kinds: dict[str, dict[str, int]] = {}
    for entry in app.log:
        phase = entry["phase"]
        where = (
            "training"
            if phase in ("training", "original-continuation") or phase.startswith(("continue:", "unlearn:retrain"))
            else ("caching" if phase == "caching" else "unlearning")
        )
        label = f"{entry['fault']} ({where})" if entry["fault"] in ("dropout", "slow") else entry["fault"]
        row = kinds.setdefault(label, {"injected": 0, "survived": 0, "rejected": 0})
        row["injected"] += 1
        row["survived"] += int(survived(entry) and finite)
    for rejected in reliability["rejected"]:
        label = "malicious" if "exceeds the bound" in rejected["reason"] else "other"
        kinds.setdefault(label, {"injected": 0, "survived": 0, "rejected": 0})["rejected"] += 1
    return {
        "config": {
            k: v
            for k, v in results["config"].items()
            if k
            in (
                "num-clients",
                "rounds",
                "dropout-prob",
                "crash-client",
                "crash-round",
                "slow-clients",
                "slow-seconds",
                "withdrawing-offline",
                "malicious-client",
                "malicious-norm",
                "unlearn-retries",
                "unlearn-policy",
                "gradient-norm-bound",
                "gradient-norm-action",
                "methods",
            )
        },
        "status": results["status"],
        "wall_s": wall,
        "rows": kinds,
        "results_lost": reliability["results_lost"],
        "failed_replies": reliability["failed_replies"],
        "failed_by_phase": reliability["failed_by_phase"],
        "rejected_replies": reliability["rejected_replies"],
        "methods": {
            name: {
                "status": m.get("status"),
                "acc_test": m.get("acc_test"),
                "backdoor_asr": m.get("backdoor_asr"),
                "missing_clients": m.get("unlearning", {}).get("missing_clients"),
                "fallback": m.get("unlearning", {}).get("fallback"),
            }
            for name, m in models.items()
        },
    }


def norm_bound_effect(preset: str, bound: float = 5.0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train once; then one IAU correction with client 3 sending a gradient of norm 1e6: no bound, clipped, rejected.

    With one sgd step, where a gradient's size becomes the step's size (the worst case; the normalised default rule
    bounds the step's length, but a huge gradient still takes over its direction).
    """
    cfg = build_config(
        preset, overrides={"shadow_mia": False, "iau_step_rule": "sgd", "iau_steps": 1, "iau_correction_weight": 1.0, **(extra or {})}
    )
    cache = tempfile.mkdtemp(prefix="reliability-norm-")
    app = FaultyClientApp(build_client_app(app_config.client_spec_for(cfg, cache)), FaultPlan())
    grid = LocalGrid(app, cfg.num_clients, capture_errors=True)
    directory = discover_clients(grid, cfg.num_clients)
    data = DatasetStore.get(app_config.data_spec_for(cfg))
    torch.manual_seed(cfg.seed)
    model = build_model(app_config.model_name_for(cfg), data.input_shape, data.num_classes)
    layout = ParamLayout.of(model)
    strategy = IAUFed(
        layout=layout, iau=app_config.iau_settings_for(cfg), directory=directory, train=app_config.train_settings_for(cfg), seed=cfg.seed
    )
    initial = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items()))
    trained = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds).arrays
    strategy.fill_caches(grid, trained)
    request = app_config.deletion_request_for(cfg)
    count = len(forget_indices(data, request))
    theta = arrays_to_vector(trained, layout)
    triggered = data.triggered_test()[0]

    def measure(label: str, plan: FaultPlan, policy: RoundPolicy) -> dict[str, Any]:
        app.plan = plan
        branch = strategy.branch()
        branch.policy = policy
        arrays, report = branch.unlearn(grid, trained, request, count)
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        return {
            "variant": label,
            "param_change": float((arrays_to_vector(arrays, layout) - theta).norm()),
            "acc_test": accuracy(model, data.x_test, data.y_test),
            "backdoor_asr": attack_success_rate(model, triggered, cfg.backdoor_target),
            "status": report.status,
            "clipped": report.clipped_clients,
            "rejected": len(report.rejected),
            "missing": report.missing_clients,
            "direction_norm": report.direction_norm,
        }

    model.load_state_dict(trained.to_torch_state_dict())
    model.eval()
    before = {
        "acc_test": accuracy(model, data.x_test, data.y_test),
        "backdoor_asr": attack_success_rate(model, triggered, cfg.backdoor_target),
    }
    malicious = FaultPlan(malicious_client=3, malicious_norm=1e6)
    rows = [
        measure("honest (no malicious client)", FaultPlan(), RoundPolicy()),
        measure("client 3 sends norm 1e6, no bound", malicious, RoundPolicy()),
        measure(f"client 3 sends norm 1e6, clip at {bound:g}", malicious, RoundPolicy(norm_bound=bound)),
        measure(
            f"client 3 sends norm 1e6, reject over {bound:g} (+renormalise)",
            malicious,
            RoundPolicy(retries=0, on_missing="renormalise", norm_bound=bound, norm_action="reject"),
        ),
    ]
    shutil.rmtree(cache, ignore_errors=True)
    return {"preset": preset, "eta": cfg.iau_eta, "step_rule": cfg.iau_step_rule, "before": before, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Run both parts, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting of simulations.run for both parts (e.g. --set model=mlp for a miniature)",
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    extra = parse_set(args.set)
    result = envelope("reliability", {"preset": args.preset, "set": extra, "faults": FAULTS}, argv)
    table = fault_table(args.preset, extra)
    norm = norm_bound_effect(args.preset, extra=extra)
    print(
        f"\nfault run ({args.preset}, in-process): status {table['status']}, {table['wall_s']:.1f} s, results lost {table['results_lost']}"
    )
    print("| fault | injected | survived | replies rejected | results lost |\n|---|---|---|---|---|")
    for label, row in table["rows"].items():
        print(f"| {label} | {row['injected']} | {row['survived']} | {row['rejected']} | {table['results_lost']} |")
    print(json.dumps(table["methods"], indent=1))
    print(
        f"\nnorm bound ({args.preset}; before unlearning: acc {norm['before']['acc_test']:.3f}, ASR {norm['before']['backdoor_asr']:.3f})"
    )
    print("| variant | ||theta_new - theta|| | ACC test | ASR | clipped | rejected | status |\n|---|---|---|---|---|---|---|")
    for row in norm["rows"]:
        print(
            f"| {row['variant']} | {row['param_change']:.4g} | {row['acc_test']:.3f} | {row['backdoor_asr']:.3f} | {row['clipped']} | "
            f"{row['rejected']} | {row['status']} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {**result, "fault_table": table, "norm_bound": norm})
    print(f"\nwrote {out}")
    return 0 if table["status"] == "complete" and not table["results_lost"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
