"""Across seeds: mean and standard deviation per metric and method, rankings, DIR/report.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .results import METRIC_KEYS, finite_or_none

COST_COLUMNS = ("wall_s", "rounds", "bytes")
EXTRA_METRICS = ("mia_shadow_auc", "mia_lira_auc", "mia_ulira_auc", "dist_output_deleted", "dist_output_triggered")
# (column, label, lower is better) used to rank methods against retraining.
RANKINGS = (
    ("asr_gap", "ASR gap to retrain", True),
    ("acc_test", "ACC test", False),
    ("dist_output_deleted", "DIST output on the deleted set", True),
    ("dist_output_triggered", "DIST output on triggered inputs", True),
    ("mia_gap", "MIA AUC gap to retrain", True),
    ("durable_asr_gap", "ASR gap to retrain after the relearning rounds", True),
    ("wall_s", "seconds", True),
    ("rounds", "rounds", True),
    ("bytes", "bytes", True),
)
# Two methods tie when their means agree at the precision the report prints (3 decimals; seconds 2; counts 0).
TIE_DIGITS = {"wall_s": 2, "rounds": 0, "bytes": 0}
CELL_DIGITS = {"wall_s": 2, "rounds": 0, "relearn_steps": 1}


def _model_values(results: dict[str, Any], name: str) -> dict[str, float]:
    model = results["models"][name]
    retrain = results["models"].get("retrain", {})
    values: dict[str, float] = {}
    for key in (*METRIC_KEYS, *EXTRA_METRICS):
        if isinstance(model.get(key), (int, float)) and np.isfinite(model[key]):  # NaN (no backdoor: no ASR) shows as "-"
            values[key] = float(model[key])
    cost = model.get("cost")
    if cost:
        values["wall_s"] = float(cost["wall_s"])
        values["rounds"] = float(cost["rounds"])
        values["bytes"] = float(cost["bytes_down"] + cost["bytes_up"])
    for key, gap in (("backdoor_asr", "asr_gap"), ("mia_auc", "mia_gap")):
        if isinstance(model.get(key), (int, float)) and isinstance(retrain.get(key), (int, float)):
            values[gap] = abs(float(model[key]) - float(retrain[key]))
    for attack in ("lira", "ulira"):
        tpr = (model.get("mia") or {}).get(attack, {}).get("tpr_at_1pct_fpr")
        if isinstance(tpr, (int, float)):
            values[f"mia_{attack}_tpr_1pct"] = float(tpr)
    durability, retrain_durability = model.get("durability") or {}, retrain.get("durability") or {}
    for key in ("acc_test", "backdoor_asr", "mia_auc"):
        if isinstance(durability.get(key), (int, float)):
            values[f"durable_{key}"] = float(durability[key])
    if isinstance(durability.get("backdoor_asr"), (int, float)) and isinstance(retrain_durability.get("backdoor_asr"), (int, float)):
        values["durable_asr_gap"] = abs(float(durability["backdoor_asr"]) - float(retrain_durability["backdoor_asr"]))
    probe = model.get("relearn_probe") or {}
    if "steps" in probe:  # not reached within the budget counts as the budget (a lower bound)
        values["relearn_steps"] = float(probe["steps"] if probe["steps"] is not None else probe["max_steps"])
    for key, versus in (model.get("vs_retrain_band") or {}).items():
        values[f"in_band_{key}"] = 1.0 if versus.get("inside") else 0.0
    storage = model.get("storage")
    if isinstance(storage, dict):
        for key, value in storage.items():
            if isinstance(value, (int, float)):
                values[f"storage_{key}"] = float(value)
    return values


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {quantity: {"mean", "std", "n"}}} over the runs (std is the sample std; 0 for one run)."""
    names: list[str] = []
    for run in runs:
        names.extend(n for n in run["models"] if n not in names)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        samples: dict[str, list[float]] = {}
        for run in runs:
            if name in run["models"]:
                for key, value in _model_values(run, name).items():
                    samples.setdefault(key, []).append(value)
        out[name] = {
            key: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}
            for key, v in samples.items()
        }
    return out


def stream_aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a stream of withdrawals: per request, the request and `aggregate` of the models after it (empty otherwise)."""
    steps = min((len(r.get("stream", [])) for r in runs), default=0)
    return [
        {"request": runs[0]["stream"][j]["request"], "models": aggregate([{**run, "models": run["stream"][j]["models"]} for run in runs])}
        for j in range(steps)
    ]


STREAM_COLUMNS = (
    ("acc_test", "ACC test"),
    ("acc_deleted", "ACC del"),
    ("backdoor_asr", "ASR"),
    ("mia_auc", "MIA loss"),
    ("mia_shadow_auc", "MIA shadow"),
    ("dist_output", "DIST out"),
    ("wall_s", "seconds"),
    ("rounds", "rounds"),
)


def stream_markdown(stream: list[dict[str, Any]]) -> list[str]:
    """Report lines: one table per request of the stream (metrics after serving it, cost of serving it)."""
    if not stream:
        return []
    lines = [
        "",
        "## After each request of the stream",
        "",
        "Each method serves request j from its own model after request j-1; the deleted data is the union of "
        "requests 1..j; retrain is retrained from scratch without it. The table above holds the final models "
        "with the cost of the whole stream.",
        "",
    ]
    for j, step in enumerate(stream, 1):
        request = step["request"]
        lines += [
            f"### Request {j}: client {request['client']} forgets `{request['samples']}`",
            "",
            "| model | " + " | ".join(label for _, label in STREAM_COLUMNS) + " |",
            "|" + "---|" * (len(STREAM_COLUMNS) + 1),
        ]
        for name, stats in step["models"].items():
            row = [_cell(stats.get(key), CELL_DIGITS.get(key, 3)) for key, _ in STREAM_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def rankings(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, list[list[str]]]:
    """For each ranking criterion, the unlearning methods (not original/retrain) best first, in groups of equals."""
    methods = [n for n in summary if n not in ("original", "retrain")]
    ranked: dict[str, list[list[str]]] = {}
    for key, _, lower in RANKINGS:
        digits = TIE_DIGITS.get(key, 3)
        shown = {m: round(summary[m][key]["mean"], digits) for m in methods if key in summary[m]}
        groups: list[list[str]] = []
        for m in sorted(shown, key=lambda m: shown[m] * (1 if lower else -1)):
            if groups and shown[groups[-1][0]] == shown[m]:
                groups[-1].append(m)
            else:
                groups.append([m])
        ranked[key] = groups
    return ranked


def _ranking_text(groups: list[list[str]]) -> str:
    return " > ".join(" = ".join(group) for group in groups)


def _cell(stats: dict[str, float] | None, digits: int = 3) -> str:
    if stats is None:
        return "-"
    if stats["n"] > 1:
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}"


def _bytes_cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['mean'] / 2**20:.2f} MB"


REPORT_COLUMNS = (
    ("acc_test", "ACC test"),
    ("acc_remained", "ACC rem"),
    ("acc_deleted", "ACC del"),
    ("backdoor_asr", "ASR"),
    ("asr_gap", "ASR gap"),
    ("mia_auc", "MIA loss"),
    ("mia_shadow_auc", "MIA shadow"),
    ("mia_lira_auc", "MIA LiRA"),
    ("mia_lira_tpr_1pct", "LiRA TPR@1%"),
    ("mia_ulira_auc", "U-LiRA"),
    ("dist_output_deleted", "DIST del"),
    ("dist_output_triggered", "DIST trig"),
    ("dist_output", "DIST test"),
    ("dist_para", "DIST para"),
    ("durable_backdoor_asr", "ASR after relearn"),
    ("durable_acc_test", "ACC after relearn"),
    ("relearn_steps", "relearn steps"),
    ("wall_s", "seconds"),
    ("rounds", "rounds"),
)
BAND_COLUMNS = (
    ("acc_test", "ACC test"),
    ("backdoor_asr", "ASR"),
    ("mia_auc", "MIA loss"),
    ("mia_lira_auc", "MIA LiRA"),
    ("dist_output_deleted", "DIST del"),
    ("dist_output_triggered", "DIST trig"),
    ("dist_para", "DIST para"),
)


def chance_bound(members: int, non_members: int) -> float:
    """AUC two standard errors above 0.5 for these set sizes (Hanley and McNeil 1982 at AUC 0.5): below it, chance."""
    if members < 1 or non_members < 1:
        return float("nan")
    return 0.5 + 2.0 * float(np.sqrt((members + non_members + 1) / (12.0 * members * non_members)))


def attack_notes(runs: list[dict[str, Any]]) -> list[str]:
    """Per run and attack: does the attack beat chance on the ORIGINAL model? Where it does not, its numbers measure nothing."""
    lines = []
    for run in runs:
        seed = run["config"]["seed"]
        for attack, entry in ((run["models"].get("original") or {}).get("mia") or {}).items():
            scored = entry.get("scored") or {}
            auc = entry.get("auc")
            if attack == "ulira" or not isinstance(auc, (int, float)):
                if entry.get("skipped"):
                    lines.append(f"- Seed {seed}, {attack} attack: not scored ({entry['skipped']}).")
                continue
            bound = chance_bound(int(scored.get("members", 0)), int(scored.get("non_members", 0)))
            verdict = "beats chance" if auc > bound else "does NOT beat chance: its numbers measure nothing in this scenario"
            lines.append(
                f"- Seed {seed}, {attack} attack on the original model: AUC {auc:.3f} "
                f"({scored.get('members')} members vs {scored.get('non_members')} non-members; chance up to {bound:.3f}): {verdict}."
            )
    return lines


def band_markdown(runs: list[dict[str, Any]], summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The band of retrained models (mean ± std [min, max] per metric, averaged over seeds) and which methods lie inside it."""
    bands = [r["retrain_band"] for r in runs if r.get("retrain_band")]
    if not bands:
        return []
    keys = [(k, label) for k, label in BAND_COLUMNS if any(k in b for b in bands)]
    n = bands[0].get("acc_test", {}).get("n", "?")
    lines = [
        "",
        "## The band of retrained models",
        "",
        f"{n} retrainings per seed (the reference and --retrain-seeds more, other initial weights, shuffles and sampling; "
        "distances are between the extra retrains and the reference). A method is inside the band on a metric when its "
        "value lies in the band's [min, max]; with several seeds the cell counts the seeds where it does.",
        "",
        "| | " + " | ".join(label for _, label in keys) + " |",
        "|" + "---|" * (len(keys) + 1),
    ]

    def band_cell(key: str) -> str:
        having = [b[key] for b in bands if key in b]
        mean = float(np.mean([b["mean"] for b in having]))
        std = float(np.mean([b["std"] for b in having]))
        return f"{mean:.3f} ± {std:.3f} [{min(b['min'] for b in having):.3f}, {max(b['max'] for b in having):.3f}]"

    lines.append("| retrain band | " + " | ".join(band_cell(k) for k, _ in keys) + " |")
    for name, stats in summary.items():
        if name == "retrain":
            continue
        cells = []
        for key, _ in keys:
            inside = stats.get(f"in_band_{key}")
            if inside is None:
                cells.append("-")
            elif inside["n"] == 1:
                cells.append("inside" if inside["mean"] == 1.0 else "outside")
            else:
                cells.append(f"inside {round(inside['mean'] * inside['n'])}/{inside['n']}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown_report(runs: list[dict[str, Any]], summary: dict[str, dict[str, dict[str, float]]], title: str) -> str:
    """The report: settings, a table with methods as rows (retrain the reference row), rankings, notes."""
    cfg = runs[0]["config"]
    seeds = [r["config"]["seed"] for r in runs]
    machine = runs[0].get("machine", {})
    lines = [
        f"# {title}",
        "",
        f"{cfg['dataset']}, {cfg['num-clients']} clients ({cfg['partition']}"
        + (f", alpha {cfg['alpha']}" if cfg["partition"] == "dirichlet" else "")
        + f"), {cfg['rounds']} rounds; "
        f"client {cfg['forget-client']} forgets `{cfg['forget-samples']}`"
        + (f" after round {cfg['withdraw-round']}" if cfg.get("withdraw-round") else " after training")
        + f". Seeds: {', '.join(map(str, seeds))} (mean ± sample std). Machine: {machine.get('cpus', '?')} CPUs, "
        f"{machine.get('platform', '?')}, GPU: {machine.get('gpu') or 'none'}.",
        "",
    ]
    columns = [(key, label) for key, label in REPORT_COLUMNS if any(key in stats for stats in summary.values())]
    lines.append("| model | " + " | ".join(label for _, label in columns) + " | bytes | x seconds |")
    lines.append("|" + "---|" * (len(columns) + 3))
    retrain_wall = summary.get("retrain", {}).get("wall_s", {}).get("mean")
    for name, stats in summary.items():
        label = f"**{name}** (reference)" if name == "retrain" else name
        speed = "-"
        if retrain_wall and "wall_s" in stats and name != "retrain" and stats["wall_s"]["mean"] > 0:
            speed = f"{retrain_wall / stats['wall_s']['mean']:.1f}x"
        row = [_cell(stats.get(key), CELL_DIGITS.get(key, 3)) for key, _ in columns]
        lines.append(f"| {label} | " + " | ".join(row) + f" | {_bytes_cell(stats.get('bytes'))} | {speed} |")
    if runs[0].get("stream"):
        lines.insert(
            3,
            f"A stream of {len(runs[0]['stream'])} withdrawals, one after another: clients "
            + ", ".join(str(r["request"]["client"]) for r in runs[0]["stream"])
            + ". The table shows the models after the last request and the cost of serving all of them.",
        )
        lines.insert(4, "")
    lines += band_markdown(runs, summary)
    lines += stream_markdown(stream_aggregate(runs))
    lines += ["", "## Rankings (best first)", ""]
    for key, label, lower in RANKINGS:
        order = rankings(summary)[key]
        if order:
            lines.append(f"- {label} ({'lower' if lower else 'higher'} is better): " + _ranking_text(order))
    lines += ["", "## Notes", ""]
    lines += attack_notes(runs)
    lines.append("- ASR gap and MIA gap are |method - retrain|: the goal is to behave as the retrained model, not to reach zero.")
    lines.append(
        "- Membership is scored on the clean part of the forget set (untriggered, true labels) against the same clients' "
        "held-out data; the poisoned part is the backdoor metric's (ASR) job. DIST del / DIST trig: output distance "
        "to the retrained model on the deleted set and on triggered test inputs (the clean test set, DIST test, "
        "favours the original model, which is already close to retraining there)."
    )
    if any("relearn_steps" in stats for stats in summary.values()):
        lines.append(
            "- relearn steps: SGD steps of fine-tuning on the forget set until its ASR (or accuracy) is back at 90% of "
            "the original's; fewer than the retrained model needs means the behaviour was hidden, not removed."
        )
    lines.append(
        "- Costs are the unlearning phase only (plus the rounds trained afterwards for a mid-training request);"
        " training and cache filling are one-time costs listed in each results.json under `phases`."
    )
    return "\n".join(lines) + "\n"


def plot_report(runs: list[dict[str, Any]], summary: dict[str, dict[str, dict[str, float]]], out_dir: Path) -> list[Path]:
    """PNG plots: per-metric bars with error bars, removal quality vs cost, accuracy per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = list(summary)
    metrics = [k for k in ("acc_test", "backdoor_asr", "mia_auc", "mia_shadow_auc", "dist_output") if any(k in summary[n] for n in names)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6))
    for ax, key in zip(np.atleast_1d(axes), metrics, strict=True):
        having = [n for n in names if key in summary[n]]
        ax.bar(
            range(len(having)),
            [summary[n][key]["mean"] for n in having],
            yerr=[summary[n][key]["std"] for n in having],
            capsize=3,
            color=["#888" if n in ("original", "retrain") else "#3a7" for n in having],
        )
        ax.set_xticks(range(len(having)), having, rotation=60, ha="right", fontsize=8)
        ax.set_title(key)
    fig.tight_layout()
    path = out_dir / "metrics.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    methods = [n for n in names if n not in ("original",) and "asr_gap" in summary[n] and "wall_s" in summary[n]]
    if methods:
        fig, ax = plt.subplots(figsize=(5, 4))
        for n in methods:
            x, y = summary[n]["wall_s"]["mean"], summary[n]["asr_gap"]["mean"]
            ax.errorbar(x, y, xerr=summary[n]["wall_s"]["std"], yerr=summary[n]["asr_gap"]["std"], fmt="o", capsize=3)
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("unlearning cost (wall seconds, log)")
        ax.set_ylabel("|ASR - ASR retrain| (lower is better)")
        ax.set_title("removal quality vs cost")
        fig.tight_layout()
        path = out_dir / "quality_vs_cost.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    stream = stream_aggregate(runs)
    if stream:
        keys = [
            k
            for k in ("acc_test", "backdoor_asr", "acc_deleted", "mia_shadow_auc", "mia_auc")
            if k in stream[0]["models"].get("retrain", {})
        ][:4]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.6))
        steps = range(1, len(stream) + 1)
        for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
            for name in stream[0]["models"]:
                points = [step["models"].get(name, {}).get(key) for step in stream]
                if all(p is not None for p in points):
                    style = {"color": "black", "linestyle": "--"} if name == "retrain" else {}
                    ax.errorbar(
                        list(steps),
                        [p["mean"] for p in points],
                        yerr=[p["std"] for p in points],
                        marker="o",
                        capsize=3,
                        label=name,
                        **style,
                    )
            ax.set_xticks(list(steps), [f"{j}: client {stream[j - 1]['request']['client']}" for j in steps], fontsize=8)
            ax.set_xlabel("after request")
            ax.set_title(key)
        np.atleast_1d(axes)[0].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "stream.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    history = runs[0].get("history", {})
    if history:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in history.items():
            pts = [p for p in points if "acc_test" in p]
            if pts:
                ax.plot([p["round"] for p in pts], [p["acc_test"] for p in pts], marker=".", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"accuracy per round (seed {runs[0]['config']['seed']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "accuracy_per_round.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_summary(out_dir: str | Path, runs: list[dict[str, Any]], title: str = "fedunlearn report") -> dict[str, Any]:
    """Write DIR/summary.json, DIR/summary.csv, DIR/report.md and DIR/plots/*.png; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = aggregate(runs)
    document = {"seeds": [r["config"]["seed"] for r in runs], "models": summary, "rankings": rankings(summary)}
    if any(r.get("stream") for r in runs):
        document["stream"] = stream_aggregate(runs)
    (out / "summary.json").write_text(json.dumps(finite_or_none(document), indent=2) + "\n")
    keys: list[str] = []
    for stats in summary.values():
        keys.extend(k for k in stats if k not in keys)
    rows = ["model," + ",".join(f"{k}_mean,{k}_std" for k in keys)]
    for name, stats in summary.items():
        cells = []
        for k in keys:
            s = stats.get(k)
            cells += ["", ""] if s is None else [repr(s["mean"]), repr(s["std"])]
        rows.append(name + "," + ",".join(cells))
    (out / "summary.csv").write_text("\n".join(rows) + "\n")
    (out / "report.md").write_text(markdown_report(runs, summary, title))
    plots = plot_report(runs, summary, out / "plots")
    document["plots"] = [str(p) for p in plots]
    return document
