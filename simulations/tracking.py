"""Experiment tracking: per-round curves, every method's metrics and costs, and the report's files, to TensorBoard or MLflow.

Off by default (`--tracking off`). The driver logs, never the clients: the ServerApp that runs every phase lives in
the driver process, on Ray too. The runner calls a `Tracker` where it already reports progress and writes results;
the backends are optional extras, imported only when selected, so a missing package is a `ConfigError` when the
experiment is set up, before Ray starts.

What is logged, under the same names in both backends:
- `history/<run>/<metric>` at step = round: the curves of results.json's `history` (train_loss, acc_test, ...), for
  every training run (original, retrain, finetune, durability:<method>, ...); in a stream, the same run for a later
  request is `<run>-request-<n>`;
- `<model>/<metric>` at step = request (1 unless a stream): each model's numbers of results.json's `models`, nested
  ones joined by `/` (`iau/cost/wall_s`, `iau/speedup/wall`, `iau/mia/lira/auc`); what results.json holds as null is
  not logged;
- the configuration (MLflow params; a TensorBoard text), and the files: results.json/csv and, from the command line,
  the report (report.md, summary.json/csv, plots/*.png: MLflow artifacts; TensorBoard images and text).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedunlearn.config import ExperimentConfig
from fedunlearn.errors import ConfigError

if TYPE_CHECKING:
    from .runner import Experiment

# The package each backend imports, and the extra that installs it.
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
RESULT_FILES = ("results.json", "results.csv", "stream.csv")


class Tracker(Protocol):
    """Where the runner reports what it measures as it measures it."""

    def on_round(self, run: str, point: Mapping[str, float]) -> None:
        """One round of training run `run` (original, retrain, ...): its curve point, with its "round"."""

    def on_method(self, name: str, entry: Mapping[str, Any], step: int = 1) -> None:
        """A model's results entry (metrics, cost, speedup, storage, ...) after request `step`."""

    def on_files(self, paths: Iterable[Path]) -> None:
        """Files written for this experiment (results, report, plots); may be called after `finish`."""

    def finish(self, results: Mapping[str, Any]) -> None:
        """The experiment ended (results["status"] says how): log the results files and close; a second call does nothing."""


class NoTracker:
    """`--tracking off`: nothing is logged and nothing is written."""

    def on_round(self, run: str, point: Mapping[str, float]) -> None:
        """Nothing to log."""

    def on_method(self, name: str, entry: Mapping[str, Any], step: int = 1) -> None:
        """Nothing to log."""

    def on_files(self, paths: Iterable[Path]) -> None:
        """Nothing to log."""

    def finish(self, results: Mapping[str, Any]) -> None:
        """Nothing to close."""


def numbers(entry: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The finite numbers of a (nested) results entry as ("a/b/c", value); lists, strings and nulls are not metrics."""
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from numbers(value, f"{name}/")
        elif isinstance(value, (int, float)) and math.isfinite(value):
            yield name, float(value)


def curve(point: Mapping[str, float]) -> Iterator[tuple[str, float]]:
    """A history point's metrics without its step ("round")."""
    return ((key, value) for key, value in numbers(point) if key != "round")


class RunNames:
    """A training run whose rounds start again (the same run for the next request of a stream) is `<run>-request-<n>`.

    results.json appends it to the same history list; in a tracker the restarted steps would interleave with the first
    request's, and TensorBoard discards the points of a tag whose step goes back (it takes them for a crashed run's).
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}  # run -> (its latest round, how many times it started)

    def __call__(self, run: str, server_round: int) -> str:
        """The name the point of `run` at `server_round` is logged under."""
        last, starts = self._last.get(run, (server_round, 1))
        if server_round <= last and run in self._last:
            starts += 1
        self._last[run] = (server_round, starts)
        return run if starts == 1 else f"{run}-request-{starts}"


def _config_text(cfg: ExperimentConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)


class TensorBoardTracker:
    """Scalars, text and images in DIR/tensorboard (torch.utils.tensorboard's SummaryWriter; `tensorboard --logdir DIR`)."""

    def __init__(self, cfg: ExperimentConfig, logdir: Path) -> None:
        self.cfg = cfg
        self.logdir = logdir
        self._writer: Any = None
        self._finished = False
        self._names = RunNames()

    def _open(self) -> Any:
        if self._writer is None:  # opened at the first event: an experiment refused at setup writes nothing
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.logdir), flush_secs=30)
            if not self._finished:  # reopened for the report's files: the configuration is there already
                self._writer.add_text("config", f"```json\n{_config_text(self.cfg)}\n```")
        return self._writer

    def on_round(self, run: str, point: Mapping[str, float]) -> None:
        """Each curve value as history/<run>/<metric> at step = round."""
        writer, step = self._open(), int(point["round"])
        name = self._names(run, step)
        for key, value in curve(point):
            writer.add_scalar(f"history/{name}/{key}", value, global_step=step)

    def on_method(self, name: str, entry: Mapping[str, Any], step: int = 1) -> None:
        """Each number of the entry as <name>/<key> at step = request."""
        writer = self._open()
        for key, value in numbers(entry):
            writer.add_scalar(f"{name}/{key}", value, global_step=step)
        writer.flush()  # a finished method shows at once, not at the next periodic flush

    def on_files(self, paths: Iterable[Path]) -> None:
        """PNG plots as images (plots/<name>), Markdown as text; TensorBoard has no place for the other files."""
        from matplotlib.image import imread

        reopened = self._writer is None and self._finished
        writer = self._open()
        for path in paths:
            if path.suffix == ".png":
                writer.add_image(f"plots/{path.stem}", imread(path)[..., :3], dataformats="HWC")
            elif path.suffix == ".md":
                writer.add_text(path.stem, path.read_text())
        writer.flush()
        if reopened:
            self._close()

    def finish(self, results: Mapping[str, Any]) -> None:
        """Flush and close the event file."""
        if self._finished:
            return
        writer = self._open()
        for key, value in numbers(results.get("phases", {}), "phases/"):
            writer.add_scalar(key, value, global_step=1)
        writer.add_text("status", str(results.get("status", "?")))  # "complete" or "failed: <why>"
        self._close()
        self._finished = True

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MlflowTracker:
    """One MLflow run per experiment: params = the configuration, metrics with steps, artifacts = results and report."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path | None) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        if cfg.tracking_uri is not None:
            self.uri, self.artifact_root = cfg.tracking_uri, None  # the store's own artifact location
        else:
            assert out_dir is not None  # tracker_for refuses the local store without --out
            # MLflow's file store (./mlruns) refuses to open since 3.x unless told to; sqlite is its local default now.
            self.uri = f"sqlite:///{out_dir.resolve() / 'mlflow.db'}"
            self.artifact_root = (out_dir.resolve() / "mlartifacts").as_uri()
        self._client: Any = None
        self.run_id: str | None = None
        self._finished = False
        self._names = RunNames()

    def _open(self) -> tuple[Any, str]:
        if self._client is None or self.run_id is None:
            if not self.cfg.verbose:  # the store's table set-up and migration notices
                for name in ("mlflow", "alembic"):
                    logging.getLogger(name).setLevel(logging.WARNING)
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            if self.out_dir is not None and self.cfg.tracking_uri is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=self.uri)
            experiment = client.get_experiment_by_name(self.cfg.tracking_experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(self.cfg.tracking_experiment, artifact_location=self.artifact_root)
            )
            tags = {"fedunlearn.seed": str(self.cfg.seed)}
            if self.out_dir is not None:
                tags["fedunlearn.out"] = str(self.out_dir.resolve())
            run = client.create_run(experiment_id, run_name=self.out_dir.name if self.out_dir is not None else None, tags=tags)
            params = [
                Param(key, ",".join(map(str, value)) if isinstance(value, list) else str(value))
                for key, value in self.cfg.to_dict().items()
            ]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run.info.run_id, params=params[start : start + 100])
            self._client, self.run_id = client, run.info.run_id
        return self._client, self.run_id

    def _log(self, values: Iterable[tuple[str, float]], step: int) -> None:
        from mlflow.entities import Metric

        client, run_id = self._open()
        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, step) for key, value in values]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def on_round(self, run: str, point: Mapping[str, float]) -> None:
        """Each curve value as history/<run>/<metric> at step = round."""
        step = int(point["round"])
        name = self._names(run, step)
        self._log(((f"history/{name}/{key}", value) for key, value in curve(point)), step=step)

    def on_method(self, name: str, entry: Mapping[str, Any], step: int = 1) -> None:
        """Each number of the entry as <name>/<key> at step = request."""
        self._log(((f"{name}/{key}", value) for key, value in numbers(entry)), step=step)

    def on_files(self, paths: Iterable[Path]) -> None:
        """Each file as an artifact; plots under plots/ (logging to a finished run is allowed)."""
        client, run_id = self._open()
        for path in paths:
            client.log_artifact(run_id, str(path), artifact_path="plots" if path.suffix == ".png" else None)

    def finish(self, results: Mapping[str, Any]) -> None:
        """Log the results files and end the run: FINISHED when complete, FAILED otherwise."""
        if self._finished:
            return
        client, run_id = self._open()
        if self.out_dir is not None:
            self.on_files(p for p in (self.out_dir / name for name in RESULT_FILES) if p.exists())
        self._log(numbers(results.get("phases", {}), "phases/"), step=1)
        client.set_terminated(run_id, "FINISHED" if results.get("status") == "complete" else "FAILED")
        self._finished = True


def check_available(backend: str) -> None:
    """A selected backend whose package is missing: a ConfigError naming the extra to install."""
    package, extra = PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"--tracking {backend} needs the {package} package: pip install 'fedunlearn[{extra}]' (or --tracking off)")


def tracker_for(cfg: ExperimentConfig, out_dir: Path | None) -> Tracker:
    """The tracker --tracking selects, checked now (package installed, a place to write) and opened at its first event."""
    if cfg.tracking == "off":
        return NoTracker()
    check_available(cfg.tracking)
    if cfg.tracking == "tensorboard":
        if out_dir is None:
            raise ConfigError("--tracking tensorboard needs --out DIR: the events go to DIR/tensorboard")
        return TensorBoardTracker(cfg, out_dir / "tensorboard")
    if out_dir is None and cfg.tracking_uri is None:
        raise ConfigError("--tracking mlflow needs --out DIR (the local store DIR/mlflow.db) or --tracking-uri URI")
    return MlflowTracker(cfg, out_dir)


def report_files(out_dir: str | Path, summary: Mapping[str, Any]) -> list[Path]:
    """What the command line writes beside the experiments: report.md, summary.json/csv and the plots."""
    out = Path(out_dir)
    files = [out / name for name in ("report.md", "summary.json", "summary.csv")]
    return [p for p in files if p.exists()] + [Path(p) for p in summary.get("plots", [])]


def log_report(experiments: Iterable[Experiment], out_dir: str | Path, summary: Mapping[str, Any]) -> None:
    """Give each experiment's tracker its final results files and the report (every seed's run gets the report of all seeds)."""
    shared = report_files(out_dir, summary)
    for experiment in experiments:
        own = [experiment.out_dir / name for name in RESULT_FILES] if experiment.out_dir is not None else []
        experiment.tracker.on_files([p for p in own if p.exists()] + shared)
