"""IAU-Fed ablation: every step-rule variant x seeds x presets, beside PGA and gradient ascent, judged against retraining.

    python -m benchmarks.iau_ablation                      # everything: docs/reports/iau-ablation.md (about 40 min here)
    python -m benchmarks.iau_ablation --presets smoke --seeds 0 --variants sgd-0.045,norm-3x0.01-l5   # a miniature
    python -m benchmarks.iau_ablation --report-only        # rewrite the report from benchmarks/results/iau-ablation/

docs/reports/iau-ablation.md was written in four parts (2026-12-01, 2-core AMD EPYC, about 55 min of runs):
    python -m benchmarks.iau_ablation --variants sgd-0.045,adam-1e-3,norm-0.02,norm-3x0.01-l5,norm-3x0.02-l3,cached-3x0.02-l3,calibrated,calibrated-3-l3
    python -m benchmarks.iau_ablation --variants sgd-0.045,norm-2x0.02-l3-r1,norm-2x0.03-l3-r1,norm-0.05-r2 --out benchmarks/results/iau-ablation-repair
    python -m benchmarks.iau_ablation --variants norm-2x0.04-l3-r1,norm-2x0.05-l3-r1 --out benchmarks/results/iau-ablation-deeper
    python -m benchmarks.iau_ablation --presets default --variants sgd-0.045,norm-2x0.04-l3-r1 --set gr-alpha=0.005 --tag gr0.005 \
        --out benchmarks/results/iau-ablation-gr
    python -m benchmarks.iau_ablation --presets default --variants sgd-0.045,norm-2x0.04-l3-r1 --set num-clients=20 \
        --set model=mlp --tag 20-clients-mlp --out benchmarks/results/iau-ablation-outside     # outside the presets
    python -m benchmarks.iau_ablation --report-only --also benchmarks/results/iau-ablation-repair \
        --also benchmarks/results/iau-ablation-deeper --also benchmarks/results/iau-ablation-gr \
        --also benchmarks/results/iau-ablation-outside
(the same experiments give the same numbers: retrain, pga and iau:sgd-0.045 agree to the last digit across the folders.)

Each (preset, seed) is ONE experiment, in-process (LocalGrid, no Ray: the quality metrics are the same
as on Ray, tests/test_ray_e2e.py), in which every variant is a method of its own: all of them unlearn the
same trained model, and each is measured with the same evaluation: ACC_test, ASR, the loss attack on the
clean part of the forget set, the band of retrained models (--retrain-seeds 2) and durability after 5
more FedAvg rounds (--relearn-rounds 5). The costlier attacks (shadow, LiRA) are left out to keep the
grid affordable; the README measures them per preset. One JSON per experiment goes to
benchmarks/results/iau-ablation/ as it finishes; the report is rebuilt from those files.

Targets (issue "IAU-Fed that matches retraining without hand-tuning"), per preset, means over seeds:
|ASR - ASR_retrain| <= 0.02, ACC_test >= ACC_retrain - 0.01, at most 3 rounds (fresh) / 3 messages to
client u (cached), ASR std <= 0.05, durable (ASR after the relearning rounds <= retrain's + 0.05), no worse
than PGA on ASR and ACC_test. The same settings on every preset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "iau-ablation"
REPORT = Path(__file__).resolve().parent.parent / "docs" / "reports" / "iau-ablation.md"
PRESETS = ("default", "dirichlet-0.1", "smoke", "sample-level", "stream", "memorization")
BASELINES = ("pga", "gradient-ascent")


@dataclass(frozen=True)
class Variant:
    """One IAU configuration: the settings it changes and the protocol."""

    name: str
    settings: dict[str, Any]
    protocol: str = "fresh"
    summary: str = ""
    repair_rounds: int = 0


# What a variant does not set (fixed here, not the current defaults, so a variant means the same thing when they change).
VARIANT_BASE: dict[str, Any] = {"eta": 0.045, "steps": 1, "step_rule": "sgd", "radius": 0.02, "correction_weight": 1.0, "calibrate": "off"}
VARIANTS = (
    Variant("sgd-0.045", {"step_rule": "sgd", "eta": 0.045}, summary="the previous default: one sgd step, eta 0.045"),
    Variant("adam-1e-3", {"step_rule": "adam-first-step", "eta": 1e-3}, summary="the IAU reference code's rule: one step of a fresh Adam"),
    Variant("norm-0.02", {"step_rule": "normalised", "radius": 0.02}, summary="one normalised step of 2% of ||theta||"),
    Variant(
        "norm-3x0.01-l5",
        {"step_rule": "normalised", "radius": 0.01, "steps": 3, "correction_weight": 5.0},
        summary="three fresh normalised steps of 1%, lambda 5",
    ),
    Variant(
        "norm-3x0.02-l3",
        {"step_rule": "normalised", "radius": 0.02, "steps": 3, "correction_weight": 3.0},
        summary="three fresh normalised steps of 2%, lambda 3",
    ),
    Variant(
        "cached-3x0.02-l3",
        {"step_rule": "normalised", "radius": 0.02, "steps": 3, "correction_weight": 3.0},
        protocol="cached",
        summary="the same, cached protocol: client u's G_S at each model, g_r from the aggregate cache (stale)",
    ),
    Variant(
        "calibrated",
        {"step_rule": "normalised", "calibrate": "heldout-loss"},
        summary="one normalised step whose length client u chooses (forget-set loss up to its held-out loss)",
    ),
    Variant(
        "calibrated-3-l3",
        {"step_rule": "normalised", "calibrate": "heldout-loss", "steps": 2, "correction_weight": 3.0},
        summary="two normalised steps of the length client u chooses, lambda 3 (3 rounds with the length query)",
    ),
    Variant(
        "norm-2x0.02-l3-r1",
        {"step_rule": "normalised", "radius": 0.02, "steps": 2, "correction_weight": 3.0},
        repair_rounds=1,
        summary="two fresh normalised steps of 2%, lambda 3, then one FedAvg round among the remaining clients",
    ),
    Variant(
        "norm-2x0.03-l3-r1",
        {"step_rule": "normalised", "radius": 0.03, "steps": 2, "correction_weight": 3.0},
        repair_rounds=1,
        summary="two fresh normalised steps of 3%, lambda 3, then one FedAvg repair round",
    ),
    Variant(
        "norm-2x0.04-l3-r1",
        {"step_rule": "normalised", "radius": 0.04, "steps": 2, "correction_weight": 3.0},
        repair_rounds=1,
        summary="two fresh normalised steps of 4%, lambda 3, then one FedAvg repair round (the default of `iau` since this ablation)",
    ),
    Variant(
        "norm-2x0.05-l3-r1",
        {"step_rule": "normalised", "radius": 0.05, "steps": 2, "correction_weight": 3.0},
        repair_rounds=1,
        summary="two fresh normalised steps of 5%, lambda 3, then one FedAvg repair round",
    ),
    Variant(
        "norm-0.05-r2",
        {"step_rule": "normalised", "radius": 0.05},
        repair_rounds=2,
        summary="one deep normalised step of 5%, then two FedAvg repair rounds (PGA's budget: 1 + 2 rounds)",
    ),
)


def variant_method(variant: Variant) -> str:
    """Register `variant` as a method named iau:<name> (once) and return that name."""
    from simulations.methods import REGISTRY, MethodContext, MethodOutcome, register
    from strategies import app_config
    from strategies.methods.iau import run_iau

    name = f"iau:{variant.name}"
    if name not in REGISTRY:

        def run(ctx: MethodContext) -> MethodOutcome:
            base = app_config.iau_settings_for(ctx.cfg)
            ctx.strategy.iau = replace(base, **{**VARIANT_BASE, **variant.settings})
            return run_iau(ctx, variant.protocol, name, repair_rounds=variant.repair_rounds)

        register(name, variant.summary, uploads_caches=variant.protocol == "cached")(run)
    return name


def experiment_config(preset: str, seed: int, variants: list[Variant], quick: bool, extra: dict[str, str] | None = None) -> Any:
    """The experiment of one (preset, seed): retrain, the baselines, every variant; band, durability, the loss attack."""
    from fedunlearn.config import build_config

    methods = ["retrain", *BASELINES, *(variant_method(v) for v in variants)]
    overrides: dict[str, Any] = {
        "seed": seed,
        "methods": ",".join(methods),
        "mia_attacks": "loss",
        "retrain_seeds": 0 if quick else 2,
        "relearn_rounds": 2 if quick else 5,
        "relearn_steps": 0,
    }
    if quick:
        overrides.update({"rounds": 3, "model": "mlp"})
    return build_config(preset, overrides={**overrides, **(extra or {})})


def run_one(
    preset: str, seed: int, variants: list[Variant], quick: bool, out: Path, extra: dict[str, str] | None = None, tag: str = ""
) -> dict[str, Any]:
    """One in-process experiment; its results.json is kept under `out`."""
    import torch

    from simulations.runner import Experiment
    from strategies import app_config
    from strategies.client_app import build_client_app
    from strategies.local_grid import LocalGrid

    torch.set_num_threads(1)
    cfg = experiment_config(preset, seed, variants, quick, extra)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as caches:
        experiment = Experiment(cfg, out_dir=None, show_progress=False)
        experiment.drive(LocalGrid(build_client_app(app_config.client_spec_for(cfg, caches)), cfg.num_clients))
    results = experiment.results
    label = f"{preset}+{tag}" if tag else preset
    results["ablation"] = {"preset": label, "seed": seed, "wall_s": time.perf_counter() - started, "quick": quick, "set": extra or {}}
    out.mkdir(parents=True, exist_ok=True)
    from simulations.results import finite_or_none

    (out / f"{label}-seed{seed}.json").write_text(json.dumps(finite_or_none(results), indent=1) + "\n")
    return results


# ----- the report ----------------------------------------------------------------------------------------------------


def _row(model: dict[str, Any], retrain: dict[str, Any]) -> dict[str, float | None]:
    """The figures the report compares for one model of one run."""
    cost = model.get("cost") or {}
    unlearning = model.get("unlearning") if isinstance(model.get("unlearning"), dict) else {}
    row = {
        "acc": model.get("acc_test"),
        "asr": model.get("backdoor_asr"),
        "mia": model.get("mia_auc"),
        "dist_del": model.get("dist_output_deleted"),
        "seconds": cost.get("wall_s"),
        "rounds": cost.get("rounds"),
        "bytes": (cost.get("bytes_down", 0) + cost.get("bytes_up", 0)) if cost else None,
        "durable_asr": (model.get("durability") or {}).get("backdoor_asr"),
        "durable_acc": (model.get("durability") or {}).get("acc_test"),
        "acc_deleted": model.get("acc_deleted"),
    }
    band = model.get("vs_retrain_band") or {}
    row["in_band_asr"] = float(band["backdoor_asr"]["inside"]) if "backdoor_asr" in band else None
    row["in_band_acc"] = float(band["acc_test"]["inside"]) if "acc_test" in band else None
    row["clients_asked"] = len(unlearning.get("clients_asked", [])) if unlearning else None
    for key in ("asr", "acc", "durable_asr", "mia", "acc_deleted"):
        ref = {"asr": "backdoor_asr", "acc": "acc_test", "mia": "mia_auc", "acc_deleted": "acc_deleted"}.get(key)
        value = row[key]
        reference = retrain.get(ref) if ref else (retrain.get("durability") or {}).get("backdoor_asr")
        row[f"{key}_gap"] = (value - reference) if isinstance(value, (int, float)) and isinstance(reference, (int, float)) else None
    return {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None) for k, v in row.items()}


def _stats(values: list[float | None]) -> tuple[float, float, int] | None:
    having = [v for v in values if v is not None]
    if not having:
        return None
    return float(np.mean(having)), float(np.std(having, ddof=1)) if len(having) > 1 else 0.0, len(having)


def _cell(stats: tuple[float, float, int] | None, digits: int = 3) -> str:
    if stats is None:
        return "-"
    mean, std, n = stats
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def collect(out: Path, also: tuple[Path, ...] = ()) -> dict[str, dict[str, list[dict[str, float | None]]]]:
    """{preset: {model: [row per seed]}} from the saved experiments (several folders: a model is taken from the first
    folder that holds it for that preset and seed)."""
    table: dict[str, dict[str, list[dict[str, float | None]]]] = {}
    merged: dict[str, dict[str, Any]] = {}
    for folder in (out, *also):
        for path in sorted(folder.glob("*-seed*.json")):
            results = json.loads(path.read_text())
            if path.name in merged:
                for name, model in results["models"].items():
                    merged[path.name]["models"].setdefault(name, model)
            else:
                merged[path.name] = results
    for _, results in sorted(merged.items()):
        preset = results["ablation"]["preset"]
        retrain = results["models"]["retrain"]
        for name, model in results["models"].items():
            if name == "original":
                continue
            row = _row(model, retrain)
            row["requests"] = float(len(results.get("requests", [results.get("request")])))
            table.setdefault(preset, {}).setdefault(name, []).append(row)
    return table


def verdicts(rows: list[dict[str, float | None]], pga: list[dict[str, float | None]], protocol_limit: int) -> dict[str, bool | None]:
    """Which targets a model meets on one preset (means over the seeds)."""

    def mean(key: str, source: list[dict[str, float | None]] = rows) -> float | None:
        s = _stats([r.get(key) for r in source])
        return None if s is None else s[0]

    asr_gap, acc_gap, durable, rounds = mean("asr_gap"), mean("acc_gap"), mean("durable_asr_gap"), mean("rounds")
    asr_std = _stats([r.get("asr") for r in rows])
    out: dict[str, bool | None] = {
        "asr": None if asr_gap is None else abs(asr_gap) <= 0.02,
        "acc": None if acc_gap is None else acc_gap >= -0.01,
        "rounds": None if rounds is None else rounds <= protocol_limit,
        "asr_std": None if asr_std is None else asr_std[1] <= 0.05,
        "durable": None if durable is None else durable <= 0.05,
    }
    if pga and mean("asr") is not None and mean("asr", pga) is not None:
        out["vs_pga"] = bool(mean("asr") <= mean("asr", pga) + 1e-9 and mean("acc") >= mean("acc", pga) - 1e-9)  # type: ignore[operator]
    return out


def _shown(path: Path) -> str:
    """A folder relative to the repository when it is inside it."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def write_report(out: Path, report: Path, machine: str, also: tuple[Path, ...] = ()) -> str:
    """docs/reports/iau-ablation.md from the saved experiments."""
    table = collect(out, also)
    lines = [
        "# IAU-Fed ablation",
        "",
        "Written by `python -m benchmarks.iau_ablation` (see its docstring) from the experiments in "
        + ", ".join(f"`{_shown(p)}`" for p in (out, *also))
        + ". Each (preset, seed) is one in-process experiment in which every variant "
        "unlearns the same trained model; mean ± sample std over the seeds. " + machine,
        "",
        "Columns: ACC = ACC_test, ASR = backdoor success, gaps are method - retrain, `in band` counts the seeds where "
        "the value lies inside the band of 3 retrained models (the reference + 2 other seeds), `durable ASR` is the "
        "ASR after 5 more FedAvg rounds on the remaining clients (retrain continued the same way beside it), MIA "
        "the loss attack on the clean part of the forget set (its gap to retrain), rounds and MB the unlearning's "
        "own cost (a stream: the whole stream).",
        "",
        "## Variants",
        "",
    ]
    for v in VARIANTS:
        repair = f", then {v.repair_rounds} FedAvg repair round(s)" if v.repair_rounds else ""
        lines.append(f"- `iau:{v.name}` ({v.protocol}{repair}): {v.summary}; settings {json.dumps(v.settings)}")
    lines.append("")
    scoreboard: dict[str, dict[str, list[bool | None]]] = {}
    for preset in [*PRESETS, *sorted(p for p in table if p not in PRESETS)]:
        if preset not in table:
            continue
        models = table[preset]
        n = max(len(r) for r in models.values())
        lines += [
            f"## {preset} ({n} seed{'s' if n > 1 else ''})",
            "",
            "| model | ACC | ACC gap | ASR | ASR gap | in band ASR / ACC | durable ASR (gap) | MIA gap | rounds | MB | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, rows in models.items():
            band = [_stats([r.get(k) for r in rows]) for k in ("in_band_asr", "in_band_acc")]
            band_text = " / ".join("-" if b is None else f"{round(b[0] * b[2])}/{b[2]}" for b in band)
            mb = _stats([None if (nbytes := r.get("bytes")) is None else nbytes / 2**20 for r in rows])
            durable = f"{_cell(_stats([r.get('durable_asr') for r in rows]))} ({_cell(_stats([r.get('durable_asr_gap') for r in rows]))})"
            lines.append(
                f"| {name} | {_cell(_stats([r.get('acc') for r in rows]))} | {_cell(_stats([r.get('acc_gap') for r in rows]))} | "
                f"{_cell(_stats([r.get('asr') for r in rows]))} | {_cell(_stats([r.get('asr_gap') for r in rows]))} | {band_text} | "
                f"{durable} | {_cell(_stats([r.get('mia_gap') for r in rows]))} | {_cell(_stats([r.get('rounds') for r in rows]), 1)} | "
                f"{_cell(mb, 2)} | {_cell(_stats([r.get('seconds') for r in rows]), 2)} |"
            )
            if name.startswith("iau:") or name in BASELINES:
                limit = 3 * int(rows[0].get("requests") or 1)  # 3 rounds (or messages to client u) per request
                for target, met in verdicts(rows, models.get("pga", []), limit).items():
                    scoreboard.setdefault(name, {}).setdefault(target, []).append(met)
        lines.append("")
    lines += [
        "## Targets met, per preset",
        "",
        "Each cell counts the presets where the model meets the target (means over seeds): |ASR gap| <= 0.02; ACC gap "
        ">= -0.01; rounds <= 3 per request; ASR std <= 0.05; durable ASR gap <= 0.05; ASR and ACC no worse than PGA's. "
        "Where a preset has no backdoor (memorization) the ASR targets do not apply.",
        "",
        "| model | ASR | ACC | rounds | ASR std | durable | vs PGA |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, targets in scoreboard.items():
        cells = []
        for target in ("asr", "acc", "rounds", "asr_std", "durable", "vs_pga"):
            values = [v for v in targets.get(target, []) if v is not None]
            cells.append(f"{sum(values)}/{len(values)}" if values else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the grid (or a part of it) and write the report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.iau_ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="all", help="comma-separated variant names, or all")
    parser.add_argument("--out", default=str(RESULTS), help="where the per-experiment JSON go")
    parser.add_argument("--report", default=str(REPORT))
    parser.add_argument("--quick", action="store_true", help="3 rounds, an MLP, no band: a check that it all runs")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every experiment (e.g. gr-alpha=0.005)"
    )
    parser.add_argument("--also", action="append", default=[], metavar="DIR", help="more experiment folders for the report")
    parser.add_argument("--tag", default="", help="label of these experiments in the report (preset+TAG), with --set")
    args = parser.parse_args(argv)
    names = [v.name for v in VARIANTS]
    chosen = VARIANTS if args.variants == "all" else tuple(v for v in VARIANTS if v.name in args.variants.split(","))
    unknown = [n for n in args.variants.split(",") if args.variants != "all" and n not in names]
    presets = args.presets.split(",")
    bad = [p for p in presets if p not in PRESETS]
    if unknown or bad:
        print(
            f"error: unknown variants {unknown} or presets {bad}; variants: {', '.join(names)}; presets: {', '.join(PRESETS)}",
            file=sys.stderr,
        )
        return 2
    extra = dict(item.split("=", 1) for item in args.set)
    if extra and not args.tag:
        print("error: --set needs --tag (the label these experiments get in the report)", file=sys.stderr)
        return 2
    out = Path(args.out)
    import os
    import platform

    machine = f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU, in-process (LocalGrid)."
    if not args.report_only:
        for preset in presets:
            for seed in (int(s) for s in args.seeds.split(",")):
                started = time.perf_counter()
                run_one(preset, seed, list(chosen), args.quick, out, extra, args.tag)
                print(f"{preset} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    print(write_report(out, Path(args.report), machine, tuple(Path(p) for p in args.also)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
