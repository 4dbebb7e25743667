"""A new client-side method is its own file and a test: examples/toy-method/local_ascent.py, run by the whole runner."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fedunlearn.config import build_config
from simulations.runner import Experiment
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.local_grid import LocalGrid
from strategies.methods import registry_scope

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy-method" / "local_ascent.py"


@pytest.fixture
def toy():
    """The toy method's module, registered for this test only (the registry is restored after it)."""
    spec = importlib.util.spec_from_file_location("local_ascent", TOY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_ascent"] = module  # dataclasses look their module up there
    with registry_scope():
        spec.loader.exec_module(module)
        yield module
    del sys.modules["local_ascent"]


def test_the_toy_method_runs_through_the_runner_from_its_one_file(toy, tmp_path):
    torch.set_num_threads(1)
    cfg = build_config("smoke", overrides={"model": "mlp", "rounds": 2, "methods": "retrain,local-ascent", "shadow_mia": False})
    app = build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches")))
    assert "query.local_ascent" in app._registered_funcs  # attached from the registry, named nowhere else
    experiment = Experiment(cfg, out_dir=None, show_progress=False)
    experiment.drive(LocalGrid(app, cfg.num_clients))
    models = experiment.results["models"]
    toy_entry, original = models["local-ascent"], models["original"]
    assert toy_entry["status"] == "complete"
    assert toy_entry["cost"]["rounds"] == 1 and toy_entry["cost"]["participations"] == 1  # client u alone, once
    assert toy_entry["dist_para"] != original["dist_para"]  # the model changed ...
    assert toy_entry["acc_deleted"] < original["acc_deleted"]  # ... and fits the forgotten data worse


def test_the_toy_settings_survive_the_wire(toy):
    settings = toy.LocalAscentSettings(lr=0.2, epochs=7)
    assert toy.LocalAscentSettings.from_record(settings.to_record()) == settings
