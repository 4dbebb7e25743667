"""The plain Flower app in examples/flwr-app: its config, its ServerApp on the run config, and a real simulation.

The Ray test runs the example's own ServerApp and ClientApp with `flwr.simulation.run_simulation`
(no project runner) on the settings of its pyproject.toml, and applies the runner's removal checks.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedunlearn.errors import ConfigError
from strategies.app_config import default_cache_dir
from strategies.local_grid import LocalGrid

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flwr-app"
PYPROJECT = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
APP_CONFIG = PYPROJECT["tool"]["flwr"]["app"]["config"]
if str(EXAMPLE) not in sys.path:  # the example is a Flower app folder, not an installed package
    sys.path.insert(0, str(EXAMPLE))

from fedunlearn_app import client_app as example_client  # noqa: E402
from fedunlearn_app import server_app as example_server  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on this shared 2-core machine two threads made these in-process runs 8x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_checks(path: Path) -> dict:
    """The checks the ServerApp wrote; a missing file means the ServerApp failed (its log says why)."""
    assert path.exists(), f"the ServerApp wrote no checks to {path}: it failed (see the log above)"
    results = json.loads(path.read_text())
    shutil.rmtree(default_cache_dir(results["run_id"]), ignore_errors=True)  # the clients' gradient caches
    return results


def test_pyproject_declares_a_flower_app_whose_config_keys_are_the_runner_options():
    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedunlearn_app.server_app:app", "clientapp": "fedunlearn_app.client_app:app"}
    assert isinstance(example_server.app, ServerApp) and isinstance(example_client.app, ClientApp)
    cfg = example_server.example_config(APP_CONFIG)
    settings = cfg.to_dict()
    for key, value in APP_CONFIG.items():  # every key is a runner option and is taken as written
        expected = value.split(",") if key == "methods" else value
        assert settings[key] == expected, key
    # Legacy in Flower 1.41: `flwr run` would rewrite this file (see the example's README).
    assert "federations" not in PYPROJECT["tool"]["flwr"]


def test_unknown_or_bad_run_config_keys_are_errors_that_name_the_fix():
    with pytest.raises(ConfigError, match="unknown configuration key 'num-client'; did you mean 'num-clients'"):
        example_server.example_config({**APP_CONFIG, "num-client": 5})
    with pytest.raises(ConfigError, match="did you mean 'sgd'"):
        example_server.example_config(APP_CONFIG, {"iau-step-rule": "sdg"})
    with pytest.raises(ConfigError, match="this app runs retrain, iau, iau-cached"):
        example_server.example_config(APP_CONFIG, {"methods": "retrain,iau,federaser"})
    with pytest.raises(ConfigError, match="withdraw-round=5: this app withdraws after training"):
        example_server.example_config(APP_CONFIG, {"withdraw-round": 5})
    # Code overrides win over the run config (run_simulation's run config is empty; tests pass settings in).
    assert example_server.example_config({"rounds": 7}, {"rounds": 3}).rounds == 3


def test_run_script_is_valid_bash_and_sets_what_flwr_run_needs():
    script = (EXAMPLE / "run.sh").read_text()
    assert subprocess.run(["bash", "-n", str(EXAMPLE / "run.sh")], capture_output=True).returncode == 0
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in script and "--federation-config" in script
    assert "finished:completed" in script  # the exit code comes from the run's status, not from `flwr run`


def test_a_federation_of_the_wrong_size_fails_fast_with_the_fix():
    grid = LocalGrid(example_client.make_client_app(), 3)
    with pytest.raises(ConfigError, match="3 SuperNodes but num-clients=5.*num-supernodes=5"):
        example_server.wait_for_federation(grid, 5, timeout=30.0, settle=0.3)


def test_server_app_reads_the_run_config_as_flwr_run_delivers_it(tmp_path):
    """Both apps built without overrides read the pyproject config from their Contexts (in-process, no Ray)."""
    run_config = {**APP_CONFIG, "rounds": 3}  # what `flwr run . --run-config rounds=3` delivers
    grid = LocalGrid(example_client.app, int(APP_CONFIG["num-clients"]), run_id=4242)
    for context in grid.contexts.values():
        context.run_config = dict(run_config)
    server = example_server.make_server_app(results_path=tmp_path / "checks.json")
    server(grid, Context(run_id=4242, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)))
    results = load_checks(tmp_path / "checks.json")
    assert results["config"]["rounds"] == 3 and results["config"]["num-clients"] == APP_CONFIG["num-clients"]
    assert list(results["models"]) == ["retrain", "original", "iau", "iau-cached"]
    steps = int(results["config"].get("iau-steps", 2))
    assert results["unlearning"]["iau"]["protocol"] == "fresh" and results["unlearning"]["iau"]["rounds"] == steps  # a round per step
    assert results["unlearning"]["iau-cached"]["clients_asked"] == [APP_CONFIG["forget-client"]]
    # Both protocols move the model (the cached one from the aggregate cache: its later steps' g_r is stale, so the two
    # differ after the first step); the retrained model is the distance reference.
    assert results["models"]["iau"]["dist_para"] > 0 and results["models"]["iau-cached"]["dist_para"] > 0
    assert results["models"]["retrain"]["dist_para"] == 0.0 and results["models"]["original"]["dist_para"] > 0


@pytest.mark.ray
def test_example_app_removes_the_withdrawn_client_in_a_plain_flower_simulation(tmp_path, monkeypatch):
    """The example's apps on Flower's simulation engine, settings from its pyproject.toml: the backdoor goes."""
    from flwr.simulation import run_simulation

    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    num_clients = int(APP_CONFIG["num-clients"])
    assert num_clients == 5
    results_path = tmp_path / "checks.json"
    run_simulation(
        server_app=example_server.make_server_app(APP_CONFIG, results_path=results_path),
        client_app=example_client.make_client_app(APP_CONFIG),
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"address": "local", "include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False},
        },
    )
    results = load_checks(results_path)
    print("\n".join(example_server.summary_lines(results)))  # shown with pytest -s
    models = results["models"]
    original, retrain, iau, cached = (models[k] for k in ("original", "retrain", "iau", "iau-cached"))
    # The check can fail: client 0's backdoor was learned (most triggered inputs go to the target) and
    # retraining without client 0 does not learn it.
    assert original["backdoor_asr"] >= 0.5
    assert retrain["backdoor_asr"] <= 0.05
    # The README's criteria for a good step: ASR within 0.10 of retraining's, test accuracy within 0.03 of
    # the original's (the eta sweep in the README applies them to the default scenario).
    for unlearned in (iau, cached):
        assert unlearned["backdoor_asr"] <= retrain["backdoor_asr"] + 0.10
        # The deleted data looks less like training data to the loss-threshold attacker than before.
        assert unlearned["mia_auc"] < original["mia_auc"]
    assert iau["acc_test"] >= original["acc_test"] - 0.03
    # The cached protocol misses the accuracy criterion with the default steps (its g_r is stale after the first step
    # and it never repairs: README, "What this shows"); here it is only required to remove the backdoor.
    assert results["unlearning"]["iau"]["repair_rounds"] == 1 and results["unlearning"]["iau-cached"]["repair_rounds"] == 0
    assert results["unlearning"]["iau"]["clients_asked"] == list(range(num_clients))
    assert results["unlearning"]["iau-cached"]["clients_asked"] == [APP_CONFIG["forget-client"]]


def test_the_example_app_honours_the_retry_policy_of_its_run_config(tmp_path):
    """unlearn-retries from the run config: a remaining client whose first gradient reply fails is asked again."""
    from flwr.app import Message

    inner = example_client.make_client_app()
    failed: list[int] = []

    class FirstGradientFails(ClientApp):
        def __call__(self, message: Message, context: Context) -> Message:
            if message.metadata.message_type == "query.gradient" and int(context.node_config["partition-id"]) == 2 and not failed:
                failed.append(2)
                raise RuntimeError("transient failure")
            return inner(message, context)

    def run(retries: int) -> dict:
        run_config = {**APP_CONFIG, "rounds": 2, "methods": "iau", "unlearn-retries": retries}
        grid = LocalGrid(FirstGradientFails(), int(APP_CONFIG["num-clients"]), run_id=4343 + retries, capture_errors=True)
        for context in grid.contexts.values():
            context.run_config = dict(run_config)
        failed.clear()
        path = tmp_path / f"checks-{retries}.json"
        example_server.make_server_app(results_path=path)(
            grid, Context(run_id=4343 + retries, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
        )
        return load_checks(path)

    report = run(1)["unlearning"]["iau"]
    assert failed == [2] and report["status"] == "complete" and report["retries"] == 1
    assert [f["partition"] for f in report["failures"]] == [2]
    with pytest.raises(Exception, match="aborted"):  # no retry: unlearn-policy=abort (the default) leaves the model unchanged
        run(0)
