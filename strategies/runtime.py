"""What a worker holds to serve any client (data, model, cache store), and the helpers every client handler shares.

Ray worker processes live for the whole run while the ClientApp object is re-pickled with every message, so the
resident objects live here, built once per process. The core handlers (`strategies.client_app`) and each method's
own handlers (its file under `strategies/methods/`) get a `ClientRuntime`; they never build one.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedunlearn.cache import CacheStore, GradientCache
from fedunlearn.data import DatasetStore, DataSpec, FederatedData
from fedunlearn.deletion import DeletionRequest, decode_ledger
from fedunlearn.gradients import ParamLayout, gradient_sum
from fedunlearn.models import build_model
from fedunlearn.training import TrainSettings

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
    """Resident data, model and cache store of one worker process (built once per ClientSpec, or from a user's objects).

    `model_factory` builds a fresh, freshly initialised model of the same architecture (PGA's radius rule draws
    random models from it).
    """

    _instances: ClassVar[dict[ClientSpec, ClientRuntime]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, data: FederatedData, model_factory: Callable[[], torch.nn.Module], store: CacheStore, device: str = "cpu") -> None:
        self.data = data
        self.device = torch.device(device)
        self.model_factory = model_factory
        self.model = model_factory().to(self.device)
        self.layout = ParamLayout.of(self.model)
        self.store = store
        # The training split lives on the worker's device for the whole run (on a CPU these are the same tensors):
        # every handler slices it by index, no per-call DataLoader and no per-batch host-to-device copy.
        self.x_train = self.data.x_train.to(self.device)
        self.y_train = self.data.y_train.to(self.device)
        # The last record `load` decoded, and its tensors: a cohort's packed message holds the global model once for
        # all its virtual clients (one ArrayRecord object), so decoding it once per message, not once per client,
        # saves 64 decodes per cohort. A weak reference: a later record at the same address is not mistaken for it.
        self._decoded: tuple[weakref.ref[ArrayRecord], OrderedDict[str, torch.Tensor]] | None = None

    @classmethod
    def from_spec(cls, spec: ClientSpec) -> ClientRuntime:
        """A runtime for the simulator's own datasets and models."""
        data = DatasetStore.get(spec.data)
        return cls(
            data,
            lambda: build_model(spec.model, data.input_shape, data.num_classes),
            CacheStore(spec.cache_dir, spec.cache_dtype),
            spec.device,
        )

    @classmethod
    def get(cls, spec: ClientSpec) -> ClientRuntime:
        """The resident runtime of this process for `spec`."""
        with cls._lock:
            if spec not in cls._instances:
                cls._instances[spec] = cls.from_spec(spec)
            return cls._instances[spec]

    def load(self, arrays: ArrayRecord) -> None:
        """Load the server's parameters into the resident model (copied in: training the model leaves them intact)."""
        if self._decoded is not None and self._decoded[0]() is arrays:
            state = self._decoded[1]
        else:
            state = arrays.to_torch_state_dict()
            self._decoded = (weakref.ref(arrays), state)
        self.model.load_state_dict(state, strict=True)

    def arrays_xy(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training examples by global index."""
        indices = indices.to(self.device)
        return self.x_train[indices], self.y_train[indices]

    def gradient_record(self, flat: torch.Tensor, dtype: str) -> ArrayRecord:
        """A flat gradient as an ArrayRecord keyed by parameter name."""
        named = self.layout.unflatten(flat)
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"{keys.GRADIENT_DTYPE}={dtype!r}: must be one of {', '.join(WIRE_DTYPES)}")
        return ArrayRecord(OrderedDict((n, t.detach().cpu().to(WIRE_DTYPES[dtype]).contiguous()) for n, t in named.items()))

    def cached_gradient(
        self, pid: int, indices: torch.Tensor, version: str, scope: str, allow_stale: bool
    ) -> tuple[GradientCache, bool, bool]:
        """G over `indices` at `version`: from the cache when it matches, else computed and stored. Returns (cache, hit, stale)."""
        cache = self.store.get(pid)
        if cache is not None and cache.scope == scope and (cache.version == version or allow_stale):
            return cache, True, cache.version != version
        x, y = self.arrays_xy(indices)
        flat, _, _ = gradient_sum(self.model, x, y)
        cache = GradientCache(flat, len(indices), version, scope)
        self.store.put(pid, cache)
        return cache, False, False


# A method's client step: (the worker's runtime, the message, the node's context) -> the reply.
ClientHandler = Callable[[ClientRuntime, Message, Context], Message]


@dataclass(frozen=True)
class Incoming:
    """What every client handler reads first: the partition it serves, the message's config, when it started."""

    partition: int
    config: ConfigRecord
    started: float

    @property
    def ledger(self) -> list[DeletionRequest]:
        """The deletions in force the message carries."""
        return decode_ledger(str(self.config.get(keys.LEDGER, "")))

    def elapsed(self) -> float:
        """Seconds since the handler started (the reply's compute-s)."""
        return time.perf_counter() - self.started


def incoming(msg: Message, context: Context) -> Incoming:
    """Start serving `msg`: its partition, its config record and the clock."""
    return Incoming(partition_of(context), msg.content.config_records[keys.CONFIG], time.perf_counter())


def partition_of(context: Context) -> int:
    """The partition a node serves (the simulation engine and `flwr run` both set it)."""
    return int(context.node_config["partition-id"])


def whole(value: object) -> int:
    """A record value the sender wrote as a whole number."""
    return int(cast(Any, value))


def real(value: object) -> float:
    """A record value the sender wrote as a number."""
    return float(cast(Any, value))


def reply(
    msg: Message, metrics: Mapping[str, float | int], arrays: Mapping[str, ArrayRecord] | None = None, version: str | None = None
) -> Message:
    """A reply with one MetricRecord, the given ArrayRecords and, if given, the model version it was computed at."""
    content = RecordDict({keys.METRICS: MetricRecord(cast(Any, dict(metrics)))})
    for name, record in (arrays or {}).items():
        content[name] = record
    if version is not None:  # the model version the reply was computed at: the server checks it before use
        content[keys.CONFIG] = ConfigRecord({keys.MODEL_VERSION: version})
    return Message(content=content, reply_to=msg)


def train_settings_from(config: ConfigRecord) -> TrainSettings:
    """The local training settings a train message carries."""
    return TrainSettings(
        epochs=whole(config[keys.EPOCHS]),
        lr=real(config[keys.LR]),
        batch_size=whole(config[keys.BATCH_SIZE]),
        optimizer=str(config[keys.OPTIMIZER]),
        momentum=real(config.get(keys.MOMENTUM, 0.0)),
        gr_alpha=real(config.get(keys.GR_ALPHA, 0.0)),
    )


def train_seed(config: ConfigRecord, pid: int) -> int:
    """Seed of client `pid`'s shuffling generator in a train round (the same client in the same round shuffles alike in every run)."""
    return whole(config[keys.SEED]) * 1_000_003 + whole(config[keys.SERVER_ROUND]) * 10_007 + pid


def request_of(config: ConfigRecord) -> DeletionRequest:
    """The DeletionRequest a message serves."""
    return DeletionRequest(**json.loads(str(config[keys.REQUEST])))


def own_request(config: ConfigRecord, pid: int) -> DeletionRequest:
    """The DeletionRequest a withdrawing client's own step serves; only that client may serve it."""
    request = request_of(config)
    if request.client != pid:
        raise ValueError(f"partition {pid} got a request for client {request.client}: only the withdrawing client runs this step")
    return request
