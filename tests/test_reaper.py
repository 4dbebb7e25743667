"""The reaper finds a run's processes by its token or by a file they hold open in the run's Ray folder, and only those.

Real processes are started and killed (no Ray): one carrying the run's token, one without the token
but logging into the run's Ray folder (what Ray's agents look like once their process title has
overwritten the token in /proc/<pid>/environ), and two bystanders (another token; a file open in a
folder whose name only starts like the run's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations import reaper

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="the reaper reads /proc (Linux)")

HOLD = "import sys, time; f = open(sys.argv[1], 'w') if len(sys.argv) > 1 else None; print('up', flush=True); time.sleep(120)"


def start(env_token: str | None, holds: Path | None) -> subprocess.Popen[str]:
    """A sleeping Python process, with RUN_TOKEN=env_token in its environment if given, holding `holds` open if given."""
    env = {k: v for k, v in os.environ.items() if k != reaper.RUN_TOKEN}
    if env_token is not None:
        env[reaper.RUN_TOKEN] = env_token
    args = [sys.executable, "-c", HOLD] + ([str(holds)] if holds is not None else [])
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"  # the file is open before the scan
    return proc


@pytest.fixture
def procs():
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def test_scan_finds_token_holders_and_processes_logging_into_the_run_folder(tmp_path, procs):
    ray_dir = tmp_path / "fedunlearn-ray-abc"
    ray_dir.mkdir()
    lookalike = tmp_path / "fedunlearn-ray-abcd"  # same prefix, another run's folder
    lookalike.mkdir()
    with_token = start("tok", None)
    logging_only = start(None, ray_dir / "dashboard_agent.log")
    other_token = start("other", None)
    other_folder = start(None, lookalike / "raylet.out")
    procs.extend([with_token, logging_only, other_token, other_folder])
    found = set(reaper.run_processes("tok", exclude={os.getpid()}, ray_dir=str(ray_dir)))
    assert with_token.pid in found
    assert logging_only.pid in found, "a process whose environment lost the token but logs into the run's folder was missed"
    assert other_token.pid not in found and other_folder.pid not in found
    # Without the folder only the token counts (what an embedding that has no Ray folder of its own gets).
    assert set(reaper.run_processes("tok", exclude={os.getpid()})) & {p.pid for p in procs} == {with_token.pid}


def test_sweep_ends_the_run_and_spares_the_rest(tmp_path, procs, monkeypatch):
    monkeypatch.setattr(reaper, "GRACE_S", 2.0)
    ray_dir = tmp_path / "fedunlearn-ray-xyz"
    ray_dir.mkdir()
    ours = [start("tok", None), start(None, ray_dir / "raylet.err")]
    bystander = start("other", None)
    procs.extend([*ours, bystander])
    assert reaper.sweep("tok", exclude={os.getpid()}, ray_dir=str(ray_dir)) == 2
    for proc in ours:
        assert proc.wait(timeout=30) != 0  # ended by a signal
    time.sleep(0.2)
    assert bystander.poll() is None
