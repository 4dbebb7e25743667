"""Every method's message round goes through one reply pipeline: error replies are retried, then recorded, never dropped."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedunlearn.config import build_config
from simulations.runner import Experiment
from strategies import app_config, keys
from strategies.client_app import build_client_app
from strategies.local_grid import LocalGrid


class Failing(ClientApp):
    """Wraps a ClientApp; raises for the first `times[type]` messages of each listed message type (-1: always)."""

    def __init__(self, inner: ClientApp, times: dict[str, int]) -> None:
        super().__init__()
        self.inner = inner
        self.left = dict(times)
        self.seen: dict[str, int] = {}

    def __call__(self, message: Message, context: Context) -> Message:
        kind = message.metadata.message_type
        self.seen[kind] = self.seen.get(kind, 0) + 1
        if self.left.get(kind, 0) != 0:
            self.left[kind] -= 1
            raise RuntimeError(f"disk full while serving {kind}")
        return self.inner(message, context)


def run(tmp_path, times: dict[str, int], methods: str = "retrain,pga,imu") -> tuple[dict, Failing]:
    cfg = build_config("smoke", overrides={"model": "mlp", "rounds": 2, "methods": methods, "pga_rounds": 0, "shadow_mia": False})
    experiment = Experiment(cfg, out_dir=None, show_progress=False)
    app = Failing(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))), times)
    experiment.drive(LocalGrid(app, cfg.num_clients, capture_errors=True))
    experiment.results["reliability"] = experiment._reliability()
    return experiment.results, app


def test_a_failed_pga_or_imu_reply_is_retried_and_the_retry_is_used(tmp_path):
    results, app = run(tmp_path, {keys.QUERY_PGA: 1, keys.QUERY_IMU: 2})
    assert app.seen[keys.QUERY_PGA] == 2 and app.seen[keys.QUERY_IMU] == 3  # cfg.unlearn_retries = 2 by default
    for name, retries in (("pga", 1), ("imu", 2)):
        model = results["models"][name]
        assert model["status"] == "complete", model
        assert model["unlearning"]["retries"] == retries
        assert len(model["unlearning"]["failures"]) == retries
        assert "disk full" in model["unlearning"]["failures"][0]["reason"]
    assert results["reliability"]["failed_by_phase"] == {"unlearn": 3}


def test_a_pga_or_imu_reply_that_stays_failed_is_recorded_with_the_clients_reason(tmp_path):
    results, app = run(tmp_path, {keys.QUERY_PGA: -1, keys.QUERY_IMU: -1})
    assert app.seen[keys.QUERY_PGA] == 3 and app.seen[keys.QUERY_IMU] == 3
    for name in ("pga", "imu"):
        model = results["models"][name]
        assert model["status"] == "failed"
        assert "did not answer" in model["error"] and "disk full" in model["error"], model["error"]
        assert len(model["unlearning"]["failures"]) == 3 and model["unlearning"]["missing_clients"] == [0]
        assert model["dist_para"] == results["models"]["original"]["dist_para"]  # the model is left unchanged
    assert results["reliability"]["methods"]["pga"]["status"] == "failed"
    assert results["reliability"]["failed_replies"] == 6


class FailingCalibration(ClientApp):
    """Fails the first train message of partition 2 that asks for 1 local epoch (FedEraser's calibration; training asks 2)."""

    def __init__(self, inner: ClientApp) -> None:
        super().__init__()
        self.inner = inner
        self.failed = 0

    def __call__(self, message: Message, context: Context) -> Message:
        if (
            message.metadata.message_type == keys.TRAIN
            and int(context.node_config["partition-id"]) == 2
            and not self.failed
            and message.content.config_records[keys.CONFIG][keys.EPOCHS] == 1
        ):
            self.failed += 1
            raise RuntimeError("out of memory in calibration")
        return self.inner(message, context)


def test_federaser_calibration_retries_a_failed_client_and_records_it(tmp_path):
    cfg = build_config(
        "smoke", overrides={"model": "mlp", "rounds": 3, "methods": "retrain,federaser", "federaser_interval": 1, "shadow_mia": False}
    )
    assert cfg.local_epochs == 2
    experiment = Experiment(cfg, out_dir=None, show_progress=False)
    app = FailingCalibration(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))))
    experiment.drive(LocalGrid(app, cfg.num_clients, capture_errors=True))
    report = experiment.results["models"]["federaser"]["unlearning"]
    assert app.failed == 1
    assert report["retries"] == 1 and "missing" not in report  # asked again, answered, used
    assert [f["partition"] for f in report["failures"]] == [2] and "out of memory" in report["failures"][0]["reason"]
    assert report["calibration_rounds"] == 2
