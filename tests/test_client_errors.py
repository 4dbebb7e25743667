"""Errors raised inside ClientApps are shown once, the client's own message first, not once per message and retry."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.client_errors import ClientErrors, client_message

# What Ray's RayTaskError prints for a ClientApp that raised (Flower's actor wraps it in ClientAppException "from ex").
RAY_TEXT = """ray::ClientAppActor.run() (pid=1, ip=192.0.2.2)
  File "torchvision/datasets/mnist.py", line 103, in __init__
    raise RuntimeError("Dataset not found. You can use download=True to download it")
RuntimeError: Dataset not found. You can use download=True to download it

The above exception was the direct cause of the following exception:

ray::ClientAppActor.run() (pid=1, ip=192.0.2.2)
  File "fedunlearn/data.py", line 307, in _load_torchvision
    raise FileNotFoundError(
FileNotFoundError: mnist not found in folder '/nonexistent' and download=False:
pass download=True

The above exception was the direct cause of the following exception:

ray::ClientAppActor.run() (pid=1, ip=192.0.2.2)
  File "flwr/simulation/ray_transport/ray_actor.py", line 65, in run
    raise ClientAppException(str(ex)) from ex
flwr.clientapp.client_app.ClientAppException:
Exception ClientAppException occurred. Message: mnist not found in folder '/nonexistent'"""


def test_the_clients_own_exception_is_named_not_its_wrappers():
    assert (
        client_message(RuntimeError(RAY_TEXT))
        == "FileNotFoundError: mnist not found in folder '/nonexistent' and download=False: pass download=True"
    )
    assert client_message(ValueError("bad shape")) == "bad shape"


def test_flowers_per_message_error_records_are_kept_once_and_counted(caplog):
    flwr = logging.getLogger("flwr")
    with ClientErrors() as errors:
        for _ in range(3):  # what Flower's engine logs for each failed message
            flwr.error("An exception was raised when processing a message by %s", "RayBackend")
            flwr.error(RuntimeError(RAY_TEXT))
            flwr.error("Traceback (most recent call last):\n  File ...\nRayTaskError")
        flwr.error("ActorPool is empty!!!")  # not a client's error: still shown
    assert errors.count == 3
    assert errors.first is not None and errors.first.startswith("FileNotFoundError: mnist not found")
    assert "ClientAppException" in (errors.first_traceback or "")
    assert errors.summary().startswith("a client failed: FileNotFoundError: mnist not found")
    assert [r.getMessage() for r in caplog.records] == ["ActorPool is empty!!!"]  # what passed the filter
    flwr.error(RuntimeError("after the run"))  # the filter is gone with the block
    assert [r.getMessage() for r in caplog.records][-1] == "after the run"


def run_cli(script: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    args = [
        "--preset",
        "smoke",
        "--model",
        "mlp",
        "--rounds",
        "3",
        "--num-clients",
        "3",
        "--methods",
        "retrain",
        "--no-shadow-mia",
        "--mia-attacks",
        "loss",
        "--quiet",
        "--out",
        str(tmp_path / "out"),
    ]
    return subprocess.run([sys.executable, *script, *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.ray
def test_every_client_failing_is_one_line_with_the_clients_message(tmp_path):
    proc = run_cli([str(Path(__file__).with_name("client_fail.py"))], tmp_path)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1, lines[:20]
    assert lines[0].startswith("error: a client failed: FileNotFoundError: mnist not found in folder '/nonexistent'"), lines[0]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["client_errors"]["count"] >= 1 and "ClientAppException" in results["client_errors"]["first_traceback"]


@pytest.mark.ray
def test_a_crashing_client_the_run_survives_is_one_line(tmp_path):
    proc = run_cli(["-m", "simulations.run", "--crash-client", "1", "--crash-round", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "client message" in line]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # One crash per training run that reaches round 2 (the original and retrain), each recorded as a failed reply.
    assert results["client_errors"]["count"] == results["reliability"]["failed_by_cause"]["crash"] == 2
    assert notes == [
        "[fedunlearn] 2 client messages failed during the run (first: strategies.faults.InjectedCrash: "
        "fault-injection: crash of client 1, round 2); see results.json: client_errors and reliability"
    ]
