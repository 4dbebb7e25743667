"""`python -m simulations.reaper TOKEN DRIVER_PID RAY_DIR`: ends a run's Ray processes once its driver is gone.

Started by `simulations.lifecycle.private_ray` before Ray, with a pipe on its stdin whose other end only
the driver holds. End of file on stdin means the driver finished (after `ray.shutdown()`) or died,
SIGKILL included. Then every process whose environment holds RUN_TOKEN=TOKEN (Ray's GCS, raylet, agents,
workers: they inherit the driver's environment; no other process has this token) gets SIGTERM, and
SIGKILL if still alive after a grace period; RAY_DIR, Ray's folder of this run, is removed. Written by
hand: it must import nothing heavy and run where psutil is not installed; /proc is read directly (Linux).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

RUN_TOKEN = "FEDUNLEARN_RUN_TOKEN"  # in the environment of every process Ray starts for a run (simulations.lifecycle sets it)
GRACE_S = 5.0
SWEEP_S = 30.0


def run_processes(token: str, exclude: set[int]) -> list[int]:
    """Live processes (not zombies) whose environment holds RUN_TOKEN=token, but those in `exclude`."""
    needle = f"{RUN_TOKEN}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if "State:\tZ" in (entry / "status").read_text():
                continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append(int(entry.name))
    return found


def sweep(token: str, exclude: set[int]) -> int:
    """SIGTERM every process of the run, SIGKILL what is left after the grace period; returns how many were found."""
    pids = run_processes(token, exclude)
    found = len(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + GRACE_S
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = run_processes(token, exclude)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return found


def main(argv: list[str]) -> int:
    """Wait for the driver to go, then end what is left of its run."""
    token, driver, ray_dir = argv[0], int(argv[1]), argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver is not for the one cleaning up after it
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except OSError:
        pass
    # Again until a scan finds nothing: a raylet killed mid-start may have forked a worker after the first scan.
    deadline = time.monotonic() + SWEEP_S
    while sweep(token, exclude={os.getpid(), driver}) and time.monotonic() < deadline:
        time.sleep(0.5)
    shutil.rmtree(ray_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
