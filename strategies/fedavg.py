"""FedAvg that knows about clients and deletions: seeded sampling by partition id, withdrawn clients excluded.

Training replies are folded as they arrive (strategies/streaming.py): `start()` hands Flower's round loop a
`StreamingGrid`, so `aggregate_train` receives a one-pass stream of replies and never the whole round at once.
A subclass that wants to look at each training reply overrides `aggregate_train` and passes `super()` a generator
over `replies` that inspects each one as it goes by (as benchmarks/variants.py's `ClockedStrategy` does); calling
`list(replies)` works too, but gathers the round's models again. `streaming=False` restores the gathered path
(Flower's `send_and_receive` and `FedAvg.aggregate_train` over the replies in partition order).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log

from fedunlearn.deletion import DeletionRequest, encode_ledger
from fedunlearn.errors import InvalidReplyError, MissingRepliesError
from fedunlearn.training import TrainSettings

from . import keys
from .directory import ClientDirectory
from .partial_sums import PartialSumBook, is_summed
from .streaming import StreamingGrid, StreamingRecorder, UpdateRecorder, WeightedModelSum, grid_chain, streaming_recorder
from .validation import check_train_reply, record_failure, record_rejection
from .wire import as_int

__all__ = ["ClientDirectory", "UnlearningFedAvg", "UpdateRecorder", "discover_clients", "model_version", "sample_partitions"]


def model_version(arrays: ArrayRecord) -> str:
    """Content digest of a model's parameters: caches are valid only at exactly these parameters."""
    digest = hashlib.sha256()
    for name, array in arrays.items():
        digest.update(name.encode())
        digest.update(array.data)
    return digest.hexdigest()[:16]


def discover_clients(grid: Grid, expected: int, timeout: float = 120.0) -> ClientDirectory:
    """Ask every node for its partition id and data sizes (node ids are random per run)."""
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise MissingRepliesError(f"only {len(node_ids)} of {expected} nodes connected within {timeout:.0f} s")
        time.sleep(0.1)
    messages = [Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=nid, message_type=keys.QUERY_INFO) for nid in node_ids]
    directory = ClientDirectory()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise MissingRepliesError(f"node {reply.metadata.src_node_id} failed the info query: {reply.error.reason}")
        metrics = reply.content.metric_records[keys.METRICS]
        pid = as_int(metrics[keys.PARTITION_ID])
        directory.node_of[pid] = reply.metadata.src_node_id
        directory.num_train[pid] = as_int(metrics[keys.NUM_TRAIN])
        directory.num_heldout[pid] = as_int(metrics[keys.NUM_HELDOUT])
    if len(directory.node_of) != expected:
        raise MissingRepliesError(
            f"{len(directory.node_of)} of {expected} clients answered the info query; missing partitions: "
            f"{sorted(set(range(expected)) - set(directory.node_of))}"
        )
    return directory


def sample_partitions(seed: int, server_round: int, partitions: list[int], fraction: float) -> list[int]:
    """The partitions trained in a round: a seeded function of (seed, round) only, so retraining samples alike."""
    count = max(1, int(round(fraction * len(partitions))))
    if count >= len(partitions):
        return list(partitions)
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(p) for p in rng.choice(partitions, size=count, replace=False))


class UnlearningFedAvg(FedAvg):
    """FedAvg over a ClientDirectory with seeded sampling and a ledger of deletions in force.

    Client-level withdrawals are never sampled again; sample-level deletions travel in the
    train config so the client leaves those examples out. Sampling is drawn over all
    partitions and the withdrawn are then dropped, so a retrained run sees the same cohorts
    minus the forgotten client (ALGORITHMS.md section 1).
    """

    def __init__(
        self,
        *,
        directory: ClientDirectory,
        train: TrainSettings,
        seed: int,
        fraction_train: float = 1.0,
        ledger: tuple[DeletionRequest, ...] = (),
        round_offset: int = 0,
        on_round_end: Callable[[int, ArrayRecord, MetricRecord | None], None] | None = None,
        update_recorder: UpdateRecorder | StreamingRecorder | None = None,
        streaming: bool = True,
        partial_sums: bool = True,
    ) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        self.directory = directory
        self.train_settings = train
        self.seed = seed
        self.ledger: tuple[DeletionRequest, ...] = tuple(ledger)
        self.round_offset = round_offset
        self.on_round_end = on_round_end
        # Optional: sees every round's client models (FedEraser stores updates, PGA the last local models); a
        # StreamingRecorder gets them one at a time, a plain callable the whole round at once.
        self.update_recorder = update_recorder
        # Fold training replies as they arrive (True) or gather the round first, as Flower's start() does (False).
        self.streaming = streaming
        # Let cohort workers answer a streamed round with one partial sum of their clients' models (strategies/partial_sums.py);
        # asked only when no update recorder needs each client's model. Per-client nodes ignore it.
        self.partial_sums = partial_sums
        self._asked: list[int] = []  # the partitions this round's training messages went to
        self._last_arrays: ArrayRecord | None = None
        # Replies refused by validation and clients that answered with an error: logged, counted, never aggregated.
        self.rejected: list[dict] = []
        self.failures: list[dict] = []

    @property
    def withdrawn(self) -> set[int]:
        """Partitions that left entirely."""
        return {r.client for r in self.ledger if r.client_level}

    def active_partitions(self) -> list[int]:
        """Partitions still taking part."""
        return [p for p in self.directory.partitions if p not in self.withdrawn]

    def in_partition_order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies sorted by partition id: arrival order varies between runs, and float sums depend on order."""
        partition_of = {nid: p for p, nid in self.directory.node_of.items()}
        return sorted(replies, key=lambda r: partition_of.get(r.metadata.src_node_id, -1))

    def base_config(self) -> ConfigRecord:
        """Config every message carries: seed and the deletions in force."""
        return ConfigRecord({keys.SEED: self.seed, keys.LEDGER: encode_ledger(self.ledger)})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Seeded cohort minus the withdrawn, each told the training settings and the ledger."""
        absolute_round = server_round + self.round_offset
        cohort = [
            p
            for p in sample_partitions(self.seed, absolute_round, self.directory.partitions, self.fraction_train)
            if p not in self.withdrawn
        ]
        s = self.train_settings
        record = ConfigRecord(dict(config))
        record.update(self.base_config())
        record.update(
            {
                keys.SERVER_ROUND: absolute_round,
                keys.LR: s.lr,
                keys.EPOCHS: s.epochs,
                keys.BATCH_SIZE: s.batch_size,
                keys.OPTIMIZER: s.optimizer,
                keys.MOMENTUM: s.momentum,
                keys.GR_ALPHA: s.gr_alpha,
            }
        )
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: record})
        self._asked = cohort
        self._last_arrays = arrays  # the global model of this round, before aggregation (what the update recorder needs)
        messages = [Message(content, dst_node_id=self.directory.node_of[p], message_type=keys.TRAIN) for p in cohort]
        if self.asks_partial_sums:  # a CohortGrid in the chain lets its workers sum (packing: not a byte the clients send)
            for layer in grid_chain(grid):
                allow = getattr(layer, "allow_partial_sums", None)
                if callable(allow):
                    allow(messages)
        return messages

    @property
    def asks_partial_sums(self) -> bool:
        """Whether this round's training messages let cohort workers reply with partial sums (see `partial_sums`)."""
        return self.partial_sums and self.streaming and self.update_recorder is None and self.arrayrecord_key == keys.ARRAYS

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop; with `streaming`, through a StreamingGrid so that replies reach aggregate_train as they arrive."""
        return super().start(
            StreamingGrid(grid) if self.streaming else grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    def check_train(self, absolute_round: int, partition: int | None, reply: Message) -> int | None:
        """The example count of a reply that passes validation; None for an error reply (a failure) or a rejected one."""
        if reply.has_error():
            record_failure(self.failures, "train", partition, reply.error.reason or f"error code {reply.error.code}", absolute_round)
            return None
        try:
            if partition is None:
                raise InvalidReplyError(f"reply from node {reply.metadata.src_node_id}, which serves no known partition")
            return check_train_reply(reply, self._last_arrays, self.arrayrecord_key)
        except InvalidReplyError as err:
            record_rejection(self.rejected, "train", partition, reply, str(err), absolute_round)
            return None

    def valid_train_replies(self, absolute_round: int, replies: Iterable[Message]) -> list[Message]:
        """The training replies that pass validation, plus the error replies (FedAvg logs and skips them); see `check_train`."""
        partition_of = {nid: p for p, nid in self.directory.node_of.items()}
        return [
            reply
            for reply in replies
            if self.check_train(absolute_round, partition_of.get(reply.metadata.src_node_id), reply) is not None or reply.has_error()
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The example-weighted mean of the valid replies' models and metrics; then the recorder and the progress hook.

        Streaming: each reply is validated, recorded, folded into a float64 running sum and released as it
        comes. Gathered (`streaming=False`): Flower's FedAvg over the valid replies in partition order.
        """
        if self.streaming:
            arrays, metrics = self.fold_train_replies(server_round, replies)
        else:
            arrays, metrics = self.aggregate_gathered(server_round, replies)
        if self.on_round_end is not None and arrays is not None:
            self.on_round_end(server_round + self.round_offset, arrays, metrics)
        return arrays, metrics

    def fold_train_replies(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, record and fold each reply as it arrives, dropping its model right after: the round is never held at once."""
        absolute_round = server_round + self.round_offset
        partition_of = {nid: p for p, nid in self.directory.node_of.items()}
        recorder = streaming_recorder(self.update_recorder) if self.update_recorder is not None else None
        models = WeightedModelSum()
        names: list[str] = []  # tensor order of the first model (not the model: that would keep one reply alive)
        # The metrics alone (a few numbers per client) are kept, to be averaged by FedAvg's own function in partition order.
        metric_contents: list[tuple[int, RecordDict]] = []
        metric_keys: set[str] | None = None
        errors = 0
        book: PartialSumBook | None = None
        for reply in replies:
            partition = partition_of.get(reply.metadata.src_node_id)
            if partition is not None and not reply.has_error() and is_summed(reply.content):
                template = self._last_arrays
                assert template is not None  # configure_train set it: summed replies answer this round's messages
                if book is None:  # hashing the model costs a pass over it: only in rounds that get partial sums
                    book = PartialSumBook(template, model_version(template), self._asked)
                try:
                    folded = book.take(partition, reply.content, models, metric_keys, f"reply from node {reply.metadata.src_node_id}")
                except InvalidReplyError as err:
                    record_rejection(self.rejected, "train", partition, reply, str(err), absolute_round)
                    folded = []
                for client, metric_record in folded:
                    metric_keys = metric_keys if metric_keys is not None else set(metric_record.keys())
                    metric_contents.append((client, RecordDict({keys.METRICS: metric_record})))
                if folded and not names:
                    names = list(template.keys())  # a partial sum has the global model's tensors (the book checked)
                for name in [n for n, r in reply.content.items() if isinstance(r, ArrayRecord)]:
                    del reply.content[name]  # the running sum holds all the server needs of it
                continue
            count = self.check_train(absolute_round, partition, reply)
            if count is not None:
                assert partition is not None  # check_train rejects a reply from an unknown node
                metric_record = reply.content.metric_records[keys.METRICS]
                if metric_keys is None:
                    metric_keys = set(metric_record.keys())
                elif set(metric_record.keys()) != metric_keys:  # FedAvg refuses the whole round for this; one reply is refused here
                    reason = f"reports metrics {sorted(metric_record.keys())}, the round's first reply {sorted(metric_keys)}: cannot average them"
                    record_rejection(self.rejected, "train", partition, reply, reason, absolute_round)
                    count = None
            if count is None:
                errors += reply.has_error()
                if not reply.has_error():  # a rejected reply is released too
                    for name in [n for n, r in reply.content.items() if isinstance(r, ArrayRecord)]:
                        del reply.content[name]
                continue
            assert partition is not None
            record = reply.content[self.arrayrecord_key]  # not `array_records`: that view is a cycle that would keep the model
            assert isinstance(record, ArrayRecord)  # check_train_reply made sure
            if recorder is not None and self._last_arrays is not None:
                recorder.record_client(absolute_round, partition, record, count, self._last_arrays)
            models.add({name: array.numpy() for name, array in record.items()}, count)
            names = names or list(record.keys())
            metric_contents.append((partition, RecordDict({keys.METRICS: metric_record})))
            del reply.content[self.arrayrecord_key]  # released: the running sum holds all the server needs of it
            del record
        if book is not None:
            for client, reason in book.settle():
                record_rejection(self.rejected, "train", client, int(self.directory.node_of.get(client, -1)), reason, absolute_round)
        if recorder is not None:
            recorder.end_round(absolute_round, models.total_weight)
        summed = "" if book is None else f" ({len(book.covered)} of them in {len(set(book.covered.values()))} cohort partial sums)"
        log(INFO, "aggregate_train: folded %s results as they arrived%s, %s failures", models.count, summed, errors)
        if not models.count:
            return None, None
        mean = models.mean()
        arrays = ArrayRecord({name: Array(mean[name]) for name in names})
        metric_contents.sort(key=lambda item: item[0])
        metrics = self.train_metrics_aggr_fn([content for _, content in metric_contents], self.weighted_by_key)
        return arrays, metrics

    def aggregate_gathered(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvg over the valid replies in partition order (every model held at once); the recorder sees the round."""
        ordered = self.in_partition_order(self.valid_train_replies(server_round + self.round_offset, replies))
        if self.update_recorder is not None and self._last_arrays is not None:
            partition_of = {nid: p for p, nid in self.directory.node_of.items()}
            clients = {
                partition_of[r.metadata.src_node_id]: (
                    r.content.array_records[self.arrayrecord_key],
                    as_int(r.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES]),
                )
                for r in ordered
                if not r.has_error()
                and r.metadata.src_node_id in partition_of
                and self.arrayrecord_key in r.content.array_records
                and keys.METRICS in r.content.metric_records
            }
            if isinstance(self.update_recorder, StreamingRecorder):
                for partition, (record, count) in clients.items():
                    self.update_recorder.record_client(server_round + self.round_offset, partition, record, count, self._last_arrays)
                self.update_recorder.end_round(server_round + self.round_offset, sum(n for _, n in clients.values()))
            else:
                self.update_recorder(server_round + self.round_offset, clients, self._last_arrays)
        arrays, metrics = super().aggregate_train(server_round, ordered)
        # Flower's start() keeps this round's replies referenced until the next round's arrive: drop their models now,
        # or two rounds of client models are held at once (measured: 14.4 GB at 1000 McMahan-CNN clients).
        for reply in ordered:
            if not reply.has_error() and self.arrayrecord_key in reply.content.array_records:
                del reply.content[self.arrayrecord_key]
        return arrays, metrics
