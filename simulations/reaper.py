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
import select
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
    wait_for_driver(driver)
    # Again until two scans in a row find nothing: a raylet killed mid-start may have forked a worker after a scan.
    deadline = time.monotonic() + SWEEP_S
    empty = 0
    while empty < 2 and time.monotonic() < deadline:
        try:
            empty = 0 if sweep(token, exclude={os.getpid(), driver}) else empty + 1
        except Exception:  # never give up the sweep over one odd /proc entry
            empty = 0
        time.sleep(0.5)
    shutil.rmtree(ray_dir, ignore_errors=True)
    return 0


def driver_alive(pid: int) -> bool:
    """Whether the driver still runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def wait_for_driver(driver: int) -> None:
    """Until the driver's end of the pipe closes (it finished or died) or the driver is seen gone, whichever is first.

    End of file is the normal signal; the check of the driver's pid every half second covers a pipe whose write
    end some other process still holds, so a SIGKILLed driver is noticed either way.
    """
    stdin = sys.stdin.buffer
    while True:
        try:
            ready, _, _ = select.select([stdin], [], [], 0.5)
            if ready and not os.read(stdin.fileno(), 65536):
                return
        except (OSError, ValueError):
            return
        if not driver_alive(driver):
            return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
