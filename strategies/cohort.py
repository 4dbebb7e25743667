"""The `cohort` execution mode: each Flower SuperNode hosts a cohort of virtual clients and trains them as one vectorised computation.

Server side, `CohortGrid` wraps the real Grid and shows the strategies one virtual node per
client: the strategies stay unchanged. Messages to the virtual clients of one physical node are
packed into one Message per (node, message type) and the packed reply is unpacked into one reply
per virtual message, each looking exactly like a per-node reply. Wrap it in the MeteredGrid
(`MeteredGrid(CohortGrid(grid, ...), meter)`) so rounds, participations and bytes are counted per
virtual client, as in `per-node` mode.

Client side, `build_cohort_client_app` returns the ClientApp each physical node runs: it trains
the selected virtual clients with `fedunlearn.cohort.cohort_local_train` (one vmap over their
stacked parameters) and serves every other message with the per-client ClientApp, once per
virtual client, with that client's own Context (partition id, state). Gradient caches are on disk
keyed by partition id, so they stay per virtual client.

The physical node whose `partition-id` is k hosts the virtual clients [k*c, min((k+1)*c, N)),
c = cohort size, N = clients. One `query.cohort` round at start tells the grid which node is which.

Packing: a packed RecordDict holds each distinct record once under `r<j>` (records that are the
same object in several virtual messages, such as the global model, are sent once) and a manifest
ConfigRecord with, per virtual client, its partition id and (record name, packed key) pairs, or
the error it answered with.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedunlearn.cohort import DEFAULT_CHUNK_SIZE, cohort_local_train
from fedunlearn.deletion import decode_ledger, kept_indices
from fedunlearn.errors import ConfigError, MissingRepliesError

from . import keys
from .faults import FaultyClientApp
from .fedavg import model_version
from .grid_wrapper import GridWrapper
from .partial_sums import summarise
from .runtime import ClientRuntime, ClientSpec, train_seed, train_settings_from
from .streaming import ReplyStream, poll_interval_of
from .wire import as_int, as_ints

if TYPE_CHECKING:
    from fedunlearn.config import ExperimentConfig

__all__ = [
    "CohortClientApp",
    "CohortGrid",
    "QUERY_COHORT",
    "build_cohort_client_app",
    "cohort_partitions",
    "cohort_size_for",
    "cohort_size_of",
    "manifest_of",
    "num_cohorts",
    "pack",
    "unpack",
    "virtual_node_id",
]

# The wire keys of cohort mode (defined in keys.py with every other one).
QUERY_COHORT = keys.QUERY_COHORT
MANIFEST = keys.COHORT_MANIFEST
MANIFEST_KEY = keys.COHORT_MANIFEST_KEY
COHORT_RECORD = keys.COHORT_RECORD
COHORT_INDEX = keys.COHORT_INDEX
COHORT_PARTITIONS = keys.COHORT_PARTITIONS
STATE_PREFIX = "cohort-client-"  # per-virtual-client records in the physical node's context.state
# A packed reply to a gradient query or caching round holds about this many bytes of arrays at most (CohortGrid._chunks).
REPLY_BUDGET_BYTES = 64 * 2**20
# Virtual node ids: far above any partition id, nonzero, never the SuperLink's id (1).
VIRTUAL_NODE_BASE = 1 << 40

logger = logging.getLogger("fedunlearn.cohort")


def virtual_node_id(partition: int) -> int:
    """The node id the strategies see for virtual client `partition` (deterministic, unique, nonzero)."""
    return VIRTUAL_NODE_BASE + partition


def num_cohorts(num_clients: int, cohort_size: int) -> int:
    """How many physical nodes host `num_clients` virtual clients, `cohort_size` each (the last may hold fewer)."""
    if cohort_size < 1 or num_clients < 1:
        raise ConfigError(f"cohort-size={cohort_size}, num-clients={num_clients}: both must be >= 1")
    return math.ceil(num_clients / cohort_size)


def cohort_partitions(index: int, cohort_size: int, num_clients: int) -> range:
    """The partition ids the physical node of cohort `index` hosts."""
    return range(index * cohort_size, min((index + 1) * cohort_size, num_clients))


AUTO_COHORT_CAP = 64  # largest cohort the automatic size picks (see cohort_size_for)


def cohort_size_for(
    num_clients: int,
    requested: int = 0,
    num_cpus_per_worker: float = 1.0,
    num_gpus_per_worker: float = 0.0,
    cpus: int | None = None,
    gpus: int | None = None,
) -> int:
    """`requested`, or for 0 ceil(num_clients / W), at most AUTO_COHORT_CAP, with W the workers that fit here (CPUs, GPUs when asked)."""
    if requested < 0:
        raise ConfigError(f"cohort-size={requested}: must be >= 0 (0 picks one cohort per worker that fits)")
    if requested > 0:
        return min(requested, num_clients)
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    workers = int(cpus // num_cpus_per_worker) if num_cpus_per_worker > 0 else cpus
    if num_gpus_per_worker > 0:
        gpus = torch.cuda.device_count() if gpus is None else gpus
        if gpus > 0:
            workers = min(workers, int(gpus // num_gpus_per_worker))
    # A cohort's training reply carries one model per client: uncapped, 1000 clients on 2 workers meant replies of
    # 500 models (3.3 GB each for the McMahan CNN) and 19 GB held at once. 64 is also the vmap chunk.
    return min(math.ceil(num_clients / max(1, workers)), AUTO_COHORT_CAP)


# ----- packing ------------------------------------------------------------------------------------------
Entry = tuple[int, "RecordDict | Error"]


def pack(entries: Sequence[Entry], partial_sums: bool = False) -> RecordDict:
    """One RecordDict holding every (partition, content or error); a record object shared by several is stored once.

    `partial_sums` (train messages): the worker may answer with one partial sum of its clients' models
    (strategies/partial_sums.py). It travels in the manifest, which is packing, never metered per client.
    """
    packed = RecordDict()
    key_of: dict[int, str] = {}
    clients: list[dict[str, object]] = []
    for partition, content in entries:
        if isinstance(content, Error):
            clients.append({"pid": partition, "error": [int(content.code), content.reason or ""]})
            continue
        names = []
        for name, record in content.items():
            key = key_of.get(id(record))
            if key is None:
                key = key_of[id(record)] = f"r{len(key_of)}"
                packed[key] = record
            names.append([name, key])
        clients.append({"pid": partition, "records": names})
    manifest: dict[str, object] = {"clients": clients}
    if partial_sums:
        manifest[keys.PARTIAL_SUMS] = True
    packed[MANIFEST] = ConfigRecord({MANIFEST_KEY: json.dumps(manifest)})
    return packed


def manifest_of(packed: RecordDict) -> dict[str, Any]:
    """The manifest of a packed RecordDict (which records belong to which virtual client, and the packing's flags)."""
    if MANIFEST not in packed.config_records:
        raise ValueError(f"not a packed cohort message: it has no {MANIFEST!r} record (records: {list(packed)})")
    return dict(json.loads(str(packed.config_records[MANIFEST][MANIFEST_KEY])))


def unpack(packed: RecordDict) -> list[Entry]:
    """The (partition, content or error) pairs of a packed RecordDict; shared records stay one object."""
    manifest = manifest_of(packed)
    entries: list[Entry] = []
    for client in manifest["clients"]:
        if "error" in client:
            code, reason = client["error"]
            entries.append((int(client["pid"]), Error(code=int(code), reason=str(reason))))
        else:
            entries.append((int(client["pid"]), RecordDict({name: packed[key] for name, key in client["records"]})))
    return entries


def _set_message_id(message: Message) -> str:
    message_id = str(uuid4())
    message.metadata.__dict__["_message_id"] = message_id
    return message_id


# ----- server side ----------------------------------------------------------------------------------------
class CohortGrid(GridWrapper):
    """Shows the strategies one virtual node per client; sends each physical node one packed message per message type.

    `num_clients` virtual clients in cohorts of `cohort_size`; the wrapped grid must have exactly
    num_cohorts(num_clients, cohort_size) nodes running the cohort ClientApp built with the same sizes.
    `reply_budget_bytes` (default REPLY_BUDGET_BYTES): a node's non-training messages that carry arrays go in
    chunks whose replies hold about that much, one chunk at a time (`_chunks`).
    """

    grid: Grid

    def __init__(
        self, grid: Grid, num_clients: int, cohort_size: int, timeout: float = 120.0, reply_budget_bytes: int | None = None
    ) -> None:
        super().__init__(grid)
        self.num_clients = num_clients
        self.cohort_size = cohort_size
        self.reply_budget_bytes = REPLY_BUDGET_BYTES if reply_budget_bytes is None else reply_budget_bytes
        self.num_cohorts = num_cohorts(num_clients, cohort_size)
        self.timeout = timeout
        self._node_of: dict[int, int] | None = None  # partition -> physical node id
        self._pending: dict[str, list[Message]] = {}  # packed message id -> its virtual messages (push/pull)
        self._packed_of: dict[str, str] = {}  # virtual message id -> packed message id
        self._replies: dict[str, Message] = {}  # virtual message id -> its reply, once pulled
        self._partial_ok: set[int] = set()  # id() of virtual train messages whose replies may come as partial sums
        self._later: dict[int, list[tuple[Message, list[Message]]]] = {}  # physical node -> its chunks not pushed yet

    def get_node_ids(self) -> Iterable[int]:
        """One virtual node id per client once every physical node has said which cohort it hosts (empty until then)."""
        if self._node_of is None and not self._discover():
            return []
        return [virtual_node_id(p) for p in range(self.num_clients)]

    def _discover(self) -> bool:
        """Ask every physical node which cohort it hosts; False while not all of them have connected yet."""
        nodes = list(self.grid.get_node_ids())
        if len(nodes) < self.num_cohorts:
            return False
        if len(nodes) > self.num_cohorts:
            raise ConfigError(
                f"the grid has {len(nodes)} nodes, cohort mode expects {self.num_cohorts} (num-clients={self.num_clients}, "
                f"cohort-size={self.cohort_size}): start one SuperNode per cohort"
            )
        queries = [Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=QUERY_COHORT) for node in nodes]
        node_of: dict[int, int] = {}
        answered: set[int] = set()
        for reply in self.grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise MissingRepliesError(
                    f"node {node} failed the cohort query: {reply.error.reason} "
                    "(cohort mode needs every node to run build_cohort_client_app)"
                )
            record = reply.content.config_records[COHORT_RECORD]
            index = as_int(record[COHORT_INDEX])
            hosted = as_ints(record[COHORT_PARTITIONS])
            expected = list(cohort_partitions(index, self.cohort_size, self.num_clients))
            if hosted != expected:
                raise ConfigError(
                    f"node {node} hosts partitions {hosted}, the grid expects {expected} for cohort {index}: the client app "
                    f"and the grid disagree on cohort-size or num-clients (grid: {self.cohort_size}, {self.num_clients})"
                )
            if index in answered:
                raise ConfigError(f"two nodes claim cohort {index}: each node's partition-id must be a distinct cohort index")
            answered.add(index)
            node_of.update({p: node for p in hosted})
        missing = sorted(set(range(self.num_cohorts)) - answered)
        if missing:
            raise MissingRepliesError(f"cohorts {missing} did not answer the cohort query within {self.timeout:.0f} s")
        self._node_of = node_of
        return True

    def allow_partial_sums(self, messages: Iterable[Message]) -> None:
        """Let the workers answer these train messages (about to be pushed) with partial sums; forgotten at the next push.

        UnlearningFedAvg calls it from configure_train when it can fold partial sums (strategies/partial_sums.py); a
        strategy that never calls it gets one reply with one model per client, as always.
        """
        self._partial_ok.update(id(m) for m in messages)

    def partition_of(self, node_id: int) -> int:
        """The virtual client behind a virtual node id."""
        partition = node_id - VIRTUAL_NODE_BASE
        if not 0 <= partition < self.num_clients:
            raise ValueError(
                f"node id {node_id} is not a virtual node of this CohortGrid (ids {VIRTUAL_NODE_BASE}.."
                f"{VIRTUAL_NODE_BASE + self.num_clients - 1}): address clients through get_node_ids()"
            )
        return partition

    def _pack(self, messages: Iterable[Message]) -> list[tuple[Message, list[Message]]]:
        """(packed message, its virtual messages) per (physical node, message type); every virtual message gets an id."""
        if self._node_of is None and not self._discover():
            raise MissingRepliesError(f"only {len(list(self.grid.get_node_ids()))} of {self.num_cohorts} cohort nodes are connected")
        assert self._node_of is not None
        allowed, self._partial_ok = self._partial_ok, set()
        groups: OrderedDict[tuple[int, str], list[Message]] = OrderedDict()
        for message in messages:
            _set_message_id(message)
            node = self._node_of[self.partition_of(message.metadata.dst_node_id)]
            groups.setdefault((node, message.metadata.message_type), []).append(message)
        packed = []
        for (node, message_type), group in groups.items():
            partial = message_type == keys.TRAIN and all(id(m) in allowed for m in group)
            chunks = [group] if message_type == keys.TRAIN else self._chunks(group)
            for chunk in chunks:
                content = pack([(self.partition_of(m.metadata.dst_node_id), m.content) for m in chunk], partial_sums=partial)
                ttl = min(m.metadata.ttl for m in chunk)
                packed.append(
                    (Message(content, dst_node_id=node, message_type=message_type, ttl=ttl, group_id=chunk[0].metadata.group_id), chunk)
                )
        return packed

    def _chunks(self, group: list[Message]) -> list[list[Message]]:
        """A node's virtual messages of one type in chunks whose replies hold about `reply_budget_bytes` of arrays.

        The replies to a gradient query or a caching round carry one model-sized vector per client: 64 of the
        McMahan CNN's are 425 MB per packed reply, held by the worker, Ray's copy and the driver at once (the memory
        benchmark measured it). The size of the largest array record a message carries (the model it is sent) stands
        for the size of its reply. Training messages are never chunked: the cohort trains as one computation, and
        its reply is one partial sum when the strategy allows it.
        """
        largest = max((record.count_bytes() for record in group[0].content.values() if isinstance(record, ArrayRecord)), default=0)
        if largest == 0 or len(group) * largest <= self.reply_budget_bytes:
            return [group]
        count = math.ceil(len(group) / max(1, self.reply_budget_bytes // largest))
        size = math.ceil(len(group) / count)  # even chunks: 64 clients at 9 per chunk go 8 x 8, not 7 x 9 + 1
        return [group[i : i + size] for i in range(0, len(group), size)]

    def _node_of_message(self, group: list[Message]) -> int:
        assert self._node_of is not None
        return self._node_of[self.partition_of(group[0].metadata.dst_node_id)]

    @staticmethod
    def _unpack(reply: Message, group: list[Message]) -> list[Message]:
        """One per-node-style reply per virtual message the packed reply answers (none for a client it leaves out)."""
        if reply.has_error():  # the whole physical node failed: so did every virtual client it was serving
            return [_with_id(Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=m)) for m in group]
        by_partition = {VIRTUAL_NODE_BASE + p: content for p, content in unpack(reply.content)}
        replies = []
        for message in group:
            content = by_partition.get(message.metadata.dst_node_id)
            if content is None:
                continue
            replies.append(_with_id(Message(content, reply_to=message)))  # content is a RecordDict or the client's Error
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Pack and push; returns the virtual messages' ids.

        A node's chunks (see `_chunks`) go one at a time: the next is pushed when the previous one's reply is pulled,
        so a worker never serves two messages at once (its Context would be written back by both) and at most one
        chunk's replies per node are on their way.
        """
        return self._schedule(self._pack(messages))

    def _schedule(self, packed: list[tuple[Message, list[Message]]]) -> list[str]:
        """Push each node's first chunk now and queue the rest (`_push_next`); the virtual messages' ids."""
        ids: list[str] = []
        now: list[tuple[Message, list[Message]]] = []
        for message, group in packed:
            ids.extend(m.metadata.message_id for m in group)
            node = message.metadata.dst_node_id
            if node in self._later or any(p.metadata.dst_node_id == node for p, _ in now):
                self._later.setdefault(node, []).append((message, group))
            else:
                now.append((message, group))
        self._push(now)
        return ids

    def _push(self, packed: list[tuple[Message, list[Message]]]) -> None:
        pushed = set(self.grid.push_messages([p for p, _ in packed]))
        for message, group in packed:
            packed_id = message.metadata.message_id
            if packed_id in pushed:
                self._pending[packed_id] = group
                self._packed_of.update({m.metadata.message_id: packed_id for m in group})

    def _push_next(self, node: int) -> None:
        """The node answered its chunk: push its next one, if it has one waiting."""
        waiting = self._later.get(node)
        if not waiting:
            return
        self._push([waiting.pop(0)])
        if not waiting:
            del self._later[node]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies available for these virtual message ids, unpacked one physical reply at a time as the caller consumes them.

        A generator: each packed reply is pulled from the wrapped grid only when the virtual replies of the
        previous one have been taken, so a caller that folds and drops each reply (UnlearningFedAvg's streamed
        round) holds one cohort's models at a time, not the round's.
        """
        return self._pull(list(message_ids))

    def _pull(self, wanted: list[str]) -> Iterator[Message]:
        wanted_set = set(wanted)
        for message_id in wanted:
            if message_id in self._replies:  # unpacked by an earlier pull that did not ask for it
                wanted_set.discard(message_id)
                yield self._replies.pop(message_id)
        asked = {self._packed_of[i] for i in wanted_set if i in self._packed_of}
        for packed_id in [p for p in self._pending if p in asked]:  # in push order: in-process runs fold in one order
            for reply in self.grid.pull_messages([packed_id]):
                group = self._pending.pop(reply.metadata.reply_to_message_id, None)
                if group is None:
                    continue
                self._push_next(self._node_of_message(group))
                for message in group:
                    self._packed_of.pop(message.metadata.message_id, None)
                virtuals = self._unpack(reply, group)[::-1]
                if not reply.has_error():  # the virtual replies hold the records now: each is freed with its reply
                    for key in list(reply.content.keys()):
                        del reply.content[key]
                del reply
                try:
                    while virtuals:
                        virtual = virtuals.pop()
                        if virtual.metadata.reply_to_message_id in wanted_set:
                            yield virtual
                        else:
                            self._replies[virtual.metadata.reply_to_message_id] = virtual
                finally:  # the caller stopped early: keep what it did not take for a later pull
                    for virtual in virtuals:
                        self._replies[virtual.metadata.reply_to_message_id] = virtual

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send one packed message per (physical node, type), wait, and unpack the replies."""
        messages = list(messages)
        if not messages:
            return []
        packed = self._pack(messages)
        if len({p.metadata.dst_node_id for p, _ in packed}) < len(packed):  # some node has several chunks: one at a time
            return list(ReplyStream(self, self._schedule(packed), timeout, poll_interval_of(self.grid)))
        replies = list(self.grid.send_and_receive([p for p, _ in packed], timeout=timeout))
        group_of = {p.metadata.message_id: group for p, group in packed}
        out: list[Message] = []
        for reply in replies:
            group = group_of.pop(reply.metadata.reply_to_message_id, None)
            if group is not None:
                out.extend(self._unpack(reply, group))
        return out


def _with_id(message: Message) -> Message:
    _set_message_id(message)
    return message


# ----- client side ----------------------------------------------------------------------------------------
def _error_of(err: Exception) -> Error:
    """The error reply the simulation engine gives for an exception raised in a ClientApp."""
    return Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err)}:<'{err}'>")


class CohortClientApp(ClientApp):
    """The ClientApp of a physical node hosting the virtual clients of one cohort (see the module docstring)."""

    def __init__(
        self, spec: ClientSpec, cohort_size: int, inner: ClientApp, vectorise_train: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        super().__init__()
        if cohort_size < 1:
            raise ConfigError(f"cohort_size={cohort_size}: must be >= 1 (virtual clients per node)")
        self.spec = spec
        self.cohort_size = cohort_size
        self.num_clients = spec.data.num_clients
        self.inner = inner
        self.vectorise_train = vectorise_train
        self.chunk_size = chunk_size

    def __call__(self, message: Message, context: Context) -> Message:
        """Serve a packed message for the virtual clients of this node's cohort (or the cohort query)."""
        index = int(context.node_config["partition-id"])
        hosted = cohort_partitions(index, self.cohort_size, self.num_clients)
        message_type = message.metadata.message_type
        if message_type == QUERY_COHORT:
            record = ConfigRecord({COHORT_INDEX: index, COHORT_PARTITIONS: list(hosted)})
            return Message(RecordDict({COHORT_RECORD: record}), reply_to=message)
        entries = unpack(message.content)
        partial_sums = bool(manifest_of(message.content).get(keys.PARTIAL_SUMS, False))
        for partition, _ in entries:
            if partition not in hosted:
                raise ValueError(
                    f"cohort {index} hosts partitions {list(hosted)}, got a message for partition {partition}: "
                    "the grid and the client app disagree on cohort-size"
                )
        contents = [content for _, content in entries if isinstance(content, RecordDict)]
        shared = message_type == keys.TRAIN and len(contents) == len(entries) and self._shared(contents)
        results: Iterable[Entry]
        if shared and self.vectorise_train:
            results = self._train(entries, contents)
        else:  # a generator: with partial sums, each client's model is summed and dropped before the next one trains
            results = ((p, self._serve_one(message, p, c, context)) for p, c in entries if isinstance(c, RecordDict))
        if shared and partial_sums:
            template = contents[0][keys.ARRAYS]
            assert isinstance(template, ArrayRecord)  # _shared made sure
            results = summarise(results, template, model_version(template), lambda p: f"reply from node {virtual_node_id(p)}")
        return Message(pack(list(results)), reply_to=message)

    @staticmethod
    def _shared(contents: list[RecordDict]) -> bool:
        """Every virtual message carries the same model and the same config (what FedAvg sends)."""
        return (
            all(keys.ARRAYS in c.array_records and keys.CONFIG in c.config_records for c in contents)
            and len({id(c[keys.ARRAYS]) for c in contents}) == 1
            and len({id(c[keys.CONFIG]) for c in contents}) == 1
        )

    def _train(self, entries: list[Entry], contents: list[RecordDict]) -> list[Entry]:
        """Train every virtual client of the message at once; replies as the per-client train handler writes them."""
        start = time.perf_counter()
        runtime = ClientRuntime.get(self.spec)
        config = contents[0].config_records[keys.CONFIG]
        settings = train_settings_from(config)
        ledger = decode_ledger(str(config.get(keys.LEDGER, "")))
        partitions = [p for p, _ in entries]
        indices = [kept_indices(runtime.data, p, ledger) for p in partitions]
        data = [runtime.arrays_xy(i) for i in indices]
        runtime.load(contents[0].array_records[keys.ARRAYS])
        generators = [torch.Generator().manual_seed(train_seed(config, p)) for p in partitions]
        result = cohort_local_train(runtime.model, [x for x, _ in data], [y for _, y in data], settings, generators, self.chunk_size)
        elapsed = time.perf_counter() - start
        total = sum(len(i) for i in indices)
        results: list[Entry] = []
        for partition, idx, state, loss in zip(partitions, indices, result.states, result.losses, strict=True):
            # The vectorised work has no per-client clock: each client is charged its share of the examples.
            share = len(idx) / total if total else 1.0 / len(partitions)
            content = RecordDict(
                {keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: len(idx), keys.TRAIN_LOSS: loss, keys.COMPUTE_S: elapsed * share})}
            )
            content[keys.ARRAYS] = ArrayRecord(OrderedDict((k, v.detach().cpu()) for k, v in state.items()))
            results.append((partition, content))
        return results

    def _serve_one(self, message: Message, partition: int, content: RecordDict, context: Context) -> RecordDict | Error:
        """One virtual message through the per-client app, with that client's own Context; an exception is its error reply."""
        # Flower's overloads leave out `metadata=`, the internal way (kept at runtime) to copy a message's metadata as is.
        sub = Message(metadata=copy.copy(message.metadata), content=content)  # type: ignore[call-overload]
        prefix = f"{STATE_PREFIX}{partition}/"
        state = RecordDict({name[len(prefix) :]: record for name, record in context.state.items() if name.startswith(prefix)})
        virtual = Context(
            run_id=context.run_id,
            node_id=virtual_node_id(partition),
            node_config={"partition-id": partition, "num-partitions": self.num_clients},
            state=state,
            run_config=context.run_config,
        )
        try:
            reply = self.inner(sub, virtual)
        except Exception as err:  # noqa: BLE001 - the engine turns a per-node exception into that node's error reply
            logger.warning("virtual client %d raised while serving %s: %s", partition, message.metadata.message_type, err)
            return _error_of(err)
        finally:
            for name in [n for n in context.state if n.startswith(prefix)]:
                del context.state[name]
            for name, record in virtual.state.items():
                context.state[prefix + name] = record
        return reply.error if reply.has_error() else reply.content


def build_cohort_client_app(
    spec: ClientSpec, cohort_size: int, inner: ClientApp, chunk_size: int = DEFAULT_CHUNK_SIZE, vectorise: bool | None = None
) -> ClientApp:
    """The ClientApp of a node hosting `cohort_size` virtual clients; `inner` (the per-client app) serves all but vectorised training.

    `vectorise`: train the selected clients as one vmap computation (True) or one after another
    through `inner` (False); None picks vmap on a CUDA device and the loop on a CPU, where vmap over
    convolutions measured about 2x slower than the loop. With a fault-injecting `inner` (a
    FaultyClientApp), training always goes through it, once per virtual client, so faults stay per
    virtual client.
    """
    app = inner
    if vectorise is None:
        vectorise = spec.device.startswith("cuda")
    return CohortClientApp(
        spec, cohort_size, app, vectorise_train=vectorise and not isinstance(app, FaultyClientApp), chunk_size=chunk_size
    )


def cohort_size_of(cfg: ExperimentConfig) -> int:
    """The cohort size an experiment runs with (`cfg.cohort_size`, or the automatic one for 0)."""
    return cohort_size_for(cfg.num_clients, cfg.cohort_size, cfg.num_cpus_per_client, cfg.num_gpus_per_client)
