"""Markdown tables of saved benchmark results (what BENCHMARKS.md holds): dates, machines, medians, the paths side by side, targets.

Used by `python -m benchmarks.report`. Every renderer reads the JSON a benchmark wrote, including
files written by earlier versions of the benchmarks (missing keys show as "-").
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import REPO_ROOT, format_bytes, format_ratio, format_seconds, table
from .scaling import SCALING_HEADERS, crossing_line, report_rows

KIND_ORDER = ("training", "unlearning", "memory", "reliability", "round-trip", "secagg_overhead", "many_clients", "scaling")


def kind_of(result: dict[str, Any]) -> str | None:
    """Which benchmark wrote a results file (files from before the common envelope are recognised by their keys)."""
    if result.get("benchmark"):
        return str(result["benchmark"])
    if "fault_table" in result and "norm_bound" in result:
        return "reliability"
    return None


def format_date(value: str | None) -> str:
    """ISO 8601 (UTC) as 'YYYY-MM-DD HH:MM UTC'; '-' when the file has no date."""
    if not value:
        return "- (not recorded)"
    try:
        moment = _dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    return moment.astimezone(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine_line(machine: dict[str, Any] | None) -> str:
    """One line naming the machine: CPU, cores, memory, GPU, library versions."""
    m = machine or {}
    memory = m.get("memory_bytes")
    parts = [f"{m.get('cpu', 'CPU not recorded')}, {m.get('cpus', '?')} CPUs"]
    if memory:
        parts.append(f"{memory / 2**30:.0f} GiB memory")
    parts.append(f"GPU: {m['gpu']}" if m.get("gpu") else "no GPU")
    parts.append(", ".join(f"{lib} {m[lib]}" for lib in ("torch", "flwr", "ray") if m.get(lib)))
    load = m.get("load_average")
    if load:
        parts.append(f"load average at start {load[0]:.1f}")
    return "; ".join(p for p in parts if p)


def _shown(path: Path) -> str:
    """A results file's path relative to the repository when it lies inside it."""
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def _header(title: str, result: dict[str, Any], path: Path | None) -> list[str]:
    lines = [f"### {title}", "", f"- date: {format_date(result.get('date'))}", f"- machine: {machine_line(result.get('machine'))}"]
    if result.get("command"):
        lines.append(f"- command: `{result['command']}`")
    if path is not None:
        lines.append(f"- results: `{_shown(path)}`")
    return lines


def verdict(target: dict[str, Any]) -> str:
    """'met (1.98x, needs >= 1.00x)', 'MISSED by 1.83x (...)' or 'not measured'; by how much from measured and required."""
    met = target.get("met")
    measured = target.get("measured", target.get("measured_bytes"))
    required = target.get("required", target.get("required_bytes"))
    lower = target.get("better") == "lower" or any(w in str(target.get("target", "")) for w in ("within", "under"))
    if met is None or measured is None or required is None:
        return "not measured" if met is None else ("met" if met else "MISSED")
    in_bytes = "measured_bytes" in target or "required_bytes" in target
    shown = (format_bytes(measured), format_bytes(required)) if in_bytes else (f"{measured:.3g}x", f"{required:g}x")
    bound = f"{'<=' if lower else '>='} {shown[1]}"
    factor = (required / measured if lower else measured / required) if measured > 0 else None
    if met:
        margin = f", {factor:.2f}x inside the target" if factor is not None else ""
        return f"met: {shown[0]} (needs {bound}{margin})"
    by = f" by {1 / factor:.2f}x" if factor else ""
    return f"MISSED{by}: {shown[0]} (needs {bound})"


def targets_table(targets: Sequence[dict[str, Any]]) -> list[str]:
    """Every target: what it asks, the verdict with how much, and the benchmark's own note (why)."""
    if not targets:
        return []
    rows = [[t.get("target", "-"), verdict(t), str(t.get("note", "")).replace("|", "/")] for t in targets]
    return ["", "Targets:", "", table(["target", "result", "note"], rows)]


def _cell(summary: dict[str, Any], key: str, kind: str) -> str:
    if not summary.get("ok"):
        return "not available" if summary.get("available") is False else "FAILED"
    value = summary.get(key)
    return {"s": format_seconds, "bytes": format_bytes, "x": format_ratio}[kind](value)


def _load_cell(summary: dict[str, Any]) -> str:
    value = summary.get("load_1min_mean")
    return "-" if not summary.get("ok") or value is None else f"{value:.1f}"


# ----- training -----------------------------------------------------------------------------------


def training(result: dict[str, Any], path: Path | None = None) -> str:
    """Seconds per round: one column per path, one row per figure; then the calibration, ratios and targets."""
    s = result.get("settings", {})
    engine = s.get("engine", "ray")
    title = (
        f"Training: {s.get('clients')} clients x {s.get('examples')} examples, {s.get('rounds')} rounds x "
        f"{s.get('repeats', 1)} repeat(s)" + ("" if engine == "ray" else f" (engine {engine}: in-process, not a benchmark figure)")
    )
    lines = _header(title, result, path)
    variants = result.get("variants", {})
    names = list(variants)
    summaries = {n: variants[n].get("summary", {}) for n in names}
    comparison = result.get("comparison", {})
    over_ideal = comparison.get("steady_over_ideal", {})
    flower = summaries.get("flower-quickstart", {}).get("steady_round_s")
    loop = summaries.get("single-process-loop", {}).get("steady_round_s")

    def versus(name: str, other: float | None, faster: bool) -> str:
        mine = summaries[name].get("steady_round_s") if summaries[name].get("ok") else None
        if mine is None or other is None or mine <= 0 or other <= 0:
            return "-"
        return format_ratio(other / mine if faster else mine / other)

    rows = [
        ["steady s/round (median, rounds 2..R)", *[_cell(summaries[n], "steady_round_s", "s") for n in names]],
        [
            "steady s/round, min .. max",
            *[
                (
                    "-"
                    if not summaries[n].get("ok")
                    else f"{format_seconds(summaries[n].get('steady_round_min_s'))} .. "
                    f"{format_seconds(summaries[n].get('steady_round_max_s'))}"
                )
                for n in names
            ],
        ],
        ["speedup vs (a) plain Flower (x faster)", *[versus(n, flower, True) for n in names]],
        ["time vs (b) single-process loop (x)", *[versus(n, loop, False) for n in names]],
        ["steady round / ideal 2-core round", *[format_ratio(over_ideal.get(n)) if summaries[n].get("ok") else "-" for n in names]],
        ["first round s", *[_cell(summaries[n], "first_round_s", "s") for n in names]],
        ["Ray start s (reported apart)", *[_cell(summaries[n], "ray_start_s", "s") for n in names]],
        ["call to end of round 1 s", *[_cell(summaries[n], "to_first_round_end_s", "s") for n in names]],
        ["wall s", *[_cell(summaries[n], "wall_s", "s") for n in names]],
        ["driver peak RSS", *[_cell(summaries[n], "driver_peak_rss_bytes", "bytes") for n in names]],
        ["worker peak RSS (max)", *[_cell(summaries[n], "worker_peak_rss_max_bytes", "bytes") for n in names]],
        ["total RSS peak", *[_cell(summaries[n], "total_rss_peak_bytes", "bytes") for n in names]],
        ["mean 1-min load while running", *[_load_cell(summaries[n]) for n in names]],
        [
            "runs ok / failed",
            *[
                (
                    f"{summaries[n].get('runs_ok', 0)} / {summaries[n].get('runs_failed', 0)}"
                    if summaries[n].get("ok")
                    else _cell(summaries[n], "", "s")
                )
                for n in names
            ],
        ],
    ]
    lines += ["", table(["", *[variants[n].get("label", n) for n in names]], rows)]
    cal = result.get("calibration") or {}
    if cal.get("ok"):
        lines += [
            "",
            f"Calibration during the run: one SGD step (batch {s.get('batch_size')}) took "
            f"{cal['step_s_1_thread'] * 1e3:.1f} ms on 1 thread and {cal['step_s_default_threads'] * 1e3:.1f} ms on "
            f"{cal['default_threads']} threads; {cal['steps_per_round']} steps per round on {cal['cores']} cores in "
            f"perfect parallel would take {format_seconds(cal['ideal_round_s'])} s per round.",
        ]
    unavailable = [f"{variants[n].get('label', n)}: {summaries[n].get('reason')}" for n in names if summaries[n].get("available") is False]
    failed = [
        f"{variants[n].get('label', n)}: {str(e).splitlines()[0] if e else '?'}" for n in names for e in summaries[n].get("errors") or []
    ]
    lines += ["", f"Not available: {'; '.join(unavailable)}"] if unavailable else []
    lines += ["", f"Failed runs: {'; '.join(failed)}"] if failed else []
    lines += targets_table(result.get("targets", []))
    return "\n".join(lines)


def training_overview(results: Sequence[dict[str, Any]]) -> str:
    """The headline: steady seconds per round at every measured scale, one column per path."""
    if not results:
        return ""
    names: list[str] = []
    labels: dict[str, str] = {}
    for result in results:
        for name, variant in result.get("variants", {}).items():
            if name not in names:
                names.append(name)
                labels[name] = variant.get("label", name)
    rows = []
    for result in sorted(results, key=lambda r: r.get("settings", {}).get("clients") or 0):
        s = result.get("settings", {})
        row = [
            f"{s.get('clients')} x {s.get('examples')}",
            format_date(result.get("date")),
            machine_line(result.get("machine")).split(";")[0],
        ]
        for name in names:
            summary = result.get("variants", {}).get(name, {}).get("summary")
            row.append("-" if summary is None else _cell(summary, "steady_round_s", "s"))
        rows.append(row)
    return "\n".join(
        [
            "### Training overview: steady-state seconds per FedAvg round (median)",
            "",
            table(["clients x examples", "date", "machine", *[labels[n] for n in names]], rows),
        ]
    )


# ----- unlearning ---------------------------------------------------------------------------------


def unlearning(result: dict[str, Any], path: Path | None = None) -> str:
    """Seconds, rounds and bytes of every method against retraining (medians), then the targets."""
    cfg = result.get("scenario", {})
    s = result.get("settings", {})
    engine = s.get("engine", "ray")
    title = (
        f"Unlearning: preset {s.get('preset')} ({cfg.get('dataset')}, {cfg.get('num-clients')} clients, {cfg.get('rounds')} "
        f"rounds), {s.get('repeats')} repeat(s)" + ("" if engine == "ray" else f" (engine {engine}: in-process, not a benchmark figure)")
    )
    lines = _header(title, result, path)
    rows = []
    for name, m in result.get("methods", {}).items():
        finished = m.get("repeats_finished", m.get("repeats"))
        rows.append(
            [
                name,
                format_seconds(m.get("wall_s")),
                format_seconds(m.get("client_compute_s")),
                "-" if m.get("rounds") is None else f"{m['rounds']:g}",
                format_bytes(m.get("bytes")),
                format_ratio(m.get("speedup_wall")),
                format_ratio(m.get("speedup_rounds")),
                format_ratio(m.get("speedup_bytes")),
                f"{finished}/{m.get('repeats')}",
            ]
        )
    lines += [
        "",
        table(
            ["method", "wall s", "client compute s", "rounds", "bytes", "x wall vs retrain", "x rounds", "x bytes", "repeats finished"],
            rows,
        ),
    ]
    pull = result.get("grid_pull_interval_s")
    if pull is not None:
        lines += ["", f"The server polled the grid for replies every {pull:g} s (every round trip waits at least one poll)."]
    lines += targets_table(result.get("targets", []))
    return "\n".join(lines)


# ----- memory -------------------------------------------------------------------------------------


def memory(result: dict[str, Any], path: Path | None = None) -> str:
    """Peak RSS and cache bytes at each scale, one column per path; then the target."""
    lines = _header("Memory: peak RSS and gradient-cache bytes", result, path)
    for entry in result.get("scales", []):
        variants = entry.get("variants", {})
        names = list(variants)
        summaries = {n: variants[n].get("summary", {}) for n in names}
        caches = {n: variants[n].get("caches") or {} for n in names}

        def cache(name: str, key: str, summaries: dict[str, Any] = summaries, caches: dict[str, Any] = caches) -> str:
            if not summaries[name].get("ok"):
                return _cell(summaries[name], "", "s")
            return format_bytes(caches[name].get(key)) if caches[name] else "- (no caches)"

        rows = [
            ["driver peak RSS", *[_cell(summaries[n], "driver_peak_rss_bytes", "bytes") for n in names]],
            ["worker peak RSS (max)", *[_cell(summaries[n], "worker_peak_rss_max_bytes", "bytes") for n in names]],
            ["workers peak RSS (sum)", *[_cell(summaries[n], "workers_peak_rss_sum_bytes", "bytes") for n in names]],
            ["total RSS peak (all processes)", *[_cell(summaries[n], "total_rss_peak_bytes", "bytes") for n in names]],
            ["client gradient caches (disk)", *[cache(n, "client_cache_bytes") for n in names]],
            ["server aggregate cache", *[cache(n, "server_aggregate_cache_bytes") for n in names]],
            ["wall s", *[_cell(summaries[n], "wall_s", "s") for n in names]],
            ["mean 1-min load while running", *[_load_cell(summaries[n]) for n in names]],
        ]
        lines += [
            "",
            f"{entry.get('clients')} clients x {entry.get('examples')} examples:",
            "",
            table(["", *[variants[n].get("label", n) for n in names]], rows),
        ]
    lines += targets_table(result.get("targets") or ([result["target"]] if result.get("target") else []))
    return "\n".join(lines)


# ----- reliability --------------------------------------------------------------------------------


def reliability(result: dict[str, Any], path: Path | None = None) -> str:
    """Faults injected, survived and rejected per kind; then the norm bound's effect."""
    faults = result.get("fault_table", {})
    cfg = faults.get("config", {})
    preset = (result.get("settings") or {}).get("preset") or (result.get("norm_bound") or {}).get("preset", "?")
    lines = _header(
        f"Reliability under injected faults: preset {preset} ({cfg.get('num-clients')} clients, {cfg.get('rounds')} rounds, in-process)",
        result,
        path,
    )
    lost = faults.get("results_lost", "-")
    rows = [[label, r.get("injected"), r.get("survived"), r.get("rejected"), lost] for label, r in faults.get("rows", {}).items()]
    total = [sum(r.get(k, 0) for r in faults.get("rows", {}).values()) for k in ("injected", "survived", "rejected")]
    rows.append(["**total**", *[f"**{t}**" for t in total], f"**{lost}**"])
    lines += [
        "",
        f"Run status: {faults.get('status', '-')}; {format_seconds(faults.get('wall_s'))} s.",
        "",
        table(["fault", "injected", "survived", "replies rejected", "results lost"], rows),
    ]
    norm = result.get("norm_bound") or {}
    if norm.get("rows"):
        before = norm.get("before", {})
        lines += [
            "",
            f"Norm bound (before unlearning: ACC {before.get('acc_test', 0):.3f}, ASR {before.get('backdoor_asr', 0):.3f}):",
            "",
            table(
                ["variant", "parameter change", "ACC test", "ASR", "clipped", "rejected", "status"],
                [
                    [
                        r["variant"],
                        f"{r['param_change']:.4g}",
                        f"{r['acc_test']:.3f}",
                        f"{r['backdoor_asr']:.3f}",
                        r.get("clipped"),
                        r.get("rejected"),
                        r.get("status"),
                    ]
                    for r in norm["rows"]
                ],
            ),
        ]
    return "\n".join(lines)


def round_trip(result: dict[str, Any], path: Path | None = None) -> str:
    """Median milliseconds of one simulated round trip per setting, split into the way out, the handler and back."""
    lines = _header("One simulated round trip (ms, medians)", result, path)

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [[s["setting"], *(ms(s["median_ms"].get(k)) for k in ("total", "out", "handler", "back"))] for s in result.get("settings", [])]
    return "\n".join([*lines, "", table(["setting", "total", "out", "handler", "back"], rows)])


def secagg_overhead(result: dict[str, Any], path: Path | None = None) -> str:
    """Plain vs secure IAU rounds per client count: seconds, rounds, bytes, and the quantisation error bound."""
    lines = _header("Secure aggregation: plain vs SecAgg+ rounds", result, path)
    rows = []
    for run in result.get("runs", []):
        for kind in ("correction", "caching"):
            plain, secure = run[f"{kind}_plain"], run[f"{kind}_secure"]
            rows.append(
                [
                    run["clients"],
                    kind,
                    f"{plain['wall_s']:.3f} / {secure['wall_s']:.3f}",
                    f"{plain['rounds']} / {secure['rounds']}",
                    f"{format_bytes(plain['bytes_down'] + plain['bytes_up'])} / {format_bytes(secure['bytes_down'] + secure['bytes_up'])}",
                    f"{run['error_bound']['l2']:.1e}",
                ]
            )
    return "\n".join([*lines, "", table(["clients", "round", "seconds plain / secure", "rounds", "bytes", "error bound (L2)"], rows)])


def many_clients(result: dict[str, Any], path: Path | None = None) -> str:
    """A whole experiment per virtual-client count: peak RSS, cache bytes on disk, then each point's seconds and peaks per phase."""
    lines = _header("Many virtual clients: a whole experiment per client count (cohort, mlp)", result, path)
    points = result.get("points", [])
    overview = [
        [
            p["clients"],
            p["status"],
            "-" if p.get("process_wall_s") is None else f"{p['process_wall_s']:.0f}",
            format_bytes(p.get("driver_peak_rss_bytes")),
            format_bytes(p.get("total_rss_peak_bytes")),
            format_bytes(p.get("cache_bytes_on_disk")),
            p.get("cache_files") if p.get("cache_files") is not None else "-",
            format_bytes(p.get("results_json_bytes")),
        ]
        for p in points
    ]
    parts = [
        *lines,
        "",
        table(
            ["clients", "status", "wall s", "driver peak RSS", "all processes peak RSS", "caches on disk", "cache files", "results.json"],
            overview,
        ),
    ]
    for p in points:
        rows = [
            [
                name,
                "-" if row.get("wall_s") is None else f"{row['wall_s']:.1f}",
                row.get("rounds") if row.get("rounds") is not None else "-",
                format_bytes(row.get("bytes")),
                format_bytes(row.get("driver_rss_peak_bytes")),
                format_bytes(row.get("total_rss_peak_bytes")),
            ]
            for name, row in (p.get("phases") or {}).items()
        ]
        if rows:
            parts += [
                "",
                f"{p['clients']} clients, per phase:",
                "",
                table(["phase", "wall s", "rounds", "bytes", "driver peak RSS", "all processes peak RSS"], rows),
            ]
    if result.get("target"):
        parts += targets_table([result["target"]])
    return "\n".join(parts)


def scaling(result: dict[str, Any], path: Path | None = None) -> str:
    """The speedups of iau and iau-cached over retrain per grid point, and where iau-cached first passes its target."""
    lines = _header("Scaling: speedups over retraining as the work retraining redoes grows", result, path)
    return "\n".join([*lines, "", table(SCALING_HEADERS, report_rows(result)), "", f"- {crossing_line(result)}"])


RENDERERS = {
    "training": training,
    "unlearning": unlearning,
    "memory": memory,
    "reliability": reliability,
    "round-trip": round_trip,
    "secagg_overhead": secagg_overhead,
    "many_clients": many_clients,
    "scaling": scaling,
}


def document(files: Sequence[tuple[Path, dict[str, Any]]]) -> str:
    """Every results file as Markdown, grouped by benchmark (training first, with an overview across scales)."""
    grouped: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path, result in files:
        kind = kind_of(result)
        if kind in RENDERERS:
            grouped.setdefault(kind, []).append((path, result))
    parts = ["<!-- generated by `python -m benchmarks.report` from the JSON files named below -->"]
    for kind in KIND_ORDER:
        entries = grouped.get(kind, [])
        if not entries:
            continue
        parts.append(f"## {kind.capitalize()}")
        if kind == "training":
            entries.sort(key=lambda e: e[1].get("settings", {}).get("clients") or 0)
            parts.append(training_overview([r for _, r in entries]))
        parts += [RENDERERS[kind](result, path) for path, result in entries]
    return "\n\n".join(parts) + "\n"
