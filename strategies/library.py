"""Unlearning for your own Flower app: one call adds the client side to your ClientApp, one builds the server side.

`add_unlearning(app, model_fn, data_fn)` (modelled on Opacus's `make_private`: one entry point wrapping the
user's objects) registers on the user's own `flwr.clientapp.ClientApp` everything the unlearning strategies send
to clients: `query.info` (partition id and data sizes), the cache fill at the final evaluation (wrapping the app's
own evaluate handler, which keeps serving every other evaluate message) and every registered method's client
handlers (IAU-Fed's gradient and step-length queries, PGA's and IMU's steps). Training stays the app's own (e.g.
Flower's FedAvg with the app's train handler); `train_fn` optionally adds a train handler that leaves forgotten
examples out (what retraining, fine-tuning and FedEraser's calibration need).

`unlearning_strategy(grid, model, num_clients)` is the matching server side: an `IAUFed` over the clients that
answered `query.info`, ready for `fill_caches` and `unlearn` after any training.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from torch.utils.data import Dataset

from fedunlearn.cache import CacheStore
from fedunlearn.data import DataSpec, FederatedData
from fedunlearn.deletion import decode_ledger, kept_indices
from fedunlearn.gradients import ParamLayout
from fedunlearn.iau import IAUSettings
from fedunlearn.training import TrainSettings

from . import keys
from .client_app import Bound, attach_handlers, evaluate, info
from .fedavg import discover_clients
from .iau_fed import IAUFed
from .rounds import RoundPolicy
from .runtime import ClientRuntime, partition_of, reply

__all__ = ["Split", "add_unlearning", "unlearning_strategy"]

# A data split: (inputs, integer labels) tensors, or a torch Dataset of (input, label) pairs.
Split = tuple[torch.Tensor, torch.Tensor] | Dataset
# data_fn(partition_id, num_partitions) -> (train split, held-out split) of that partition.
DataFn = Callable[[int, int], tuple[Split, Split]]
# train_fn(model, x, y, config) -> mean training loss; trains `model` in place on (x, y).
TrainFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Any], float]


def _tensors(split: Split, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as (x, y) tensors; labels must be integers."""
    if isinstance(split, tuple) and len(split) == 2 and all(isinstance(t, torch.Tensor) for t in split):
        x, y = split
    elif isinstance(split, Dataset):
        pairs = [split[i] for i in range(len(split))]  # type: ignore[arg-type]
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    else:
        raise TypeError(f"data_fn returned {type(split).__name__} for the {name} split: expected (x, y) tensors or a torch Dataset")
    if y.dtype.is_floating_point or y.dim() != 1 or len(x) != len(y):
        raise ValueError(
            f"data_fn: the {name} split must hold one integer label per input (got labels {tuple(y.shape)} "
            f"{y.dtype} for inputs {tuple(x.shape)})"
        )
    return x.float(), y.long()


def partition_data(train: Split, heldout: Split, partition: int, num_partitions: int) -> FederatedData:
    """One partition's data as the handlers read it: its examples at global indices, the other partitions empty."""
    x_train, y_train = _tensors(train, "train")
    x_held, y_held = _tensors(heldout, "held-out")
    if len(x_train) == 0 or len(x_held) == 0:
        raise ValueError(
            f"data_fn: partition {partition} has {len(x_train)} training and {len(x_held)} held-out examples: both must be non-empty"
        )
    x = torch.cat([x_train, x_held])
    y = torch.cat([y_train, y_held])
    empty = torch.empty(0, dtype=torch.int64)
    client_train = [empty] * num_partitions
    client_heldout = [empty] * num_partitions
    client_train[partition] = torch.arange(len(x_train))
    client_heldout[partition] = torch.arange(len(x_train), len(x))
    return FederatedData(
        x_train=x,
        y_train=y,
        y_train_clean=y.clone(),
        poisoned=torch.zeros(len(x), dtype=torch.bool),
        x_test=x_held,
        y_test=y_held,
        client_train=client_train,
        client_heldout=client_heldout,
        num_classes=int(y.max()) + 1,
        input_shape=tuple(x.shape[1:]),  # type: ignore[arg-type]
        # Only its seed is read (the seeded choice of a sample-level request's random subset).
        spec=DataSpec(num_clients=num_partitions, backdoor_client=None),
    )


@dataclass(frozen=True)
class _UserRuntimes:
    """How a node builds its resident runtime from the user's objects (picklable: Flower ships the app to every worker)."""

    key: str
    model_fn: Callable[[], torch.nn.Module]
    data_fn: DataFn
    cache_dir: str
    cache_dtype: str
    device: str

    _built: ClassVar[dict[tuple[str, int], ClientRuntime]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __call__(self, context: Context) -> ClientRuntime:
        pid = partition_of(context)
        with self._lock:
            runtime = self._built.get((self.key, pid))
            if runtime is None:
                num = int(context.node_config.get("num-partitions", pid + 1))
                train, heldout = self.data_fn(pid, num)
                data = partition_data(train, heldout, pid, num)
                store = CacheStore(f"{self.cache_dir}/{self.key}", self.cache_dtype)
                runtime = self._built[(self.key, pid)] = ClientRuntime(data, self.model_fn, store, self.device)
            return runtime


class _CacheFillingEvaluate:
    """The app's own evaluate handler, except for the final evaluation that fills the gradient cache."""

    def __init__(self, own: Callable[[Message, Context], Message] | None, runtimes: _UserRuntimes) -> None:
        self.own = own
        self.runtimes = runtimes

    def __call__(self, msg: Message, context: Context) -> Message:
        config = msg.content.config_records.get(keys.CONFIG)
        if self.own is not None and not (config is not None and bool(config.get(keys.CACHE_FILL, False))):
            return self.own(msg, context)
        return evaluate(self.runtimes(context), msg, context)


class _Train:
    """A train handler around the user's train function that leaves the examples of the deletions in force out."""

    def __init__(self, train_fn: TrainFn, runtimes: _UserRuntimes) -> None:
        self.train_fn = train_fn
        self.runtimes = runtimes

    def __call__(self, msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        runtime = self.runtimes(context)
        pid = partition_of(context)
        config = msg.content.config_records[keys.CONFIG]
        indices = kept_indices(runtime.data, pid, decode_ledger(str(config.get(keys.LEDGER, ""))))
        runtime.load(msg.content.array_records[keys.ARRAYS])
        loss = self.train_fn(runtime.model, *runtime.arrays_xy(indices), config)
        state = OrderedDict((k, v.detach().cpu()) for k, v in runtime.model.state_dict().items())
        return reply(
            msg,
            {keys.NUM_EXAMPLES: len(indices), keys.TRAIN_LOSS: float(loss), keys.COMPUTE_S: time.perf_counter() - start},
            {keys.ARRAYS: ArrayRecord(state)},
        )


def add_unlearning(
    app: ClientApp,
    model_fn: Callable[[], torch.nn.Module],
    data_fn: DataFn,
    *,
    train_fn: TrainFn | None = None,
    cache_dir: str | None = None,
    cache_dtype: str = "float32",
    device: str = "cpu",
) -> ClientApp:
    """Add the unlearning handlers to your own ClientApp (and return it).

    `model_fn()` builds your model (the same architecture the server aggregates); `data_fn(partition_id,
    num_partitions)` returns that partition's (train, held-out) splits, each (x, y) tensors or a torch Dataset,
    called once per partition in each worker process. The cache fill wraps your evaluate handler (register yours
    before this call); `train_fn(model, x, y, config)`, if given, becomes the app's train handler, training on the
    examples no deletion removed. Gradient caches go to `cache_dir` (default: a fresh temporary folder).
    """
    funcs: dict[str, Any] = app._registered_funcs  # Flower's ClientApp keeps its handlers here (flwr 1.41)
    if train_fn is not None and "train.default" in funcs:
        raise ValueError(
            "add_unlearning(train_fn=...): the app already has a train handler; drop train_fn to keep yours, "
            "or register no train handler to use train_fn"
        )
    runtimes = _UserRuntimes(
        uuid.uuid4().hex, model_fn, data_fn, cache_dir or tempfile.mkdtemp(prefix="fedunlearn-caches-"), cache_dtype, device
    )
    own_evaluate = funcs.pop("evaluate.default", None)
    app.evaluate()(_CacheFillingEvaluate(own_evaluate, runtimes))
    app.query(keys.QUERY_INFO.removeprefix("query."))(Bound(info, runtimes))
    if train_fn is not None:
        app.train()(_Train(train_fn, runtimes))
    return attach_handlers(app, runtimes)


def unlearning_strategy(
    grid: Grid,
    model: torch.nn.Module,
    num_clients: int,
    *,
    iau: IAUSettings | None = None,
    policy: RoundPolicy | None = None,
    seed: int = 0,
    timeout: float = 120.0,
) -> IAUFed:
    """The server side for an app whose clients went through `add_unlearning`: an IAUFed over the clients that answered.

    Call it after training (any strategy); then `fill_caches(grid, arrays, upload=True)` once and `unlearn(...)` per
    request. `model` is only read for its parameter layout. `policy` defaults to 2 retries, as the command line.
    """
    directory = discover_clients(grid, num_clients, timeout=timeout)
    return IAUFed(
        layout=ParamLayout.of(model),
        iau=iau or IAUSettings(),
        directory=directory,
        train=TrainSettings(),
        seed=seed,
        round_timeout=timeout,
        policy=policy or RoundPolicy(retries=2),
    )
