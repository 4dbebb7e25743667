"""The ClientApp: FedAvg training, evaluation that fills the gradient cache, and gradient queries for unlearning.

Handlers are thin: they read the message, call the math in `fedunlearn`, and write the reply.
Everything heavy (data, model, cache store) is resident per worker process in `ClientRuntime`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedunlearn.baselines import (IMUSettings, PGASettings, ball_radius_from_random, head_parameter_names, imu_head_ascent,
                                  projected_gradient_ascent)
from fedunlearn.cache import CacheStore, GradientCache, exclusion_digest
from fedunlearn.data import DataSpec, DatasetStore, FederatedData
from fedunlearn.deletion import DeletionRequest, decode_ledger, excluded_indices, forget_indices, kept_indices
from fedunlearn.gradients import ParamLayout, gradient_sum, load_model_vector, model_vector
from fedunlearn.iau import choose_radius, remaining_contribution, withdrawing_contribution
from fedunlearn.models import build_model
from fedunlearn.training import TrainSettings, local_train

from . import keys

WIRE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class ClientSpec:
    """What a worker needs to serve any client: the data, the model, where caches live, the device."""

    data: DataSpec
    model: str
    cache_dir: str
    cache_dtype: str = "float32"
    device: str = "cpu"


class ClientRuntime:
    """Per-process resident data, model and cache store for one ClientSpec (built once per worker).

    Ray worker processes live for the whole run while the ClientApp object is re-pickled with
    every message, so this class-level registry is where loaded data can stay resident.
    """

    _instances: ClassVar[dict[ClientSpec, "ClientRuntime"]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec
        self.data: FederatedData = DatasetStore.get(spec.data)
        self.device = torch.device(spec.device)
        self.model = build_model(spec.model, self.data.input_shape, self.data.num_classes).to(self.device)
        self.layout = ParamLayout.of(self.model)
        self.store = CacheStore(spec.cache_dir, spec.cache_dtype)
        # The training split lives on the worker's device for the whole run (on a CPU these are the same tensors):
        # every handler slices it by index, no per-call DataLoader and no per-batch host-to-device copy.
        self.x_train = self.data.x_train.to(self.device)
        self.y_train = self.data.y_train.to(self.device)

    @classmethod
    def get(cls, spec: ClientSpec) -> "ClientRuntime":
        """The resident runtime of this process for `spec`."""
        with cls._lock:
            if spec not in cls._instances:
                cls._instances[spec] = cls(spec)
            return cls._instances[spec]

    def load(self, arrays: ArrayRecord) -> None:
        """Load the server's parameters into the resident model."""
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)

    def arrays_xy(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training examples by global index."""
        indices = indices.to(self.device)
        return self.x_train[indices], self.y_train[indices]

    def gradient_record(self, flat: torch.Tensor, dtype: str) -> ArrayRecord:
        """A flat gradient as an ArrayRecord keyed by parameter name."""
        named = self.layout.unflatten(flat)
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"gradient-dtype={dtype!r}: must be one of {', '.join(WIRE_DTYPES)}")
        return ArrayRecord(OrderedDict((n, t.detach().cpu().to(WIRE_DTYPES[dtype]).contiguous()) for n, t in named.items()))

    def cached_gradient(self, pid: int, indices: torch.Tensor, version: str, scope: str, allow_stale: bool) -> tuple[GradientCache, bool, bool]:
        """G over `indices` at `version`: from the cache when it matches, else computed and stored. Returns (cache, hit, stale)."""
        cache = self.store.get(pid)
        if cache is not None and cache.scope == scope and (cache.version == version or allow_stale):
            return cache, True, cache.version != version
        x, y = self.arrays_xy(indices)
        flat, _, _ = gradient_sum(self.model, x, y)
        cache = GradientCache(flat, len(indices), version, scope)
        self.store.put(pid, cache)
        return cache, False, False


def calibrate_radius(runtime: "ClientRuntime", arrays: ArrayRecord, direction: ArrayRecord, forget: torch.Tensor,
                     heldout: torch.Tensor) -> tuple[float, list[dict[str, float]]]:
    """`choose_radius` on this client's forget set and held-out data, stepping its resident model along -d."""
    import torch.nn.functional as F

    runtime.load(arrays)
    theta = model_vector(runtime.model).to(torch.float64)
    d = runtime.layout.flatten(direction.to_torch_state_dict()).to(torch.float64)
    unit = d / d.norm().clamp_min(1e-300)
    x_forget, y_forget = runtime.arrays_xy(forget)
    x_held, y_held = runtime.arrays_xy(heldout)

    def losses(radius: float) -> tuple[float, float]:
        load_model_vector(runtime.model, theta - radius * float(theta.norm()) * unit)
        runtime.model.eval()
        with torch.no_grad():
            return (float(F.cross_entropy(runtime.model(x_forget), y_forget)), float(F.cross_entropy(runtime.model(x_held), y_held)))

    try:
        return choose_radius(losses)
    finally:
        runtime.load(arrays)


def _spec_from_context(context: Context, overrides: Mapping[str, Any] | None = None) -> ClientSpec:
    """Build a ClientSpec from a `flwr run` run_config (keys as in the CLI); `overrides` win over it."""
    from fedunlearn.config import build_config

    from .app_config import client_spec_for, default_cache_dir

    settings = {k: v for k, v in context.run_config.items()}
    return client_spec_for(build_config(file_settings=settings, overrides=dict(overrides or {})), default_cache_dir(context.run_id))


def _reply(msg: Message, metrics: dict[str, float | int], arrays: dict[str, ArrayRecord] | None = None,
           version: str | None = None) -> Message:
    content = RecordDict({keys.METRICS: MetricRecord(metrics)})
    for name, record in (arrays or {}).items():
        content[name] = record
    if version is not None:  # the model version the reply was computed at: the server checks it before use
        content[keys.CONFIG] = ConfigRecord({keys.MODEL_VERSION: version})
    return Message(content=content, reply_to=msg)


def train_settings_from(config: ConfigRecord) -> TrainSettings:
    """The local training settings a train message carries."""
    return TrainSettings(
        epochs=int(config[keys.EPOCHS]), lr=float(config[keys.LR]), batch_size=int(config[keys.BATCH_SIZE]),
        optimizer=str(config[keys.OPTIMIZER]), momentum=float(config.get(keys.MOMENTUM, 0.0)),
        gr_alpha=float(config.get(keys.GR_ALPHA, 0.0)),
    )


def train_seed(config: ConfigRecord, pid: int) -> int:
    """Seed of client `pid`'s shuffling generator in a train round (the same client in the same round shuffles alike in every run)."""
    return int(config[keys.SEED]) * 1_000_003 + int(config[keys.SERVER_ROUND]) * 10_007 + pid


def build_client_app(spec: ClientSpec | None = None, overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """The fedunlearn ClientApp; `spec=None` reads its settings from the Flower run config (then `overrides`)."""
    if spec is not None and overrides:
        raise ValueError("build_client_app: give either spec or overrides, not both (a spec already fixes every setting)")
    app = ClientApp()
    frozen_overrides = dict(overrides or {})

    def runtime_for(context: Context) -> ClientRuntime:
        return ClientRuntime.get(spec if spec is not None else _spec_from_context(context, frozen_overrides))

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        runtime = runtime_for(context)
        pid = int(context.node_config["partition-id"])
        return _reply(msg, {
            keys.PARTITION_ID: pid,
            keys.NUM_TRAIN: len(runtime.data.client_train[pid]),
            keys.NUM_HELDOUT: len(runtime.data.client_heldout[pid]),
        })

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        runtime = runtime_for(context)
        pid = int(context.node_config["partition-id"])
        config = msg.content[keys.CONFIG]
        settings = train_settings_from(config)
        ledger = decode_ledger(str(config.get(keys.LEDGER, "")))
        indices = kept_indices(runtime.data, pid, ledger)
        runtime.load(msg.content[keys.ARRAYS])
        generator = torch.Generator().manual_seed(train_seed(config, pid))
        x, y = runtime.arrays_xy(indices)
        loss = local_train(runtime.model, x, y, settings, generator)
        state = OrderedDict((k, v.detach().cpu()) for k, v in runtime.model.state_dict().items())
        return _reply(msg, {keys.NUM_EXAMPLES: len(indices), keys.TRAIN_LOSS: loss, keys.COMPUTE_S: time.perf_counter() - start},
                      {keys.ARRAYS: ArrayRecord(state)})

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        runtime = runtime_for(context)
        pid = int(context.node_config["partition-id"])
        config = msg.content[keys.CONFIG]
        runtime.load(msg.content[keys.ARRAYS])
        model = runtime.model
        model.eval()
        hx, hy = runtime.data.client_heldout_arrays(pid)
        with torch.no_grad():
            logits = model(hx.to(runtime.device))
            eval_loss = float(torch.nn.functional.cross_entropy(logits, hy.to(runtime.device)))
            eval_acc = float((logits.argmax(1).cpu() == hy).float().mean())
        metrics: dict[str, float | int] = {keys.NUM_EXAMPLES: len(hy), keys.EVAL_LOSS: eval_loss, keys.EVAL_ACC: eval_acc}
        arrays: dict[str, ArrayRecord] = {}
        if bool(config.get(keys.CACHE_FILL, False)):
            ledger = decode_ledger(str(config.get(keys.LEDGER, "")))
            indices = kept_indices(runtime.data, pid, ledger)
            scope = exclusion_digest(excluded_indices(runtime.data, pid, ledger))
            x, y = runtime.arrays_xy(indices)
            # The forward pass that yields the training loss also yields the cache: one pass, add the backward.
            flat, loss_sum, correct = gradient_sum(model, x, y)
            runtime.store.put(pid, GradientCache(flat, len(indices), str(config[keys.MODEL_VERSION]), scope))
            metrics.update({"train-loss": loss_sum / max(len(indices), 1), "train-acc": correct / max(len(indices), 1),
                            keys.GRADIENT_COUNT: len(indices), keys.CACHE_BYTES: runtime.store.client_bytes(pid)})
            if bool(config.get(keys.CACHE_UPLOAD, False)):
                arrays[keys.GRADIENT] = runtime.gradient_record(flat, str(config.get("gradient-dtype", "float32")))
        metrics[keys.COMPUTE_S] = time.perf_counter() - start
        return _reply(msg, metrics, arrays, version=str(config[keys.MODEL_VERSION]) if keys.MODEL_VERSION in config else None)

    @app.query("calibrate")
    def calibrate(msg: Message, context: Context) -> Message:
        # IAU, the withdrawing client's own step-length rule: it tries normalised steps along -d on ITS data only
        # (the forget set S and its held-out examples; nothing of the test split or of any other client).
        start = time.perf_counter()
        runtime = runtime_for(context)
        pid = int(context.node_config["partition-id"])
        config = msg.content[keys.CONFIG]
        request = DeletionRequest(**json.loads(str(config[keys.REQUEST])))
        ledger = decode_ledger(str(config.get(keys.LEDGER, "")))
        before = excluded_indices(runtime.data, pid, ledger)
        forget = forget_indices(runtime.data, request)
        forget = forget[~torch.isin(forget, before)] if before.numel() else forget
        radius, trail = calibrate_radius(runtime, msg.content[keys.ARRAYS], msg.content[keys.DIRECTION], forget,
                                         runtime.data.client_heldout[pid])
        metrics = {keys.RADIUS: radius, keys.FORGET_SIZE: len(forget), keys.COMPUTE_S: time.perf_counter() - start}
        reply = _reply(msg, metrics, version=str(config[keys.MODEL_VERSION]))
        reply.content[keys.CONFIG][keys.CALIBRATION_TRAIL] = json.dumps(trail)
        return reply

    @app.query("gradient")
    def gradient(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        runtime = runtime_for(context)
        pid = int(context.node_config["partition-id"])
        config = msg.content[keys.CONFIG]
        runtime.load(msg.content[keys.ARRAYS])
        version = str(config[keys.MODEL_VERSION])
        role = str(config[keys.ROLE])
        wire = str(config.get("gradient-dtype", "float32"))
        allow_stale = bool(config.get(keys.ALLOW_STALE, False))
        ledger = decode_ledger(str(config.get(keys.LEDGER, "")))
        request = DeletionRequest(**json.loads(str(config[keys.REQUEST])))
        remaining_count = int(config[keys.REMAINING_COUNT])
        before = excluded_indices(runtime.data, pid, ledger)
        before_scope = exclusion_digest(before)
        if role == keys.ROLE_REMAINING:
            kept = kept_indices(runtime.data, pid, ledger)
            cache, hit, stale = runtime.cached_gradient(pid, kept, version, before_scope, allow_stale)
            vector = remaining_contribution(cache.gradient_sum, remaining_count, float(config.get(keys.CORRECTION_WEIGHT, 1.0)))
            metrics = {keys.NUM_EXAMPLES: cache.num_examples, keys.CACHE_HIT: int(hit), keys.CACHE_STALE: int(stale)}
        else:
            forget = forget_indices(runtime.data, request)
            forget = forget[~torch.isin(forget, before)] if before.numel() else forget
            after = torch.unique(torch.cat([before, forget]))
            after_scope = exclusion_digest(after)
            cache = runtime.store.get(pid)
            hit = 0
            if request.client_level and cache is not None and cache.is_at(version, before_scope):
                forget_sum, hit = cache.gradient_sum, 1  # S is all that remains of the client: G_S is the cache itself
            else:
                forget_sum, _, _ = gradient_sum(runtime.model, *runtime.arrays_xy(forget))
            metrics = {keys.FORGET_SIZE: len(forget), keys.CACHE_HIT: hit, keys.CACHE_STALE: 0}
            if role == keys.ROLE_FORGET_ONLY:
                vector = forget_sum
                metrics[keys.NUM_EXAMPLES] = len(forget)
            else:
                kept_sum = None
                if not request.client_level:
                    if cache is not None and cache.is_at(version, before_scope):
                        kept_cache = cache.without(forget_sum, len(forget), after_scope)
                        hit = 1
                    else:
                        kept = kept_indices(runtime.data, pid, [*ledger, request])
                        kept_cache, hit, _ = runtime.cached_gradient(pid, kept, version, after_scope, False)
                    runtime.store.put(pid, kept_cache)  # the client keeps a cache consistent with what it still holds
                    kept_sum = kept_cache.gradient_sum
                    metrics[keys.CACHE_HIT] = int(hit)
                vector = withdrawing_contribution(kept_sum, forget_sum, remaining_count, len(forget), bool(config.get(keys.CORRECTION, True)),
                                                  float(config.get(keys.CORRECTION_WEIGHT, 1.0)))
                metrics[keys.NUM_EXAMPLES] = len(forget)
        metrics[keys.COMPUTE_S] = time.perf_counter() - start
        # A remaining client may answer from a stale cache (when allowed): it reports the version that cache is at.
        computed_at = cache.version if role == keys.ROLE_REMAINING else version
        return _reply(msg, metrics, {keys.GRADIENT: runtime.gradient_record(vector, wire)}, version=computed_at)

    @app.query("pga")
    def pga(msg: Message, context: Context) -> Message:
        # PGA (Halimi et al.): this client, the one withdrawing, ascends its loss on S inside a ball around w_ref (sent).
        start = time.perf_counter()
        runtime = runtime_for(context)
        pid = int(context.node_config["partition-id"])
        config = msg.content[keys.CONFIG]
        request = _request_for(config, pid)
        settings = PGASettings(
            lr=float(config[keys.LR]), epochs=int(config[keys.EPOCHS]), batch_size=int(config[keys.BATCH_SIZE]),
            momentum=float(config[keys.MOMENTUM]), clip_grad=float(config[keys.CLIP_GRAD]), radius=float(config[keys.PGA_RADIUS]),
            radius_fraction=float(config[keys.PGA_RADIUS_FRACTION]), random_models=int(config[keys.PGA_RANDOM_MODELS]),
            stop_distance=float(config[keys.PGA_STOP_DISTANCE]) if keys.PGA_STOP_DISTANCE in config else 0.0,
        )
        local = None  # w_u, sent when the server holds it from the round that produced w: the early stop's anchor
        if keys.PGA_LOCAL_MODEL in msg.content.array_records:
            runtime.load(msg.content[keys.PGA_LOCAL_MODEL])
            local = model_vector(runtime.model).to(torch.float64)
        runtime.load(msg.content[keys.ARRAYS])
        reference = model_vector(runtime.model).to(torch.float64)
        radius = settings.radius
        if radius <= 0:  # the authors' rule, over freshly initialised models drawn from a seeded generator
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(config[keys.SEED]))
                randoms = [model_vector(build_model(runtime.spec.model, runtime.data.input_shape, runtime.data.num_classes))
                           for _ in range(settings.random_models)]
            radius = ball_radius_from_random(reference, randoms, settings.radius_fraction)
        forget = forget_indices(runtime.data, request)
        generator = torch.Generator().manual_seed(int(config[keys.SEED]) * 1_000_003 + pid)
        stats = projected_gradient_ascent(runtime.model, *runtime.arrays_xy(forget), reference, radius, settings, generator, local=local)
        state = OrderedDict((k, v.detach().cpu()) for k, v in runtime.model.state_dict().items())
        return _reply(msg, {
            keys.NUM_EXAMPLES: len(forget), keys.PGA_RADIUS: radius, keys.PGA_DISTANCE: stats.final_distance,
            keys.PGA_MAX_DISTANCE: stats.max_distance, keys.PGA_PROJECTIONS: stats.projections, keys.STEPS: stats.steps,
            keys.PGA_STOPPED_EARLY: int(stats.stopped_early), keys.PGA_LOCAL_DISTANCE: stats.local_distance_sq,
            keys.LOSS_AFTER: stats.final_loss, keys.COMPUTE_S: time.perf_counter() - start,
        }, {keys.ARRAYS: ArrayRecord(state)})

    @app.query("imu")
    def imu(msg: Message, context: Context) -> Message:
        # IMU-head: this client alone ascends its influence-weighted loss on the final layer; only the head goes back.
        start = time.perf_counter()
        runtime = runtime_for(context)
        pid = int(context.node_config["partition-id"])
        config = msg.content[keys.CONFIG]
        request = _request_for(config, pid)
        settings = IMUSettings(lr=float(config[keys.LR]), epochs=int(config[keys.EPOCHS]), batch_size=int(config[keys.BATCH_SIZE]),
                               damping=float(config[keys.IMU_DAMPING]), clip_quantile=float(config[keys.IMU_QUANTILE]))
        runtime.load(msg.content[keys.ARRAYS])
        forget = forget_indices(runtime.data, request)
        generator = torch.Generator().manual_seed(int(config[keys.SEED]) * 1_000_003 + pid)
        stats = imu_head_ascent(runtime.model, *runtime.arrays_xy(forget), settings, generator)
        state = runtime.model.state_dict()
        head = ArrayRecord(OrderedDict((name, state[name].detach().cpu()) for name in head_parameter_names(runtime.model)))
        return _reply(msg, {
            keys.NUM_EXAMPLES: len(forget), keys.IMU_KEPT: stats.kept, keys.STEPS: stats.steps,
            keys.LOSS_BEFORE: stats.loss_before, keys.LOSS_AFTER: stats.loss_after, keys.COMPUTE_S: time.perf_counter() - start,
        }, {keys.ARRAYS: head})

    return app


def _request_for(config: ConfigRecord, pid: int) -> DeletionRequest:
    """The DeletionRequest a baseline query serves; only the withdrawing client itself may serve it."""
    request = DeletionRequest(**json.loads(str(config[keys.REQUEST])))
    if request.client != pid:
        raise ValueError(f"partition {pid} got a request for client {request.client}: only the withdrawing client runs this step")
    return request
