"""What every benchmark shares: machine description, peak-memory monitor, child processes, medians, JSON, tables."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from simulations.results import finite_or_none  # one JSON rule (inf/NaN -> null) for results and benchmarks

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1

# Flower's simulation runtime and the Ray backend: quiet, no telemetry (FLOWER_NOTES.md).
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    import flwr
    import ray
    import torch

    try:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory_bytes = None
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": memory_bytes,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def utc_now() -> str:
    """The current time, ISO 8601 in UTC (seconds)."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are present, None when there are none."""
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(finite_or_none(payload), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def command_line(benchmark: str, argv: Sequence[str] | None) -> str:
    """The command that produced a result, as a user would type it."""
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", f"benchmarks.{benchmark}", *(shlex.quote(a) for a in args)])


def envelope(benchmark: str, settings: dict[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The common head of every results file: which benchmark, when, where, with what settings."""
    return {
        "benchmark": benchmark,
        "schema": SCHEMA_VERSION,
        "date": utc_now(),
        "machine": machine_info(),
        "command": command_line(benchmark, argv),
        "settings": settings,
    }


def format_seconds(value: float | None) -> str:
    """Seconds for a table cell."""
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def format_bytes(value: float | None) -> str:
    """Bytes for a table cell (decimal units)."""
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def format_ratio(value: float | None) -> str:
    """A ratio for a table cell."""
    return "-" if value is None else f"{value:.2f}x" if value < 100 else f"{value:.0f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (prints readably and pastes into BENCHMARKS.md)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----- memory ---------------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[1])  # the command name may hold spaces and parentheses
    except (OSError, ValueError, IndexError):
        return None


def _command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Every live process below `root` (Ray's raylet and its worker processes are children of the driver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def process_role(command: str) -> str:
    """'worker' for a Ray worker process (ClientApp actors, idle pre-started workers), 'ray-system' for Ray's daemons and agents."""
    if command.startswith(RAY_AGENTS):
        return "ray-system"
    return "worker" if command.startswith("ray::") or "default_worker.py" in command else "ray-system"


class PeakMonitor:
    """Samples the peak RSS (VmHWM) of this process and of every descendant while a benchmark runs.

    Reads /proc (Linux); the kernel's high-water mark is exact per process, so sampling only has to
    see each process once before it exits. `total_rss_peak` sums the current RSS of all of them at each
    sample (an estimate of the simultaneous peak; shared pages count once per process). With `timeline`,
    every sample is also kept as (perf_counter, driver RSS, summed RSS) so peaks can be read per phase.
    """

    def __init__(self, interval: float = 0.25, timeline: bool = False) -> None:
        self.interval = interval
        self.available = Path(f"/proc/{os.getpid()}/status").exists()
        self.peaks: dict[int, int] = {}
        self.commands: dict[int, str] = {}
        self.total_rss_peak = 0
        self.timeline: list[tuple[float, int, int]] | None = [] if timeline else None
        self.load_samples: list[float] = []  # 1-minute load average: how much others competed for the cores
        self._lock = threading.Lock()  # the sampling thread and a phase mark may sample at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-rss-monitor", daemon=True)

    def __enter__(self) -> PeakMonitor:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Record one sample of every process's high-water mark and of the summed current RSS."""
        with self._lock:
            total, driver = 0, 0
            me = os.getpid()
            for pid in [me, *descendants(me)]:
                hwm, rss = _status_kib(pid, "VmHWM"), _status_kib(pid, "VmRSS")
                if hwm is None:
                    continue
                self.peaks[pid] = max(self.peaks.get(pid, 0), hwm * 1024)
                if pid not in self.commands:
                    self.commands[pid] = _command_of(pid)
                total += (rss or 0) * 1024
                if pid == me:
                    driver = (rss or 0) * 1024
            self.total_rss_peak = max(self.total_rss_peak, total)
            if self.timeline is not None:
                self.timeline.append((time.perf_counter(), driver, total))
            if hasattr(os, "getloadavg"):
                self.load_samples.append(os.getloadavg()[0])

    def peaks_between(self, start: float, end: float) -> dict[str, int | None]:
        """Largest driver RSS and summed RSS among the timeline's samples in [start, end] (None without samples)."""
        with self._lock:
            inside = [(d, t) for when, d, t in (self.timeline or []) if start <= when <= end]
        return {
            "driver_rss_peak_bytes": max((d for d, _ in inside), default=None),
            "total_rss_peak_bytes": max((t for _, t in inside), default=None),
            "samples": len(inside),
        }

    def report(self) -> dict[str, Any]:
        """Peak RSS of the driver, of each Ray worker process and of Ray's own processes, in bytes."""
        if not self.available:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            return {
                "source": "getrusage (no /proc: workers not measured)",
                "driver_peak_rss_bytes": peak,
                "worker_peak_rss_bytes": [],
                "worker_peak_rss_max_bytes": None,
                "workers_peak_rss_sum_bytes": None,
                "ray_system_peak_rss_sum_bytes": None,
                "total_rss_peak_bytes": None,
                "num_worker_processes": 0,
            }
        me = os.getpid()
        with self._lock:
            return self._report(me)

    def _report(self, me: int) -> dict[str, Any]:
        workers = sorted(
            (self.peaks[p] for p in self.peaks if p != me and process_role(self.commands.get(p, "")) == "worker"), reverse=True
        )
        system = [self.peaks[p] for p in self.peaks if p != me and process_role(self.commands.get(p, "")) == "ray-system"]
        return {
            "source": f"/proc/<pid>/status VmHWM, sampled every {self.interval:.2f} s",
            "driver_peak_rss_bytes": self.peaks.get(me),
            "worker_peak_rss_bytes": workers,
            "worker_peak_rss_max_bytes": workers[0] if workers else None,
            "workers_peak_rss_sum_bytes": sum(workers) if workers else None,
            "ray_system_peak_rss_sum_bytes": sum(system) if system else None,
            "total_rss_peak_bytes": self.total_rss_peak,
            "num_worker_processes": len(workers),
            "load_1min_mean": statistics.fmean(self.load_samples) if self.load_samples else None,
            "load_1min_max": max(self.load_samples) if self.load_samples else None,
            "processes": sorted(
                (
                    {
                        "role": process_role(self.commands.get(p, "")) if p != me else "driver",
                        "command": self.commands.get(p, "")[:80],
                        "peak_rss_bytes": self.peaks[p],
                    }
                    for p in self.peaks
                ),
                key=lambda e: -e["peak_rss_bytes"],
            ),
        }


# ----- child processes ------------------------------------------------------------------------------


def child_env(threads: int | None = None) -> dict[str, str]:
    """Environment for a benchmark child: quiet Flower/Ray, the repository importable by Ray's workers."""
    env = dict(os.environ, **QUIET_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def tree_rss_bytes(root: int) -> int:
    """Current RSS of `root` and all its descendants, summed."""
    return sum((_status_kib(pid, "VmRSS") or 0) * 1024 for pid in [root, *descendants(root)])


def default_memory_cap() -> int:
    """A child may hold at most 75% of the memory available now (others share this machine)."""
    available = _meminfo_kib("MemAvailable")
    return int(available * 1024 * 0.75) if available else 16 * 10**9


def _meminfo_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _kill_tree(root: int) -> None:
    """SIGKILL a child and everything it started (each by its own pid)."""
    import signal

    for pid in [*reversed(descendants(root)), root]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_in_process(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one variant in this process (no child: for miniatures and debugging); an exception becomes `{"ok": False}`."""
    import traceback

    from .variants import quiet_logs, run_variant

    quiet_logs()
    started = time.perf_counter()
    try:
        result = finite_or_none(json.loads(json.dumps(run_variant(variant, spec), default=str)))
    except Exception as err:  # noqa: BLE001 - reported like a failed child, so the other variants still run
        return {
            "ok": False,
            "error": f"{variant}: {type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}",
            "process_wall_s": time.perf_counter() - started,
            "in_process": True,
        }
    result["process_wall_s"] = time.perf_counter() - started
    result["in_process"] = True
    return result


def run_child(
    variant: str, spec: dict[str, Any], timeout: float, memory_cap: int | None = None, in_process: bool = False
) -> dict[str, Any]:
    """Run one variant in a fresh Python process (clean Ray, clean peak RSS) and return its JSON result.

    A failed or timed-out child, or one whose process tree grows past `memory_cap` bytes of RSS (it is
    then killed, so a too-large run cannot starve the machine), gives `{"ok": False, "error": ...}`
    instead of raising, so the other variants of the same run are still reported. `in_process` runs
    it here instead (no timeout or memory cap; peak RSS then includes what this process held before).
    """
    if in_process:
        return run_in_process(variant, spec)
    cap = memory_cap if memory_cap is not None else default_memory_cap()
    with tempfile.TemporaryDirectory(prefix="fedunlearn-bench-") as tmp:
        out = Path(tmp) / "result.json"
        logs = Path(tmp) / "child.log"
        command = [sys.executable, "-m", "benchmarks.variants", variant, "--spec", json.dumps(spec), "--out", str(out)]
        started = time.perf_counter()
        peak, error = 0, None
        with logs.open("w") as log:
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
            while proc.poll() is None:
                time.sleep(0.5)
                rss = tree_rss_bytes(proc.pid) if Path("/proc").exists() else 0
                peak = max(peak, rss)
                elapsed = time.perf_counter() - started
                if rss > cap:
                    error = (
                        f"{variant}: stopped at {elapsed:.0f} s when its processes held {rss / 1e9:.2f} GB RSS, over the cap of "
                        f"{cap / 1e9:.2f} GB (75% of the memory available at start; --memory-cap-gb changes it)"
                    )
                elif elapsed > timeout:
                    error = f"{variant}: no result within {timeout:.0f} s (raise --timeout or lower the sizes)"
                if error:
                    _kill_tree(proc.pid)
                    proc.wait()
                    break
        wall = time.perf_counter() - started
        tail = logs.read_text(errors="replace")[-4000:].strip()
        if error is None and (proc.returncode != 0 or not out.exists()):
            error = f"{variant}: exit code {proc.returncode}"
        if error is not None:
            return {
                "ok": False,
                "error": f"{error}\n{tail}" if tail else error,
                "process_wall_s": wall,
                "tree_rss_peak_bytes_sampled": peak,
            }
        result: dict[str, Any] = json.loads(out.read_text())
        result["process_wall_s"] = wall
        return result


def add_point_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine, --in-process and --data-root of the benchmarks that run one whole experiment per point (scaling, many_clients)."""
    parser.add_argument(
        "--engine",
        default="ray",
        choices=("ray", "local"),
        help="ray: Flower's simulation engine (what is benchmarked); local: in-process LocalGrid (miniatures)",
    )
    parser.add_argument("--in-process", action="store_true", help="run each point in this process (tests, debugging)")
    parser.add_argument("--data-root", default=None, help="folder for the synthetic MNIST files (default: the system temp dir)")
