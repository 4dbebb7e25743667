"""Training replies consumed as they arrive: a Grid whose `send_and_receive` streams, and the running sums that fold them.

Flower's `Strategy.start()` calls `grid.send_and_receive`, which gathers every reply of a round before
`aggregate_train` sees the first one: at 1000 McMahan-CNN clients that is 6.6 GB of client models held at
once (BENCHMARKS.md). `StreamingGrid` keeps Flower's round loop and changes only that call: it pushes the
round's messages at once and returns a `ReplyStream`, a one-pass iterable that polls `pull_messages` and
yields each reply as it is pulled. `UnlearningFedAvg.aggregate_train` folds each one into a
`WeightedModelSum` (float64) and drops the reply's model before the next is pulled, so the server holds
the running sum, the replies pulled but not yet folded (one poll's worth) and nothing else.

`WeightedModelSum` is plain numpy (no Flower types): the FedAvg mean sum_k n_k w_k / sum_k n_k, summed in
float64 and cast to each tensor's own dtype at the end. Products n_k w_k of a float32 tensor and an
integer count below 2**29 are exact in float64, so the only rounding is the additions': about 1e-16
relative, far below float32's half ulp (6e-8), which is why the cast result does not depend on the
arrival order in practice (tests/test_streaming.py measures it under permutations).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol, runtime_checkable

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from .grid_wrapper import GridWrapper

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "GatheringRecorder",
    "ReplyStream",
    "StreamingGrid",
    "StreamingRecorder",
    "UpdateRecorder",
    "WeightedModelSum",
    "answers_at_push",
    "grid_chain",
    "poll_interval_of",
    "streaming_recorder",
]

DEFAULT_POLL_INTERVAL = 0.1  # flwr's InMemoryGrid default between two pulls


class WeightedModelSum:
    """Running sum of n_k * model_k in float64 over named tensors; `mean()` is the FedAvg average in each tensor's dtype."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._scratch: dict[str, np.ndarray] = {}
        self.total_weight = 0
        self.count = 0

    def add(self, tensors: Mapping[str, np.ndarray], weight: int) -> None:
        """Fold one model with integer weight `weight` (its example count) into the sum; the tensors may be dropped afterwards."""
        if weight < 1:
            raise ValueError(f"weight={weight}: must be a positive example count")
        if self._sums and set(tensors) != set(self._sums):
            raise ValueError(f"tensors {sorted(tensors)[:3]}... differ from the first model's {sorted(self._sums)[:3]}...")
        factor = np.float64(weight)
        for name, value in tensors.items():
            if name not in self._sums:
                self._dtypes[name] = value.dtype
                self._sums[name] = np.multiply(value, factor, dtype=np.float64)
                self._scratch[name] = np.empty_like(self._sums[name])
                continue
            if value.shape != self._sums[name].shape:
                raise ValueError(f"tensor {name!r} has shape {value.shape}, the first model's is {self._sums[name].shape}")
            scratch = self._scratch[name]
            np.multiply(value, factor, out=scratch, dtype=np.float64)  # exact: float32 x an integer below 2**29
            self._sums[name] += scratch
        self.total_weight += int(weight)
        self.count += 1

    def add_sum(self, sums: Mapping[str, np.ndarray], dtypes: Mapping[str, np.dtype], total_weight: int, count: int) -> None:
        """Fold a partial sum (sum_k n_k w_k in float64 over `count` models weighing `total_weight`), e.g. a cohort worker's."""
        if total_weight < 1 or count < 1:
            raise ValueError(f"total_weight={total_weight}, count={count}: a partial sum covers at least one model and example")
        if self._sums and set(sums) != set(self._sums):
            raise ValueError(f"tensors {sorted(sums)[:3]}... differ from the first model's {sorted(self._sums)[:3]}...")
        for name, value in sums.items():
            if value.dtype != np.float64:
                raise ValueError(f"tensor {name!r} of a partial sum has dtype {value.dtype}: partial sums are float64")
            if name not in self._sums:
                self._dtypes[name] = np.dtype(dtypes[name])
                self._sums[name] = np.array(value, dtype=np.float64)
                self._scratch[name] = np.empty_like(self._sums[name])
                continue
            if value.shape != self._sums[name].shape:
                raise ValueError(f"tensor {name!r} has shape {value.shape}, the first model's is {self._sums[name].shape}")
            self._sums[name] += value
        self.total_weight += int(total_weight)
        self.count += int(count)

    @property
    def sums(self) -> dict[str, np.ndarray]:
        """The running sums sum_k n_k w_k (float64, by tensor name): what a cohort worker sends as its partial sum."""
        return self._sums

    @property
    def dtypes(self) -> dict[str, np.dtype]:
        """Each tensor's dtype (the first model's): what `mean()` casts to."""
        return self._dtypes

    def mean(self) -> dict[str, np.ndarray]:
        """sum_k n_k w_k / sum_k n_k per tensor, cast to the tensor's dtype (integer tensors rounded to the nearest)."""
        if not self.count:
            raise ValueError("no model was added: the mean of nothing is undefined")
        out: dict[str, np.ndarray] = {}
        for name, total in self._sums.items():
            mean = total / self.total_weight
            dtype = self._dtypes[name]
            out[name] = (np.rint(mean) if dtype.kind in "iub" else mean).astype(dtype)
        return out


def grid_chain(grid: Grid) -> Iterator[object]:
    """The grid and every grid it wraps (GridWrapper's `grid`), outermost first."""
    seen: set[int] = set()
    current: object = grid
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "grid", None)


def poll_interval_of(grid: Grid) -> float:
    """The wait between two pulls: the innermost grid's `pull_interval` (Flower's grids; `--grid-poll-interval`), else 0.1 s."""
    for current in grid_chain(grid):
        interval = getattr(current, "pull_interval", None)
        if isinstance(interval, int | float):
            return float(interval)
    return DEFAULT_POLL_INTERVAL


def answers_at_push(grid: Grid) -> bool:
    """Whether the grid under the wrappers answers every message while it is pushed (LocalGrid: in-process, synchronous).

    Such a grid already holds every reply when the push returns, so there is nothing to stream, and a reply missing
    then never comes (no round timeout to wait out).
    """
    return any(getattr(current, "answers_at_push", False) is True for current in grid_chain(grid))


class ReplyStream:
    """The replies to messages already pushed, yielded one at a time as they are pulled, until all came or `timeout` passed.

    One pass only: a reply is yielded once and the stream keeps no reference to it. Mirrors Flower's
    `Grid.send_and_receive` loop (pull, then sleep the grid's poll interval) with the same timeout meaning
    (None: wait for every reply); `missing` lists the message ids still unanswered when the stream ended.
    """

    def __init__(self, grid: Grid, message_ids: Iterable[str], timeout: float | None, poll_interval: float) -> None:
        self.grid = grid
        self.pending: dict[str, None] = dict.fromkeys(message_ids)  # in push order: in-process grids answer in the order asked
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._started = False

    def __iter__(self) -> Iterator[Message]:
        if self._started:
            raise RuntimeError("a ReplyStream can be iterated once: its replies are not kept (list() it the first time if you need them)")
        self._started = True
        return self._replies()

    def _replies(self) -> Iterator[Message]:
        end = time.monotonic() + (self.timeout if self.timeout is not None else 0.0)
        while self.pending and (self.timeout is None or time.monotonic() < end):
            pulled = False
            started = time.perf_counter()
            pulled_in = 0.0
            for reply in self.grid.pull_messages(list(self.pending)):
                pulled_in += time.perf_counter() - started  # the pull's own time, not the consumer's between yields
                answered = reply.metadata.reply_to_message_id
                if answered in self.pending:
                    del self.pending[answered]
                    pulled = True
                    yield reply
                started = time.perf_counter()
            pulled_in += time.perf_counter() - started
            if self.pending and not pulled:
                # At least four times the pull's own cost (as engine_tuning's pickup loop does): polling 10,000
                # outstanding ids every 5 ms would otherwise take most of the driver's thread.
                time.sleep(max(self.poll_interval, 4.0 * pulled_in))

    @property
    def missing(self) -> list[str]:
        """Message ids without a reply (all of them before iteration; those left when it ended afterwards)."""
        return list(self.pending)


class StreamingGrid(GridWrapper):
    """A Grid whose `send_and_receive` pushes at once and returns a `ReplyStream` instead of the gathered list.

    Over a grid that `answers_at_push` (the in-process LocalGrid) it returns that grid's replies as they are. Hand it to Flower's `Strategy.start()` (UnlearningFedAvg does, unless `streaming=False`) so that
    `aggregate_train` receives the round's replies as they arrive. Every other call passes through.
    """

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push every message now; the returned stream pulls the replies while it is iterated."""
        messages = list(messages)
        if not messages:
            return []
        grid = self._inner()
        if answers_at_push(grid):  # in-process: every reply exists once pushed; its send_and_receive returns them in push order
            return list(grid.send_and_receive(messages, timeout=timeout))
        ids = list(grid.push_messages(messages))
        return ReplyStream(grid, ids, timeout, poll_interval_of(grid))


# ----- what the update recorders see -------------------------------------------------------------------------------
# (absolute round, {partition: (client model, examples it trained on)}, global model the round started from)
UpdateRecorder = Callable[[int, dict[int, tuple[ArrayRecord, int]], ArrayRecord], None]


@runtime_checkable
class StreamingRecorder(Protocol):
    """An update recorder fed one client model at a time (then the round's total), so it never needs the round at once."""

    def record_client(self, server_round: int, partition: int, arrays: ArrayRecord, num_examples: int, global_before: ArrayRecord) -> None:
        """One accepted client model of `server_round`; the caller drops its reference to `arrays` right after."""

    def end_round(self, server_round: int, total_examples: int) -> None:
        """Every accepted model of `server_round` was recorded; `total_examples` is their summed example count."""


class GatheringRecorder:
    """Adapts a plain `UpdateRecorder` callable to the per-client calls: keeps the round's models and calls it once at the end.

    A plain callable asks for every client model of the round at once, so this holds them (what the
    gathered path held); write `record_client` / `end_round` (a StreamingRecorder) to avoid that.
    """

    def __init__(self, recorder: UpdateRecorder) -> None:
        self.recorder = recorder
        self._clients: dict[int, tuple[ArrayRecord, int]] = {}
        self._before: ArrayRecord | None = None

    def record_client(self, server_round: int, partition: int, arrays: ArrayRecord, num_examples: int, global_before: ArrayRecord) -> None:
        """Keep the model until the round ends."""
        self._clients[partition] = (arrays, num_examples)
        self._before = global_before

    def end_round(self, server_round: int, total_examples: int) -> None:
        """Hand the round's models, in partition order, to the callable."""
        clients, before = dict(sorted(self._clients.items())), self._before
        self._clients, self._before = {}, None
        if before is not None:
            self.recorder(server_round, clients, before)


def streaming_recorder(recorder: UpdateRecorder | StreamingRecorder) -> StreamingRecorder:
    """The recorder as per-client calls (a plain callable through a GatheringRecorder)."""
    return recorder if isinstance(recorder, StreamingRecorder) else GatheringRecorder(recorder)
