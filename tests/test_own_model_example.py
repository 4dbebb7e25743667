"""examples/own-model: a quickstart-style Flower app with its own CNN and data, FedAvg training, then IAU-Fed unlearning.

The app's ClientApp is Flower's plain one plus `strategies.add_unlearning`; its ServerApp trains with Flower's own
`FedAvg` and unlearns client 0 (a backdoor) with both protocols. Run in-process (LocalGrid) and on Flower's
simulation engine (`run_simulation`, Ray); the checks are the backdoor's attack success rate before and after.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from strategies.local_grid import LocalGrid

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own-model"
if str(EXAMPLE) not in sys.path:  # a Flower app folder, not an installed package
    sys.path.insert(0, str(EXAMPLE))

from ownmodel import client_app, server_app  # noqa: E402

ROUNDS = 10


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check(results: dict[str, dict[str, float]]) -> None:
    """Client 0's backdoor was learned by FedAvg and is gone after either protocol; the model still classifies."""
    assert results["trained"]["backdoor_asr"] >= 0.8, results  # can fail: the backdoor must have been learned first
    # The cached protocol (no repair round, a stale remaining-data term) loses the most accuracy, and on Flower's engine
    # its figure varies from run to run (Flower's plain FedAvg sums replies in arrival order; seen: 0.49 to 0.59):
    # its bound is three times chance, the fresh protocol's five times.
    for protocol, least in (("fresh", 0.5), ("cached", 0.3)):
        assert results[protocol]["backdoor_asr"] <= 0.1, (protocol, results)
        assert results[protocol]["acc_test"] >= least, (protocol, results)  # 10 classes: chance is 0.1


def test_own_model_example_unlearns_in_process():
    server_app.results.clear()
    grid = LocalGrid(client_app.app, 4)
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"num-server-rounds": ROUNDS}))
    check(server_app.results)


@pytest.mark.ray
def test_own_model_example_unlearns_on_flowers_simulation_engine(monkeypatch):
    from flwr.simulation import run_simulation

    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray's workers import the app's modules: they must find the example folder (and this checkout) too.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLE), str(EXAMPLE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    server_app.results.clear()
    run_simulation(
        server_app=server_app.app,
        client_app=client_app.app,
        num_supernodes=4,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"address": "local", "include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False},
        },
    )
    check(server_app.results)


def test_readme_counts_the_lines_added_for_unlearning():
    """The README's count is the number of lines marked `# unlearning` in the app's files, and at most 15."""
    marked = sum(
        1
        for name in ("client_app.py", "server_app.py")
        for line in (EXAMPLE / "ownmodel" / name).read_text().splitlines()
        if "# unlearning" in line
    )
    stated = re.search(r"(\d+) lines? added for unlearning", (EXAMPLE / "README.md").read_text())
    assert stated is not None and int(stated.group(1)) == marked <= 15
