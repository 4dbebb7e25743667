"""The server's own work around an unlearning round: what it must not count or repeat (issue 15, the round trip).

Each test names the waste it guards against: the simulator's stale-drift measurement counted as iau-cached's
seconds, the model hashed once per message instead of once per round (and the version sent then matching the
model sent), the template model decoded again at every correction step.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord
from test_distributed_iau import Setup

import strategies.iau_fed as iau_fed
from fedunlearn import costs
from fedunlearn.costs import CostMeter
from fedunlearn.deletion import DeletionRequest
from fedunlearn.iau import IAUSettings
from simulations.runner import Experiment
from strategies import app_config, keys
from strategies.client_app import build_client_app
from strategies.grid_wrapper import GridWrapper
from strategies.iau_fed import arrays_to_vector, vector_to_arrays
from strategies.local_grid import LocalGrid
from strategies.methods import iau as iau_method


class FakeClock:
    """perf_counter that moves only when told: walls computed from it are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_untimed_block_leaves_the_phase_wall(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(costs, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    meter = CostMeter()
    with meter.phase("unlearn:x"):
        clock.now += 2.0
        with meter.untimed():
            clock.now += 5.0
        clock.now += 1.0
    assert meter.get("unlearn:x").wall_s == 3.0  # 2 + 1; the 5 s inside untimed() are the simulator's


def test_iau_cached_wall_seconds_leave_out_the_stale_drift_measurement(small_cfg, tmp_path, monkeypatch):
    """The stale drift (a gradient over the pooled remaining data in the driver) is the simulator's, not the method's."""
    clock = FakeClock()
    monkeypatch.setattr(costs, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    measured = []

    def slow_drift(ctx, report):
        clock.now += 1000.0  # what the measurement costs, on the fake clock
        measured.append(len(report.step_arrays))
        return [0.25]

    monkeypatch.setattr(iau_method, "stale_drift", slow_drift)
    cfg = small_cfg.replace(methods=("iau-cached",), iau_steps=2, iau_refresh_every=0, shadow_mia=False)
    experiment = Experiment(cfg, out_dir=None, show_progress=False)
    experiment.drive(LocalGrid(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))), cfg.num_clients))
    entry = experiment.results["models"]["iau-cached"]
    assert measured == [2] and entry["unlearning"]["stale_drift"] == [0.25]  # measured, and reported
    assert entry["cost"]["wall_s"] == 0.0  # the fake clock moved only inside the measurement


class Recording(GridWrapper):
    """Keeps every message the server sends (the test reads what went out)."""

    def __init__(self, grid) -> None:
        super().__init__(grid)
        self.sent = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        return self._inner().send_and_receive(messages, timeout=timeout)


def sha256_version(arrays: ArrayRecord) -> str:
    """The model version by the documented rule (names and bytes of every array, in order), written here on its own."""
    digest = hashlib.sha256()
    for name in arrays:
        digest.update(name.encode())
        digest.update(arrays[name].data)
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("protocol", ["fresh", "cached"])
def test_gradient_queries_hash_the_model_once_per_round_and_send_its_version(small_cfg, tmp_path, monkeypatch, protocol):
    setup = Setup(small_cfg, tmp_path, IAUSettings(steps=2, step_rule="sgd", eta=0.5))
    setup.strategy.fill_caches(setup.grid, setup.arrays, upload=protocol == "cached")
    hashes = []
    real = iau_fed.model_version
    monkeypatch.setattr(iau_fed, "model_version", lambda arrays: hashes.append(1) or real(arrays))
    grid = Recording(setup.grid)
    request = DeletionRequest(client=1)
    forget = setup.directory.num_train[1]
    _, report = setup.strategy.unlearn(grid, setup.arrays, request, forget, protocol=protocol)

    queries = [m for m in grid.sent if m.metadata.message_type == keys.QUERY_GRADIENT]
    assert report.status == "complete" and report.rounds == 2
    # fresh: one message per client each step, cached: one to client u; the version each says must be its model's
    assert len(queries) == (2 * small_cfg.num_clients if protocol == "fresh" else 2)
    for message in queries:
        config = message.content.config_records[keys.CONFIG]
        assert config[keys.MODEL_VERSION] == sha256_version(message.content.array_records[keys.ARRAYS])
    # fresh: once per round; cached: step 1 reuses G_tot's version, step 2 hashes the new model once
    assert len(hashes) == (report.rounds if protocol == "fresh" else 1)


def test_vector_to_arrays_from_a_decoded_template_equals_from_the_record_and_leaves_it_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    record = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items()))
    from fedunlearn.gradients import ParamLayout

    layout = ParamLayout.of(model)
    template = record.to_torch_state_dict()
    kept = {k: v.clone() for k, v in template.items()}
    vector = torch.arange(layout.numel, dtype=torch.float64)
    from_record = vector_to_arrays(vector, record, layout)
    from_template = vector_to_arrays(vector, template, layout)
    assert list(from_template.keys()) == list(record.keys())
    for name in record:
        assert from_template[name].data == from_record[name].data, name  # byte-identical, buffers included
        assert torch.equal(template[name], kept[name]), name  # the template is not overwritten
    assert torch.equal(arrays_to_vector(from_template, layout), vector)
    assert torch.equal(arrays_to_vector(template, layout), arrays_to_vector(record, layout))


def test_profile_harness_miniature_attributes_a_call(tmp_path):
    """benchmarks/round_trip_profile.py in-process: every call the same model, and the profile adds up."""
    out = tmp_path / "profile.json"
    command = [
        sys.executable,
        "benchmarks/round_trip_profile.py",
        "--calls",
        "1",
        "--engine",
        "local",
        *("--set", "model=mlp", "--set", "rounds=1", "--set", "num-clients=3", "--set", "train-limit=300", "--set", "shadow-mia=false"),
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["same_model_every_call"] and result["rounds_per_call"] == 2  # K = 2 by default: two messages to u
    row = result["plain"][0]
    assert row["wall_s"] == pytest.approx(row["engine_s"] + row["stale_drift_s"] + row["server_own_s"])
    assert row["stale_drift_s"] > 0 and row["metered_wall_s"] < row["wall_s"] - row["stale_drift_s"] / 2
    profiled = result["profiled"]
    # the attribution splits the step's profiled time: nothing counted twice (the clients' code under the engine), nothing lost
    assert profiled["attributed_ms_per_call"] == pytest.approx(profiled["ms_per_call"], rel=0.02)
    assert any(f["function"] == "strategies/methods/iau.py:stale_drift" for f in profiled["functions_ms_per_call"])
