"""End to end on Flower's simulation engine (Ray), through the command line, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from simulations.results import METRIC_KEYS


@pytest.mark.ray
def test_smoke_preset_on_ray_with_five_clients(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--preset", "smoke", "--rounds", "3", "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete"
    assert results["config"]["num-clients"] == 5
    assert set(results["models"]) == {"original", "retrain", "iau", "iau-cached"}
    for model in results["models"].values():
        assert all(key in model for key in METRIC_KEYS)
    assert results["models"]["retrain"]["cost"]["participations"] == 3 * 4
    assert results["models"]["iau"]["cost"]["rounds"] == 3  # two correction rounds and one repair round (the defaults)
    assert results["models"]["iau-cached"]["unlearning"]["clients_asked"] == [0]
    assert "iau-cached" in proc.stdout  # the printed table


@pytest.mark.ray
def test_cohort_mode_and_a_stream_on_ray(tmp_path):
    """Two SuperNodes host five virtual clients; two withdrawals in sequence; counts stay per virtual client."""
    out = tmp_path / "out"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.run",
            "--preset",
            "smoke",
            "--rounds",
            "2",
            "--execution",
            "cohort",
            "--cohort-size",
            "3",
            "--stream-clients",
            "2",
            "--no-shadow-mia",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete"
    assert results["execution"] == {
        "mode": "cohort",
        "cohort_size": 3,
        "supernodes": 2,
        "train": "loop",  # auto on a CPU
        "engine_pickup_interval_s": 0.005,
    }  # the engine looks for messages every 5 ms, not 0.1 s
    assert [step["request"]["client"] for step in results["stream"]] == [0, 2]
    first, second = (step["models"] for step in results["stream"])
    assert first["retrain"]["cost"]["participations"] == 2 * 4 and second["retrain"]["cost"]["participations"] == 2 * 3
    assert first["iau"]["unlearning"]["clients_asked"] == [0, 1, 2, 3, 4]
    assert second["iau"]["unlearning"]["clients_asked"] == [1, 2, 3, 4]
    assert second["iau-cached"]["unlearning"]["clients_asked"] == [2]
    assert results["models"]["iau"]["cost"]["rounds"] == 2 * 3  # the headline charges the whole stream: 3 rounds per request
