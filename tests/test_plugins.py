"""Bring your own model and data: `--model PKG.MODULE:FACTORY` and `--dataset PKG.MODULE:LOADER`.

Good plug-ins run whole experiments (in-process, and once on Ray); every bad one fails through the real
command line with exit code 2 and one line that names the value and the fix, before Ray starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedunlearn.config import build_config
from fedunlearn.data import DatasetStore, DataSpec, load_federated_data
from fedunlearn.errors import ConfigError
from fedunlearn.models import build_model, check_model_fits, register_model
from fedunlearn.plugins import is_plugin_path, load_callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.plugin_zoo` imports from the repository root, as with PYTHONPATH=. for a user
    sys.path.insert(0, str(ROOT))
from tests import plugin_zoo  # noqa: E402  (the module the plug-in paths below name: one module object)

ZOO = "tests.plugin_zoo"
SMALL = [
    "--num-clients",
    "3",
    "--rounds",
    "1",
    "--local-epochs",
    "1",
    "--methods",
    "retrain",
    "--no-shadow-mia",
    "--mia-attacks",
    "loss",
    "--quiet",
]


# ----- the loader and the factory, directly --------------------------------------------------


def test_plugin_path_syntax() -> None:
    assert is_plugin_path("pkg.mod:make") and is_plugin_path("a:b.c")
    for bad in ("cnn", "pkg.mod", ":make", "pkg.mod:", "a:b:c", "pkg mod:x", "1pkg:x", None):
        assert not is_plugin_path(bad)


def test_factory_builds_the_users_module() -> None:
    model = build_model(f"{ZOO}:tiny_net", (1, 6, 6), 3)
    assert isinstance(model, plugin_zoo.TinyNet)
    assert model(torch.zeros(5, 1, 6, 6)).shape == (5, 3)
    check_model_fits(f"{ZOO}:tiny_net", torch.zeros(2, 1, 6, 6), 3)


def test_check_model_fits_leaves_the_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    check_model_fits("cnn", torch.zeros(2, 1, 8, 8), 10)
    assert torch.equal(torch.rand(3), expected)


def test_registered_name_works_like_a_builtin() -> None:
    register_model("zoo-tiny", plugin_zoo.tiny_net)
    cfg = build_config("default", overrides={"model": "zoo-tiny"})
    assert cfg.model == "zoo-tiny"
    assert isinstance(build_model("zoo-tiny", (1, 6, 6), 3), plugin_zoo.TinyNet)
    with pytest.raises(ConfigError, match="auto"):
        register_model("auto", plugin_zoo.tiny_net)


def test_loader_data_is_what_the_loader_returned() -> None:
    """The loaded arrays reach FederatedData unchanged (no backdoor, no noise), whatever form each split had."""
    x, y, xt, yt = plugin_zoo.blobs_arrays()
    data = load_federated_data(DataSpec(dataset=f"{ZOO}:blobs_loader", num_clients=3, backdoor_client=None, trigger_size=2))
    assert data.num_classes == 3 and data.input_shape == (1, 6, 6)
    assert torch.equal(data.x_train, torch.from_numpy(x)) and torch.equal(data.y_train, torch.from_numpy(y).long())
    assert torch.equal(data.x_test, torch.from_numpy(xt)) and torch.equal(data.y_test, torch.from_numpy(yt).long())
    assert data.y_train.dtype == torch.int64 and data.x_train.dtype == torch.float32


def test_loader_data_gets_the_backdoor_like_a_builtin() -> None:
    spec = DataSpec(dataset=f"{ZOO}:blobs_loader", num_clients=3, backdoor_client=1, backdoor_target=2, trigger_size=2)
    data = load_federated_data(spec)
    _, y, _, _ = plugin_zoo.blobs_arrays()
    own = data.client_train[1]
    assert int(data.poisoned.sum()) == round(0.8 * int((y[own.numpy()] != 2).sum())) > 0
    assert torch.all(data.y_train[data.poisoned] == 2)
    assert torch.all(data.x_train[data.poisoned][..., -2:, -2:] == 1.0)


def test_loader_is_called_with_the_documented_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def spy(data_dir, download, seed):
        seen.update(data_dir=data_dir, download=download, seed=seed)
        return plugin_zoo.blobs_loader(data_dir, download, seed)

    monkeypatch.setattr(plugin_zoo, "spy", spy, raising=False)
    load_federated_data(DataSpec(dataset=f"{ZOO}:spy", data_dir="somewhere", num_clients=3, seed=5, trigger_size=2))
    assert seen == {"data_dir": "somewhere", "download": False, "seed": 5}


def test_load_callable_names_key_value_and_contract() -> None:
    with pytest.raises(ConfigError) as info:
        load_callable("dataset", f"{ZOO}:NOT_CALLABLE", "a function LOADER(...)")
    text = str(info.value)
    assert text.startswith(f"dataset='{ZOO}:NOT_CALLABLE'") and "type int, not callable" in text and "LOADER" in text


# ----- a whole experiment with the user's model and data ------------------------------------


def test_custom_model_and_loader_run_a_whole_experiment(tmp_path: Path) -> None:
    from simulations.runner import Experiment
    from strategies import app_config
    from strategies.client_app import build_client_app
    from strategies.local_grid import LocalGrid

    cfg = build_config(
        "default",
        overrides={
            "dataset": f"{ZOO}:blobs_loader",
            "model": f"{ZOO}:tiny_net",
            "num_clients": 3,
            "rounds": 3,
            "local_epochs": 2,
            "trigger_size": 2,
            "backdoor_target": 1,
            "methods": "retrain,iau",
            "shadow_mia": False,
            "mia_attacks": "loss",
            "partition": "dirichlet",
            "alpha": 1.0,
            "lr": 0.1,
        },
    )
    DatasetStore.clear()
    try:
        experiment = Experiment(cfg, out_dir=tmp_path / "out", show_progress=False)
        experiment.drive(LocalGrid(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))), cfg.num_clients))
    finally:
        DatasetStore.clear()
    results = experiment.results
    assert results["status"] == "complete"
    assert set(results["models"]) >= {"original", "retrain", "iau"}
    expected_params = sum(p.numel() for p in plugin_zoo.TinyNet((1, 6, 6), 3).parameters())
    assert results["num_parameters"] == expected_params == 4 * 9 + 4 + 4 * 36 * 3 + 3
    # The user's network learnt the user's task: three classes, chance is 1/3.
    assert results["models"]["original"]["acc_test"] > 0.8
    assert results["config"]["dataset"] == f"{ZOO}:blobs_loader"


# ----- bad input through the real command line ----------------------------------------------

M, D = "model", "dataset"
BAD = [
    # (arguments, the key=value the message must start with, the fix or reason it must name)
    (["--model", "tests.no_such_module:make"], M, "PYTHONPATH"),
    (["--model", "tests.plugin_broken_import:factory"], M, "No module named 'fedunlearn_test_dependency_that_does_not_exist'"),
    (["--model", f"{ZOO}:no_such_factory"], M, "has no attribute"),
    (["--model", f"{ZOO}:NOT_CALLABLE"], M, "not callable"),
    (["--model", f"{ZOO}:returns_list"], M, "not a torch.nn.Module"),
    (["--model", f"{ZOO}:int_params"], M, "floating point"),
    (["--model", f"{ZOO}:wrong_output"], M, "expected (2, 10)"),
    (["--model", f"{ZOO}:fixed_input"], M, "build the network for input_shape=(1, 8, 8)"),
    (["--model", f"{ZOO}:raises"], M, "this factory is broken"),
    (["--model", "vgg"], M, "PKG.MODULE:FACTORY"),
    (["--dataset", f"{ZOO}:float_labels"], D, "labels must be integers"),
    (["--dataset", f"{ZOO}:labels_out_of_range"], D, "train split: 1 labels outside [0, 3)"),
    (["--dataset", f"{ZOO}:negative_labels"], D, "test split: 1 labels outside [0, 3)"),
    (["--dataset", f"{ZOO}:int_inputs"], D, "x.float() / 255"),
    (["--dataset", f"{ZOO}:nan_inputs"], D, "NaN"),
    (["--dataset", f"{ZOO}:two_items"], D, "return (train, test, num_classes)"),
    (["--dataset", f"{ZOO}:mismatched_shapes"], D, "same (C, H, W)"),
    (["--dataset", f"{ZOO}:grey_without_channel"], D, "x[:, None]"),
    (["--dataset", f"{ZOO}:length_mismatch"], D, "one label per example"),
    (["--dataset", f"{ZOO}:old_signature"], D, "unexpected keyword argument 'download'"),
    (["--dataset", f"{ZOO}:nope"], D, "has no attribute"),
    (["--dataset", "imagenet"], D, "PKG.MODULE:LOADER"),
    # A plug-in dataset's classes and image size are known once it has loaded; then they meet the settings (named as the CLI spells them):
    (["--dataset", f"{ZOO}:blobs_loader", "--trigger-size", "2", "--backdoor-target", "5"], "backdoor-target=5", "[0, 3)"),
    (["--dataset", f"{ZOO}:blobs_loader", "--trigger-size", "7"], "trigger-size=7", "[1, 6]"),
    (
        ["--dataset", f"{ZOO}:blobs_loader", "--trigger-size", "2", "--partition", "pathological", "--classes-per-client", "4"],
        "classes-per-client=4",
        "use at most 3",
    ),
    (["--dataset", f"{ZOO}:blobs_loader", "--trigger-size", "2", "--num-clients", "200"], "num-clients=200", "use fewer clients"),
    (
        ["--num-clients", "10", "--partition", "dirichlet", "--alpha", "0.01", "--min-partition-size", "140"],
        "partition=dirichlet",
        "flwr-datasets says",
    ),
    (["--partition", "shard", "--shards-per-client", "1", "--shard-size", "500"], "partition=shard", "flwr-datasets says"),
    (
        ["--partition", "shard", "--shards-per-client", "1", "--shard-size", "1"],
        "partition=shard",
        "got 1 examples, every client needs at least 2",
    ),
    (["--partition", "sorted"], "partition", "iid, dirichlet, pathological, shard"),
    (["--min-partition-size", "1"], "min-partition-size=1", ">= 2"),
    (["--class-assignment", "round-robin"], "class-assignment", "first-deterministic"),
]
# Plug-in settings that fit (6x6 images take a trigger of 4, the default, and mcmahan-cnn's two 2x2 pools).
GOOD = [
    ["--dataset", f"{ZOO}:blobs_loader"],
    ["--dataset", f"{ZOO}:blobs_loader", "--model", "mcmahan-cnn", "--trigger-size", "2"],
    ["--dataset", f"{ZOO}:blobs_loader", "--model", f"{ZOO}:tiny_net", "--partition", "shard", "--trigger-size", "2"],
]


def _cli(args: list[str], out: Path) -> tuple[int, str]:
    import contextlib
    import io

    from simulations.run import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*SMALL, "--out", str(out), *args])
    return code, err.getvalue()


@pytest.mark.parametrize(("args", "key", "needle"), BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_plugin_input_exits_2_with_one_line(
    args: list[str], key: str, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from simulations.runner import Experiment

    def not_reached(self: Experiment) -> None:
        raise AssertionError("the set-up accepted the input: the experiment was about to start Ray")

    monkeypatch.setattr(Experiment, "run", not_reached)
    DatasetStore.clear()
    code, err = _cli(args, tmp_path / "out")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    # The key and the value the user gave, then the fix.
    start = f"error: {key}={args[args.index('--' + key) + 1]!r}" if key in (M, D) else f"error: {key}"
    assert lines[0].startswith(start), lines[0]
    assert needle in lines[0], lines[0]
    assert not ray.is_initialized()


@pytest.mark.parametrize("args", GOOD, ids=[" ".join(a) for a in GOOD])
def test_fitting_plugin_settings_pass_the_setup(args: list[str]) -> None:
    from simulations.run import build_parser, config_from_args
    from simulations.runner import Experiment

    cfg = config_from_args(build_parser().parse_args([*SMALL, *args]))
    Experiment(cfg, out_dir=None, show_progress=False)  # raises ConfigError if the set-up check refused it


def test_bad_model_through_python_m_in_a_subprocess(tmp_path: Path) -> None:
    """The real entry point, as a user runs it: exit code 2, one line on stderr, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", *SMALL, "--out", str(tmp_path / "out"), "--model", f"{ZOO}:wrong_output"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: model='{ZOO}:wrong_output': output on a batch of shape (2, 1, 8, 8) is (2, 11), expected (2, 10) "
        "(batch, num_classes=10): end the network with num_classes logits"
    ]


# ----- on Ray: the workers resolve the same strings -------------------------------------------


@pytest.mark.ray
def test_plugin_model_and_loader_on_ray(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.run",
            *SMALL,
            "--out",
            str(out),
            "--dataset",
            f"{ZOO}:blobs_loader",
            "--model",
            f"{ZOO}:tiny_net",
            "--trigger-size",
            "2",
            "--rounds",
            "2",
            "--local-epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete"
    assert results["num_parameters"] == sum(p.numel() for p in plugin_zoo.TinyNet((1, 6, 6), 3).parameters())
    # The workers trained the user's model on the user's data (in-process, the same settings reach 0.9; chance is 1/3).
    assert results["models"]["original"]["acc_test"] > 0.6
    assert results["models"]["retrain"]["cost"]["participations"] == 2 * 2


def test_data_arrays_match_reference_module() -> None:
    """The reference arrays the tests compare with are the loader's own (guards the zoo itself)."""
    x, y, xt, yt = plugin_zoo.blobs_arrays()
    (lx, ly), test, k = plugin_zoo.blobs_loader(None, False, 0)
    assert np.array_equal(x, lx) and np.array_equal(y, ly) and k == 3 and len(test) == len(yt)
