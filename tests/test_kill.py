"""A killed run leaves nothing behind: SIGINT, SIGTERM and SIGKILL of the driver, each on a real Ray run.

The run is started in its own session with an environment marker that no other run on the machine
carries, and with TMPDIR pointing at a folder of this test's own, under which the run's private Ray
folder is made. A process is the run's if its environment holds the marker (every process Ray starts
inherits the driver's environment) or if it has a file open under that folder (every Ray process logs
there): the environment alone misses Ray's agents whenever their process title overwrites the marker
in /proc/<pid>/environ. Other Ray runs on a shared machine are neither counted nor touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

MARKER = "FEDUNLEARN_KILL_TEST"


def has_open_file_under(entry: Path, folder: Path) -> bool:
    """Whether the process of /proc entry `entry` holds a file open under `folder`."""
    prefix = f"{folder}/"
    for fd in (entry / "fd").iterdir():
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue
    return False


def processes_with(marker: str, value: str, folder: Path | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment holds marker=value or that has a file open under `folder`."""
    needle = f"{marker}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if needle not in environ.split(b"\0") and (folder is None or not has_open_file_under(entry, folder)):
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


def start_run(tmp_path: Path, value: str, temp_root: Path | None = None) -> tuple[subprocess.Popen[str], list[str]]:
    """A long run (many rounds) in its own session, its temporary files under `temp_root`; its output lines are collected in the background."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0", **{MARKER: value})
    if temp_root is not None:
        env["TMPDIR"] = str(temp_root)
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


@pytest.fixture
def temp_root():
    """A short private TMPDIR for the run (Ray's socket paths must stay under 108 characters, pytest's tmp_path can be long)."""
    folder = Path(tempfile.mkdtemp(prefix="fk-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
@pytest.mark.ray
def test_killed_driver_leaves_no_process_of_its_run(tmp_path, temp_root, sig):
    value = uuid.uuid4().hex
    proc, lines = start_run(tmp_path, value, temp_root)
    try:
        # Ray is up and every client answered once the training phase is announced.
        started = wait_until(lambda: any("[fedunlearn] training (" in line for line in lines) or proc.poll() is not None, 240)
        assert started and proc.poll() is None, "".join(lines[-40:])
        running = processes_with(MARKER, value, temp_root)
        assert any("raylet" in cmd for _, cmd in running), running  # the count below is of a run that had Ray processes
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
        wait_until(lambda: not processes_with(MARKER, value, temp_root), 60)
        left = processes_with(MARKER, value, temp_root)
        assert left == [], f"{len(left)} processes of the killed run still alive after {sig.name}: {left}; output: {lines[-20:]}"
        if sig != signal.SIGKILL:  # the driver itself had the chance to say what happened, without a traceback
            output = "".join(lines)
            assert "Traceback" not in output, output[-3000:]
            assert proc.returncode == 128 + sig, (proc.returncode, output[-2000:])
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid, _ in processes_with(MARKER, value, temp_root):  # never leave this test's own processes behind for the next one
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
