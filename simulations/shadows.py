"""Shadow models for membership inference, trained the way the target was: federated, in-process, same pipeline.

A shadow run is the experiment's own training (UnlearningFedAvg through the same ClientApp, model,
optimiser, local epochs, rounds, batch size and client sampling rule) on the same clients' data, except
that each example of the candidate pool (members and non-members of the scored sets) trains with the
client holding it in a random half of the shadows only (Carlini et al. 2022). It runs on an in-process
LocalGrid: no Ray, no metering, no fault injection. For U-LiRA (Hayes et al. 2024) every shadow then
unlearns its own pool members with method M, through the method's registered code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.supercore.task_identity import TaskIdentity

from fedunlearn.config import ExperimentConfig
from fedunlearn.data import DatasetStore, FederatedData
from fedunlearn.deletion import DeletionRequest, forget_indices
from fedunlearn.errors import FedUnlearnError
from fedunlearn.gradients import ParamLayout
from fedunlearn.lira import GaussianFits, fit_gaussians, leave_one_out_scores, lira_scores, model_logit_confidence, split_halves
from fedunlearn.mia import ShadowAttack
from fedunlearn.models import build_model
from strategies import app_config
from strategies.client_app import ClientRuntime, ClientSpec, build_client_app
from strategies.fedavg import UnlearningFedAvg, discover_clients
from strategies.iau_fed import IAUFed
from strategies.local_grid import LocalGrid
from strategies.update_recorder import fan_out

from .methods import Method, MethodContext
from .progress import Progress

# Below this many shadows one variance for all examples beats per-example variances (Carlini et al. 2022, section VI).
GLOBAL_VARIANCE_BELOW = 64


def shadow_seed(seed: int, index: int) -> int:
    """The seed of shadow `index` (initial weights, shuffles, client sampling): a function of the run's seed only."""
    return int(np.random.SeedSequence([seed, 7, index]).generate_state(1)[0])


@contextlib.contextmanager
def _own_task_identity() -> Iterator[None]:
    """LocalGrid sets Flower's process-wide task identity; a shadow run inside a real run must give it back."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@dataclass
class ShadowBank:
    """K shadows' logit-scaled confidences on the candidate pool, IN or OUT, and what the attacks fitted on them."""

    pool: torch.Tensor  # sorted global train indices (members and non-members of every scored set)
    in_mask: torch.Tensor  # (K, N): pool example i trained in shadow k
    phi: torch.Tensor  # (K, N): phi of each trained shadow on the pool
    unlearned_phi: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> (K, N) after the shadow unlearned
    shadow_attack: ShadowAttack | None = None
    cost: dict[str, Any] = field(default_factory=dict)
    _fits: GaussianFits | None = field(default=None, init=False, repr=False)

    @property
    def global_variance(self) -> bool:
        """Whether the Gaussian fits use one variance for all examples (fewer than 64 shadows)."""
        return int(self.in_mask.shape[0]) < GLOBAL_VARIANCE_BELOW

    def positions(self, indices: torch.Tensor) -> torch.Tensor:
        """Where global `indices` sit in the pool."""
        pos = torch.searchsorted(self.pool, indices)
        if not bool((self.pool[pos.clamp_max(len(self.pool) - 1)] == indices).all()):
            raise ValueError("scored examples outside the shadow pool")
        return pos

    def lira_scores(self, target_phi: torch.Tensor) -> torch.Tensor:
        """The online LiRA score of every pool example under a target model (higher = member)."""
        if self._fits is None:  # the shadows do not change: fit once, score every model against the same Gaussians
            self._fits = fit_gaussians(self.phi, self.in_mask, global_variance=self.global_variance)
        return lira_scores(target_phi, self._fits)

    def ulira_scores(self, method: str) -> torch.Tensor:
        """U-LiRA: each unlearned shadow scored against the others, (K, N) (members: its own unlearned examples)."""
        return leave_one_out_scores(self.unlearned_phi[method], self.in_mask, global_variance=self.global_variance)


def shadow_request(base: DeletionRequest, members: torch.Tensor) -> DeletionRequest:
    """What a shadow unlearns: the client withdraws (client-level), or exactly its pool members (sample-level)."""
    if base.client_level:
        return DeletionRequest(client=base.client)
    return DeletionRequest(client=base.client, samples="listed", indices=tuple(int(i) for i in members))


def train_shadow_bank(
    cfg: ExperimentConfig,
    data: FederatedData,
    pool: torch.Tensor,
    request: DeletionRequest,
    *,
    num_shadows: int,
    with_shadow_attack: bool,
    ulira_methods: list[Method],
    progress: Progress | None = None,
) -> ShadowBank:
    """Train `num_shadows` federated shadows on random halves of `pool`; unlearn with each of `ulira_methods` too."""
    base_spec = app_config.data_spec_for(cfg)
    model_name = app_config.model_name_for(cfg)
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 8]).generate_state(1)[0]))
    in_mask = split_halves(num_shadows, len(pool), generator)
    phi = torch.empty(num_shadows, len(pool), dtype=torch.float64)
    unlearned = {m.name: torch.full((num_shadows, len(pool)), float("nan"), dtype=torch.float64) for m in ulira_methods}
    attack = None
    if with_shadow_attack:
        attack = ShadowAttack(
            build_model(model_name, data.input_shape, data.num_classes), data.input_shape, data.num_classes, seed=cfg.seed
        )
    x_pool, y_pool = data.x_train[pool], data.y_train[pool]
    test_order = torch.randperm(len(data.y_test), generator=generator)
    train_seconds: list[float] = []
    method_seconds: dict[str, list[float]] = {m.name: [] for m in ulira_methods}
    statuses: dict[str, list[str]] = {m.name: [] for m in ulira_methods}
    if progress is not None:
        progress.start_phase(f"membership shadows ({num_shadows}, federated in-process)", num_shadows)
    for k in range(num_shadows):
        members = pool[in_mask[k]]
        spec = dataclasses.replace(base_spec, shadow_pool=tuple(int(i) for i in pool), shadow_in=tuple(int(i) for i in members))
        seed = shadow_seed(cfg.seed, k)
        cache_dir = tempfile.mkdtemp(prefix="fedunlearn-shadow-")
        client_spec = ClientSpec(
            data=spec, model=model_name, cache_dir=cache_dir, cache_dtype=cfg.cache_dtype, device=app_config.device_for(cfg)
        )
        try:
            with _own_task_identity():
                started = time.perf_counter()
                run = _ShadowRun(cfg, client_spec, seed, methods=ulira_methods)
                trained = run.train()
                train_seconds.append(time.perf_counter() - started)
                shadow = run.model(trained)
                phi[k] = model_logit_confidence(shadow, x_pool, y_pool)
                if attack is not None:
                    shadow_data = DatasetStore.get(spec)
                    attack.add_shadow(shadow, *_attack_examples(shadow_data, pool, members, data, test_order))
                if ulira_methods:
                    run.fill_caches(trained, upload=any(m.uploads_caches for m in ulira_methods))  # cheap: every method may use them
                    target = shadow_request(request, members)
                    for method in ulira_methods:
                        started = time.perf_counter()
                        arrays, status = run.unlearn(method, trained, target)
                        method_seconds[method.name].append(time.perf_counter() - started)
                        statuses[method.name].append(status)
                        if status not in ("aborted", "failed"):
                            unlearned[method.name][k] = model_logit_confidence(run.model(arrays), x_pool, y_pool)
        finally:
            DatasetStore.drop(spec)
            with ClientRuntime._lock:
                ClientRuntime._instances.pop(client_spec, None)  # its resident data and model are this shadow's only
            shutil.rmtree(cache_dir, ignore_errors=True)
        if progress is not None:
            progress.advance()
    if attack is not None:
        attack.fit()
    cost: dict[str, Any] = {
        "shadows": num_shadows,
        "training": "federated, in-process (LocalGrid): the target's model, optimiser, "
        "rounds, local epochs, batch size and client sampling; each candidate with its own client in half of the shadows",
        "train_seconds_total": sum(train_seconds),
        "train_seconds_per_shadow": float(np.median(train_seconds)),
    }
    if ulira_methods:
        cost["unlearn"] = {
            name: {
                "seconds_total": sum(s),
                "seconds_per_shadow": float(np.median(s)),
                "failed_shadows": sum(1 for st in statuses[name] if st in ("aborted", "failed")),
            }
            for name, s in method_seconds.items()
        }
    return ShadowBank(pool=pool, in_mask=in_mask, phi=phi, unlearned_phi=unlearned, shadow_attack=attack, cost=cost)


def _attack_examples(
    shadow_data: FederatedData, pool: torch.Tensor, members: torch.Tensor, data: FederatedData, test_order: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The shadow attack's training examples: the shadow's pool members and as many other clean training examples,
    against its pool non-members and as many test examples (never trained on by any model)."""
    trained = torch.cat(shadow_data.client_train)
    other = trained[~torch.isin(trained, pool) & ~shadow_data.poisoned[trained]][: len(pool)]
    inside = torch.cat([members, other])
    outside_pool = pool[~torch.isin(pool, members)]
    test = test_order[: len(inside) - len(outside_pool)] if len(inside) > len(outside_pool) else test_order[:0]
    x_out = torch.cat([data.x_train[outside_pool], data.x_test[test]])
    y_out = torch.cat([data.y_train[outside_pool], data.y_test[test]])
    return (shadow_data.x_train[inside], shadow_data.y_train[inside]), (x_out, y_out)


class _ShadowRun:
    """One shadow experiment on a LocalGrid: training, cache filling and methods, through the project's strategies."""

    def __init__(self, cfg: ExperimentConfig, spec: ClientSpec, seed: int, methods: list[Method]) -> None:
        self.cfg = cfg
        self.spec = spec
        self.seed = seed
        self.grid = LocalGrid(build_client_app(spec), cfg.num_clients, seed=seed % 1000)
        self.directory = discover_clients(self.grid, cfg.num_clients, timeout=cfg.round_timeout)
        data = DatasetStore.get(spec.data)
        self.input_shape, self.num_classes = data.input_shape, data.num_classes
        torch.manual_seed(seed)
        model = build_model(spec.model, self.input_shape, self.num_classes)
        self.initial = ArrayRecord(OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items()))
        self.strategy = IAUFed(
            layout=ParamLayout.of(model),
            iau=app_config.iau_settings_for(cfg),
            allow_stale=cfg.allow_stale_cache,
            round_timeout=cfg.round_timeout,
            directory=self.directory,
            train=app_config.train_settings_for(cfg),
            seed=seed,
            fraction_train=cfg.fraction_fit,
            policy=app_config.round_policy_for(cfg),
        )
        # Each method's own training recorder, as the runner installs them for the target.
        self.recorded = {m.name: m.recorder(cfg) for m in methods if m.recorder is not None}
        if self.recorded:
            self.strategy.update_recorder = fan_out(list(self.recorded.values()))

    def train(self) -> ArrayRecord:
        """FedAvg for the configured rounds from this shadow's initial weights."""
        arrays = self.strategy.start(
            grid=self.grid, initial_arrays=self.initial, num_rounds=self.cfg.rounds, timeout=self.cfg.round_timeout
        ).arrays
        self.strategy.update_recorder = None
        return arrays

    def fill_caches(self, arrays: ArrayRecord, upload: bool) -> None:
        """The final evaluation that fills the clients' gradient caches (what the IAU methods answer from)."""
        self.strategy.fill_caches(self.grid, arrays, upload=upload)

    def model(self, arrays: ArrayRecord) -> torch.nn.Module:
        """A model holding `arrays`, in eval mode."""
        model = build_model(self.spec.model, self.input_shape, self.num_classes)
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        return model.eval()

    def unlearn(self, method: Method, arrays: ArrayRecord, request: DeletionRequest) -> tuple[ArrayRecord, str]:
        """Method `method` serves `request` on this shadow (from its own branch of the strategy)."""
        cfg = self.cfg

        def fedavg(
            ledger: tuple[DeletionRequest, ...] = (), round_offset: int = 0, label: str = "", seed: int | None = None
        ) -> UnlearningFedAvg:
            return UnlearningFedAvg(
                directory=self.directory,
                train=app_config.train_settings_for(cfg),
                seed=self.seed if seed is None else seed,
                fraction_train=cfg.fraction_fit,
                ledger=ledger,
                round_offset=round_offset,
                partial_sums=cfg.cohort_partial_sums,
            )

        forget_count = len(forget_indices(DatasetStore.get(self.spec.data), request))
        context = MethodContext(
            cfg=cfg,
            grid=self.grid,
            strategy=self.strategy.branch(),
            initial_arrays=self.initial,
            arrays=arrays,
            request=request,
            forget_count=forget_count,
            fedavg=fedavg,
            request_round=cfg.rounds,
            recorded=self.recorded.get(method.name),
            round_hook=None,
        )
        try:
            outcome = method.run(context)
        except FedUnlearnError:
            return arrays, "failed"
        status = outcome.details.get("status") or (outcome.details.get("unlearning") or {}).get("status", "complete")
        return outcome.arrays, str(status)
