"""`python -m simulations.reaper TOKEN DRIVER_PID RAY_DIR`: ends a run's Ray processes once its driver is gone.

Started by `simulations.lifecycle.private_ray` before Ray, with a pipe on its stdin whose other end only
the driver holds. End of file on stdin means the driver finished (after `ray.shutdown()`) or died,
SIGKILL included. Then every process of the run gets SIGTERM, and SIGKILL if still alive after a grace
period; RAY_DIR, Ray's folder of this run, is removed. A process is the run's if its environment holds
RUN_TOKEN=TOKEN (Ray's GCS, raylet, agents, workers inherit the driver's environment; no other process
has this token) or if it has a file open under RAY_DIR (each of them logs there): the second catches
Ray's agents, whose process title overwrites the part of /proc/<pid>/environ that may hold the token.
A program of yours with a file open in that private folder (a `tail -f` of its logs) is counted too.
Written by hand: it must import nothing heavy and run where psutil is not installed; /proc is read
directly (Linux). FEDUNLEARN_REAPER_LOG=FILE makes it write what it saw and did to FILE.
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
LOG_ENV = "FEDUNLEARN_REAPER_LOG"  # a file path: the reaper appends what it saw and did (diagnosis of a kill)


def log(message: str) -> None:
    """One timestamped line to the file named by FEDUNLEARN_REAPER_LOG, if set; never fails the sweep."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    try:
        with open(path, "a") as out:
            out.write(f"{time.time():.3f} {message}\n")
    except OSError:
        pass


def describe(pid: int) -> str:
    """'pid (command)' for the log."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"{pid} ({cmd[:80]})"


def holds_file_under(pid: int, folder: str) -> bool:
    """Whether the process has a file open under `folder` (every Ray process of a run logs into the run's folder)."""
    prefix = folder.rstrip("/") + "/"
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue
    return False


def run_processes(token: str, exclude: set[int], ray_dir: str | None = None) -> list[int]:
    """Live processes (not zombies) of the run, but those in `exclude`.

    A process is the run's if its environment holds RUN_TOKEN=token or, with `ray_dir`, if it has a file open
    under the run's Ray folder. The environment alone is not enough: Ray's agents set their process title
    (setproctitle), which overwrites the start of the memory /proc/<pid>/environ shows, and the token is
    lost whenever the raylet put it there (measured: about 1 kill in 7 left both agents alive, token gone).
    """
    needle = f"{RUN_TOKEN}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        pid = int(entry.name)
        try:
            ours = needle in (entry / "environ").read_bytes().split(b"\0")
            if not ours and (ray_dir is None or not holds_file_under(pid, ray_dir)):
                continue
            if "State:\tZ" in (entry / "status").read_text():
                continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append(pid)
    return found


def sweep(token: str, exclude: set[int], ray_dir: str | None = None) -> int:
    """SIGTERM every process of the run, SIGKILL what is left after the grace period; returns how many were found."""
    pids = run_processes(token, exclude, ray_dir)
    found = len(pids)
    if pids:
        log("SIGTERM " + ", ".join(describe(p) for p in pids))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + GRACE_S
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = run_processes(token, exclude, ray_dir)
    if pids:
        log("SIGKILL " + ", ".join(describe(p) for p in pids))
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
    log(f"watching driver {driver}")
    wait_for_driver(driver)
    log("driver gone")
    # Again until two scans in a row find nothing: a raylet killed mid-start may have forked a worker after a scan.
    deadline = time.monotonic() + SWEEP_S
    empty = 0
    while empty < 2 and time.monotonic() < deadline:
        try:
            empty = 0 if sweep(token, exclude={os.getpid(), driver}, ray_dir=ray_dir) else empty + 1
        except Exception as err:  # never give up the sweep over one odd /proc entry
            log(f"scan failed: {err!r}")
            empty = 0
        time.sleep(0.5)
    log(f"done ({empty} empty scans in a row)")
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
