"""From the one ExperimentConfig to the typed settings each side needs (read once at the edge)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedunlearn.config import ExperimentConfig
from fedunlearn.data import DataSpec
from fedunlearn.deletion import DeletionRequest
from fedunlearn.iau import IAUSettings
from fedunlearn.models import default_model_for
from fedunlearn.secagg import SecAggSettings
from fedunlearn.training import TrainSettings

from .cohort import CohortGrid, build_cohort_client_app, cohort_size_of, num_cohorts
from .faults import FaultPlan
from .rounds import RoundPolicy
from .runtime import ClientSpec


def data_spec_for(cfg: ExperimentConfig) -> DataSpec:
    """The federated dataset of an experiment (the withdrawing client carries the backdoor)."""
    return DataSpec(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        download=cfg.download,
        num_clients=cfg.num_clients,
        partition=cfg.partition,
        alpha=cfg.alpha,
        min_partition_size=cfg.min_partition_size,
        self_balancing=cfg.self_balancing,
        classes_per_client=cfg.classes_per_client,
        class_assignment=cfg.class_assignment,
        shards_per_client=cfg.shards_per_client,
        shard_size=cfg.shard_size,
        heldout_fraction=cfg.heldout_fraction,
        train_limit=cfg.train_limit,
        seed=cfg.seed,
        backdoor_client=cfg.forget_client if cfg.backdoor else None,
        backdoor_fraction=cfg.backdoor_fraction,
        backdoor_target=cfg.backdoor_target,
        trigger_size=cfg.trigger_size,
        input_noise=cfg.input_noise,
    )


def model_name_for(cfg: ExperimentConfig) -> str:
    """The model architecture: `cfg.model`, or the dataset's default for `auto`."""
    return default_model_for(cfg.dataset) if cfg.model == "auto" else cfg.model


def device_for(cfg: ExperimentConfig) -> str:
    """`auto` becomes cuda when a GPU is visible and asked for, else cpu."""
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() and cfg.num_gpus_per_client > 0 else "cpu"


def default_cache_dir(run_id: int | str) -> str:
    """Where clients of run `run_id` keep gradient caches unless told otherwise (node-local, same in every worker)."""
    return os.path.join(tempfile.gettempdir(), "fedunlearn-caches", f"run-{run_id}")


def client_spec_for(cfg: ExperimentConfig, cache_dir: str) -> ClientSpec:
    """What every worker needs to serve any client of this experiment."""
    return ClientSpec(
        data=data_spec_for(cfg), model=model_name_for(cfg), cache_dir=cache_dir, cache_dtype=cfg.cache_dtype, device=device_for(cfg)
    )


def train_settings_for(cfg: ExperimentConfig) -> TrainSettings:
    """Local training settings."""
    return TrainSettings(
        epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size, optimizer=cfg.optimizer, momentum=cfg.momentum, gr_alpha=cfg.gr_alpha
    )


def iau_settings_for(cfg: ExperimentConfig, correction: bool = True) -> IAUSettings:
    """IAU correction settings (`correction=False` is plain gradient ascent)."""
    return IAUSettings(
        eta=cfg.iau_eta,
        steps=cfg.iau_steps,
        step_rule=cfg.iau_step_rule,
        correction=correction,
        radius=cfg.iau_radius,
        correction_weight=cfg.iau_correction_weight,
        per_layer=cfg.iau_per_layer,
        calibrate=cfg.iau_calibrate,
        refresh_every=cfg.iau_refresh_every,
    )


def deletion_request_for(cfg: ExperimentConfig) -> DeletionRequest:
    """The experiment's deletion request."""
    return DeletionRequest(
        client=cfg.forget_client,
        samples=cfg.forget_samples,
        fraction=cfg.forget_fraction if cfg.forget_samples == "random" else 1.0,
        at_round=cfg.withdraw_round,
    )


def deletion_requests_for(cfg: ExperimentConfig) -> tuple[DeletionRequest, ...]:
    """Every request of the experiment in arrival order: --forget-client's, then one per --stream-clients entry."""
    first = deletion_request_for(cfg)
    return (first, *(DeletionRequest(client=c, samples=first.samples, fraction=first.fraction) for c in cfg.stream_clients))


def fault_plan_for(cfg: ExperimentConfig) -> FaultPlan:
    """The faults injected into the clients of this run (none by default); seeded by the run's seed."""
    return FaultPlan(
        seed=cfg.seed,
        dropout_prob=cfg.dropout_prob,
        crash_client=cfg.crash_client,
        crash_round=cfg.crash_round,
        slow_clients=tuple(cfg.slow_clients),
        slow_seconds=cfg.slow_seconds,
        offline_client=cfg.forget_client if cfg.withdrawing_offline else None,
        malicious_client=cfg.malicious_client,
        malicious_norm=cfg.malicious_norm,
    )


def round_policy_for(cfg: ExperimentConfig) -> RoundPolicy:
    """Retries, the missing-client policy and the gradient-norm bound of caching and unlearning rounds."""
    return RoundPolicy(
        retries=cfg.unlearn_retries,
        on_missing=cfg.unlearn_policy,
        norm_bound=cfg.gradient_norm_bound,
        norm_action=cfg.gradient_norm_action,
        secure=SecAggSettings(cfg.gradient_norm_bound, cfg.secagg_threshold) if cfg.secure_aggregation else None,
    )


def supernode_app(cfg: ExperimentConfig, spec: ClientSpec, client_app: ClientApp) -> tuple[ClientApp, int]:
    """The ClientApp every SuperNode runs and how many SuperNodes: one per client, or one per cohort (--execution cohort)."""
    if cfg.execution != "cohort":
        return client_app, cfg.num_clients
    size = cohort_size_of(cfg)
    vectorise = cohort_train_of(cfg) == "vmap"
    return build_cohort_client_app(spec, size, inner=client_app, vectorise=vectorise), num_cohorts(cfg.num_clients, size)


def server_grid(cfg: ExperimentConfig, grid: Grid) -> tuple[Grid, dict[str, Any]]:
    """The grid the strategies drive, and a record of the execution for results.json.

    Sets the poll interval of Flower's in-memory grid; in cohort mode wraps it in a CohortGrid that
    shows the strategies one virtual node per client (meter the returned grid: counts stay per client).
    """
    if hasattr(grid, "pull_interval"):  # flwr's InMemoryGrid sleeps this long between polls for replies
        grid.pull_interval = cfg.grid_poll_interval
    if cfg.execution != "cohort":
        return grid, {"mode": "per-node", "cohort_size": 1, "supernodes": cfg.num_clients}
    size = cohort_size_of(cfg)
    return (
        CohortGrid(grid, cfg.num_clients, size, timeout=cfg.round_timeout),
        {"mode": "cohort", "cohort_size": size, "supernodes": num_cohorts(cfg.num_clients, size), "train": cohort_train_of(cfg)},
    )


def cohort_train_of(cfg: ExperimentConfig) -> str:
    """How cohorts train in this experiment: vmap or loop (auto resolves by device: vmap on CUDA, loop on a CPU)."""
    if cfg.cohort_train != "auto":
        return cfg.cohort_train
    return "vmap" if device_for(cfg).startswith("cuda") else "loop"
