"""A killed run leaves nothing behind: SIGINT, SIGTERM and SIGKILL of the driver, each on a real Ray run.

The run is started in its own session with an environment marker that no other run on the machine
carries; every process Ray starts for it (GCS, raylet, agents, workers) inherits the driver's
environment, so the processes of this run, and only those, are the ones whose environment holds the
marker. Other Ray runs on a shared machine are neither counted nor touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

MARKER = "FEDUNLEARN_KILL_TEST"


def processes_with(marker: str, value: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment holds marker=value."""
    needle = f"{marker}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if needle not in environ.split(b"\0"):
                continue
            status = (entry / "status").read_text()
            if "State:\tZ" in status:  # a zombie holds no resources; its parent reaps it
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append((int(entry.name), cmdline))
    return found


def wait_until(predicate, deadline_s: float, poll_s: float = 0.5) -> bool:
    """Poll `predicate` until it holds or the deadline passes (a bound on waiting, not a timing assertion)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


def start_run(tmp_path: Path, value: str) -> tuple[subprocess.Popen[str], list[str]]:
    """A long run (many rounds) in its own session; its stderr lines are collected in the background."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0", **{MARKER: value})
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        "--preset",
        "smoke",
        "--model",
        "mlp",
        "--rounds",
        "400",
        "--local-epochs",
        "1",
        "--num-clients",
        "3",
        "--methods",
        "retrain",
        "--no-shadow-mia",
        "--mia-attacks",
        "loss",
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


# SIGKILL: usually 0 processes left, but in about 1 run in 4 on the loaded 2-core machine Ray's DashboardAgent and
# RuntimeEnvAgent outlive the reaper (seen in CI and locally, 2026-12-01; cause not yet found, issue 14 stays open):
# an expected failure that is not strict, so the test still runs and reports, and CI does not depend on the flake.
SIGKILL_FLAKE = pytest.mark.xfail(strict=False, reason="Ray's agents sometimes outlive the reaper after SIGKILL (issue 14)")


@pytest.mark.parametrize(
    "sig",
    [signal.SIGINT, signal.SIGTERM, pytest.param(signal.SIGKILL, marks=SIGKILL_FLAKE)],
    ids=["SIGINT", "SIGTERM", "SIGKILL"],
)
@pytest.mark.ray
def test_killed_driver_leaves_no_process_of_its_run(tmp_path, sig):
    value = uuid.uuid4().hex
    proc, lines = start_run(tmp_path, value)
    try:
        # Ray is up and every client answered once the training phase is announced.
        started = wait_until(lambda: any("[fedunlearn] training (" in line for line in lines) or proc.poll() is not None, 240)
        assert started and proc.poll() is None, "".join(lines[-40:])
        running = processes_with(MARKER, value)
        assert any("raylet" in cmd for _, cmd in running), running  # the count below is of a run that had Ray processes
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
        wait_until(lambda: not processes_with(MARKER, value), 60)
        left = processes_with(MARKER, value)
        assert left == [], f"{len(left)} processes of the killed run still alive after {sig.name}: {left}; output: {lines[-20:]}"
        if sig != signal.SIGKILL:  # the driver itself had the chance to say what happened, without a traceback
            output = "".join(lines)
            assert "Traceback" not in output, output[-3000:]
            assert proc.returncode == 128 + sig, (proc.returncode, output[-2000:])
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid, _ in processes_with(MARKER, value):  # never leave this test's own processes behind for the next one
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
