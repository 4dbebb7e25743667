"""--tracking: what reaches TensorBoard and MLflow, read back through their own readers, equals results.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedunlearn.config import build_config
from fedunlearn.errors import ConfigError
from simulations.checkpoint import differing_settings
from simulations.run import main
from simulations.runner import Experiment
from simulations.summary import write_summary
from simulations.tracking import log_report
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.local_grid import LocalGrid

# Small and quick: 5 clients, 3 rounds, an MLP, two methods; the probe and the costly attacks off.
SETTINGS = {"model": "mlp", "rounds": 3, "methods": "retrain,iau", "shadow-mia": False, "mia-attacks": "loss", "relearn-steps": 0}


def drive(tmp_path: Path, **overrides: object) -> tuple[Experiment, dict]:
    """One experiment in-process (LocalGrid), then the command line's report and its hand-over to the tracker."""
    cfg = build_config("smoke", overrides={**SETTINGS, **overrides})
    out = tmp_path / "out"
    experiment = Experiment(cfg, out_dir=out, show_progress=False)
    experiment.drive(LocalGrid(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))), cfg.num_clients))
    results = json.loads((out / "results.json").read_text())
    summary = write_summary(out, [results], "tracking test")
    log_report([experiment], out, summary)
    return experiment, results


def curves(results: dict) -> dict[str, list[tuple[int, float]]]:
    """results.json's history as {history/<run>/<metric>: [(round, value), ...]}: the reference the stores must hold.

    A run's list that starts again at a lower round (its next request in a stream) continues as <run>-request-2, ...
    """
    expected: dict[str, list[tuple[int, float]]] = {}
    for run, points in results["history"].items():
        starts, previous = 1, None
        for point in points:
            if previous is not None and point["round"] <= previous:
                starts += 1
            previous = point["round"]
            name = run if starts == 1 else f"{run}-request-{starts}"
            for key, value in point.items():
                if key != "round" and value is not None:
                    expected.setdefault(f"history/{name}/{key}", []).append((point["round"], value))
    return expected


def test_tensorboard_holds_the_curves_the_method_metrics_and_the_plots(tmp_path):
    """A stream of two requests: every method's numbers at step 1 and 2, the restarted runs under their own names."""
    pytest.importorskip(
        "tensorboard", reason="--tracking tensorboard needs the tensorboard package (pip install 'fedunlearn[tensorboard]')"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, results = drive(tmp_path, tracking="tensorboard", **{"stream-clients": "2"})
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    expected = curves(results)
    assert {
        "history/original/train_loss",
        "history/original/acc_test",
        "history/retrain/acc_test",
        "history/retrain-request-2/acc_test",
    } <= set(expected)
    assert {t for t in tags["scalars"] if t.startswith("history/")} == set(expected)
    for tag, points in expected.items():
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [r for r, _ in points], tag  # one step per round, numbered as the rounds
        # TensorBoard stores float32: the same number, rounded once.
        assert [e.value for e in logged] == [float(np.float32(v)) for _, v in points], tag
    assert len(events.Scalars("history/original/acc_test")) == len(events.Scalars("history/retrain-request-2/acc_test")) == 3
    first, second = (request["models"] for request in results["stream"])
    for name, key in (
        ("iau", "acc_test"),
        ("iau", "backdoor_asr"),
        ("original", "acc_test"),
        ("retrain", "mia_auc"),
        ("iau", "cost/wall_s"),
        ("iau", "cost/rounds"),
        ("iau", "cost/bytes_up"),
        ("iau", "speedup/wall"),
    ):
        path = key.split("/")
        values = [model[name] for model in (first, second)]
        for part in path:
            values = [value[part] for value in values]
        assert [(e.step, e.value) for e in events.Scalars(f"{name}/{key}")] == [
            (1, float(np.float32(values[0]))),
            (2, float(np.float32(values[1]))),
        ], key
    plots = sorted(p.stem for p in (tmp_path / "out" / "plots").glob("*.png"))  # what the report drew, on disk
    assert plots and sorted(t.removeprefix("plots/") for t in tags["images"]) == plots
    assert {"config/text_summary", "status/text_summary", "report/text_summary"} <= set(tags["tensors"])


def test_mlflow_holds_one_run_with_the_config_the_curves_the_metrics_and_the_files(tmp_path):
    pytest.importorskip("mlflow", reason="--tracking mlflow needs the mlflow package (pip install 'fedunlearn[mlflow]')")
    from mlflow.tracking import MlflowClient

    experiment, results = drive(tmp_path, tracking="mlflow")
    out = tmp_path / "out"
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")  # the default local store, under --out
    store = client.get_experiment_by_name("fedunlearn")
    assert store is not None
    [run] = client.search_runs([store.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "out"
    assert run.data.params["rounds"] == "3" and run.data.params["methods"] == "retrain,iau"
    assert set(run.data.params) == set(experiment.cfg.to_dict())
    expected = curves(results)
    assert {k for k in run.data.metrics if k.startswith("history/")} == set(expected)
    for key, points in expected.items():
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == points, key  # float64 both sides: exactly the same numbers
    assert len(client.get_metric_history(run_id, "history/retrain/acc_test")) == 3
    iau = results["models"]["iau"]
    for key, value in (
        ("iau/acc_test", iau["acc_test"]),
        ("iau/cost/wall_s", iau["cost"]["wall_s"]),
        ("iau/cost/participations", iau["cost"]["participations"]),
        ("iau/speedup/rounds", iau["speedup"]["rounds"]),
        ("original/backdoor_asr", results["models"]["original"]["backdoor_asr"]),
        ("iau/storage/client_bytes", iau["storage"]["client_bytes"]),
        ("phases/training/rounds", results["phases"]["training"]["rounds"]),
    ):
        [metric] = client.get_metric_history(run_id, key)
        assert (metric.step, metric.value) == (1, value), key
    files = {f.path for f in client.list_artifacts(run_id)}
    assert {"results.json", "results.csv", "report.md", "summary.json", "plots"} <= files
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert plots and {Path(f.path).name for f in client.list_artifacts(run_id, "plots")} == plots
    logged = json.loads(Path(client.download_artifacts(run_id, "results.json", str(tmp_path))).read_text())
    assert logged == results


def test_tracking_off_writes_nothing_and_imports_neither_backend(tmp_path):
    """In a fresh interpreter: the default run leaves only its results in --out, and no backend is imported."""
    script = textwrap.dedent(f"""
        import json
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_tracking import drive
        experiment, _ = drive(Path({str(tmp_path)!r}))
        print(json.dumps(sorted(p.name for p in (Path({str(tmp_path)!r}) / "out").iterdir())))
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("mlflow", "tensorboard", "tensorboardX")
                                or m.startswith("torch.utils.tensorboard"))))
    """)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written, imported = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert written == ["plots", "report.md", "results.csv", "results.json", "summary.csv", "summary.json"]
    assert imported == []


@pytest.mark.parametrize("backend, package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_backend_is_one_config_line_and_exit_2(tmp_path, monkeypatch, capsys, backend, package):
    monkeypatch.setitem(sys.modules, package, None)  # what an environment without the extra looks like to import
    cfg = build_config("smoke", overrides={"tracking": backend})
    with pytest.raises(ConfigError, match=rf"--tracking {backend} needs the {package} package: pip install 'fedunlearn\[{backend}\]'"):
        Experiment(cfg, out_dir=tmp_path / "out", show_progress=False)
    assert main(["--preset", "smoke", "--tracking", backend, "--out", str(tmp_path / "cli"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --tracking {backend} needs the {package} package") and "Traceback" not in err
    assert not (tmp_path / "cli").exists()  # refused before anything ran or was written


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tracking": "tensorbord"}, r"tracking='tensorbord': must be one of off, tensorboard, mlflow \(did you mean 'tensorboard'\?\)"),
        ({"tracking-uri": "http://localhost:5000"}, r"tracking-uri='http://localhost:5000' has no effect with tracking='off'"),
        (
            {"tracking": "tensorboard", "tracking-experiment": "x"},
            r"tracking-experiment='x' has no effect with tracking='tensorboard'.*DIR/tensorboard",
        ),
        ({"tracking": "mlflow", "tracking-experiment": " "}, r"tracking-experiment='': name the MLflow experiment"),
    ],
)
def test_bad_tracking_settings_name_the_key_and_the_fix(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_config("smoke", overrides=settings)


def test_tracking_needs_a_place_to_write():
    cfg = build_config("smoke", overrides={"tracking": "tensorboard"})
    with pytest.raises(ConfigError, match=r"--tracking tensorboard needs --out DIR"):
        Experiment(cfg, out_dir=None, show_progress=False)
    pytest.importorskip("mlflow")
    with pytest.raises(ConfigError, match=r"--tracking mlflow needs --out DIR .* or --tracking-uri URI"):
        Experiment(cfg.replace(tracking="mlflow"), out_dir=None, show_progress=False)


def test_resume_may_turn_tracking_on_even_from_a_checkpoint_that_predates_it():
    saved = {k: v for k, v in build_config("smoke").to_dict().items() if not k.startswith("tracking")}
    assert (
        differing_settings(
            saved, build_config("smoke", overrides={"tracking": "mlflow", "tracking-uri": "http://localhost:5000"}).to_dict()
        )
        == {}
    )
    # what the run computes still has to match
    assert set(differing_settings(saved, build_config("smoke", overrides={"tracking": "mlflow", "rounds": 2}).to_dict())) == {"rounds"}


@pytest.mark.ray
def test_the_command_line_on_ray_logs_from_the_driver(tmp_path):
    """`python -m simulations.run --tracking tensorboard`: the ServerApp's process logs every round and the report's plots."""
    pytest.importorskip("tensorboard", reason="--tracking tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
            "--methods",
            "retrain,iau-cached",
            "--no-shadow-mia",
            "--relearn-steps",
            "0",
            "--tracking",
            "tensorboard",
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
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for tag, points in curves(results).items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(r, float(np.float32(v))) for r, v in points], tag
    [event] = events.Scalars("iau-cached/acc_test")
    assert event.value == float(np.float32(results["models"]["iau-cached"]["acc_test"]))
    assert {f"plots/{p.stem}" for p in (out / "plots").glob("*.png")} == set(events.Tags()["images"])
