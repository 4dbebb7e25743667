"""The Ray instance of one run: private, started here, and gone when the run ends, however it ends.

Flower's `run_simulation` calls `ray.init` only when Ray is not initialised yet, and `ray.shutdown`
when its engine stops; a signal or a crash of the driver can skip the second. So the runner starts Ray
itself (`private_ray`), in a temporary folder of its own, and shuts it down on every exit path:

- normal end and exceptions: `ray.shutdown()` in a `finally`;
- SIGINT and SIGTERM: `handle_signals` turns both into `Interrupted` (a KeyboardInterrupt), so the
  same `finally` runs (Python's default for SIGTERM ends the process without running it);
- SIGKILL of the driver, which no handler sees: a reaper process (`python -m simulations.reaper`) started
  before Ray holds the read end of a pipe from the driver; when the driver dies the pipe closes and the
  reaper ends every process that carries this run's token in its environment (Ray's GCS, raylet, agents
  and workers inherit the driver's environment) or holds a file open in Ray's folder of this run, then
  removes that folder. Measured before this: after
  SIGKILL the DashboardAgent and RuntimeEnvAgent stayed alive with parent 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from fedunlearn.errors import ConfigError

from .reaper import RUN_TOKEN


class Interrupted(KeyboardInterrupt):
    """The driver got SIGINT or SIGTERM: the run stops, Ray is shut down, the exit code is 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    # From here on the engine's threads fail one after another as Ray goes away: those errors are the shutdown's, not news.
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise Interrupted in the main thread (again after ray.init, which installs its own)."""
    if sys.platform == "win32":
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)


_handling = False  # inside handle_signals(): private_ray puts the handlers back after ray.init replaced SIGTERM's


@contextmanager
def handle_signals() -> Iterator[None]:
    """install_signal_handlers() for the block, the previous handlers restored after it."""
    global _handling
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    install_signal_handlers()
    _handling = True
    try:
        yield
    finally:
        _handling = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_reaper(token: str, temp_dir: str) -> subprocess.Popen[bytes] | None:
    """The process that cleans up after a driver killed by SIGKILL (Linux: it reads /proc); None where it cannot run."""
    if not os.path.isdir("/proc"):
        return None
    # Its own session: a Ctrl-C or a kill of the driver's process group does not reach it before it did its job.
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.reaper", token, str(os.getpid()), temp_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=dict(os.environ, **{RUN_TOKEN: token}),
    )


def _stop_reaper(reaper: subprocess.Popen[bytes] | None) -> None:
    """Tell the reaper the driver is done (its stdin closes); it sweeps what ray.shutdown left and exits."""
    if reaper is None:
        return
    try:
        if reaper.stdin is not None:
            reaper.stdin.close()
        reaper.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pass


def ray_init_args(cfg_address: str, verbose: bool, temp_dir: str | None) -> dict[str, Any]:
    """ray.init's arguments, as Flower's RayBackend would pass them (plus a private temp folder for a local instance)."""
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath  # what Flower does: workers import what the driver imports
    args: dict[str, Any] = {
        "address": cfg_address,
        "include_dashboard": False,
        "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}},
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose,
    }
    if temp_dir is not None:
        args["_temp_dir"] = temp_dir
    return args


@contextmanager
def private_ray(address: str, verbose: bool) -> Iterator[None]:
    """Ray for one run: started here (private for 'local'), shut down when the block ends, reaped if the driver is killed.

    With a cluster address (`auto`, host:port) the driver joins it and only disconnects at the end: the
    cluster's processes are not this run's to end.
    """
    import ray

    if ray.is_initialized():  # an embedding program started Ray itself: it owns the lifecycle
        yield
        return
    token = uuid.uuid4().hex
    local = address == "local"
    temp_dir = tempfile.mkdtemp(prefix="fedunlearn-ray-") if local else None
    previous_token = os.environ.get(RUN_TOKEN)
    os.environ[RUN_TOKEN] = token
    reaper = _start_reaper(token, temp_dir) if local and temp_dir is not None else None
    try:
        try:
            ray.init(**ray_init_args(address, verbose, temp_dir))
        except (ConnectionError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"ray-address={address!r}: Ray did not start or connect ({first}); use 'local' for a private "
                "instance, or start the cluster first (ray start --head)"
            ) from None
        if _handling:  # ray.init sets a SIGTERM handler of its own (sys.exit), which skips the cleanup below
            install_signal_handlers()
        yield
    finally:
        try:
            ray.shutdown()
        finally:
            _stop_reaper(reaper)
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
            if previous_token is None:
                os.environ.pop(RUN_TOKEN, None)
            else:
                os.environ[RUN_TOKEN] = previous_token
