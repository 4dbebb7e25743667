"""IAU-Fed: FedAvg for training plus the distributed IAU correction when a client withdraws."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedunlearn.deletion import DeletionRequest
from fedunlearn.errors import InvalidReplyError, MissingRepliesError
from fedunlearn.gradients import ParamLayout
from fedunlearn.iau import PROTOCOLS, CorrectionStepper, IAUSettings, direction_from_total

from . import keys
from .fedavg import UnlearningFedAvg, model_version


@dataclass
class UnlearningReport:
    """What one unlearning request did: protocol, rounds, clients asked and answered, cache use."""

    method: str
    protocol: str
    request: dict[str, Any]
    forget_count: int
    remaining_count: int
    rounds: int = 0
    clients_asked: list[int] = field(default_factory=list)
    clients_answered: list[int] = field(default_factory=list)
    cache_hits: int = 0
    stale_caches: list[int] = field(default_factory=list)
    direction_norm: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for results.json."""
        return asdict(self)


def arrays_to_vector(arrays: ArrayRecord, layout: ParamLayout) -> torch.Tensor:
    """Trainable parameters of an ArrayRecord as one float64 vector."""
    state = arrays.to_torch_state_dict()
    return layout.flatten({n: state[n].to(torch.float64) for n in layout.names})


def vector_to_arrays(vector: torch.Tensor, template: ArrayRecord, layout: ParamLayout) -> ArrayRecord:
    """A copy of `template` with its trainable parameters replaced by `vector` (dtypes kept)."""
    state = template.to_torch_state_dict()
    for name, value in layout.unflatten(vector).items():
        state[name] = value.to(state[name].dtype).clone()
    return ArrayRecord(OrderedDict(state))


def gradient_from_reply(reply: Message, layout: ParamLayout) -> torch.Tensor:
    """The gradient vector a client sent, checked against the model's layout."""
    if keys.GRADIENT not in reply.content.array_records:
        raise InvalidReplyError(f"reply from node {reply.metadata.src_node_id} has no '{keys.GRADIENT}' ArrayRecord")
    record = reply.content[keys.GRADIENT]
    parts = {}
    for name, shape in zip(layout.names, layout.shapes):
        if name not in record:
            raise InvalidReplyError(f"reply from node {reply.metadata.src_node_id} lacks gradient tensor {name!r}")
        array = record[name].numpy()
        if tuple(array.shape) != tuple(shape):
            raise InvalidReplyError(f"reply from node {reply.metadata.src_node_id}: gradient {name!r} has shape {array.shape}, expected {shape}")
        parts[name] = torch.from_numpy(np.asarray(array, dtype=np.float64))
    vector = layout.flatten(parts)
    if not torch.isfinite(vector).all():
        raise InvalidReplyError(f"reply from node {reply.metadata.src_node_id} holds non-finite gradient values")
    return vector


class IAUFed(UnlearningFedAvg):
    """UnlearningFedAvg plus `fill_caches` (the final evaluation) and `unlearn` (the IAU correction).

    Use it as the training strategy of any ServerApp (`strategy.start(...)`), then call
    `fill_caches` once after training and `unlearn` for each deletion request.
    """

    def __init__(self, *, layout: ParamLayout, iau: IAUSettings, gradient_dtype: str = "float32",
                 allow_stale: bool = False, round_timeout: float = 600.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layout = layout
        self.iau = iau
        self.gradient_dtype = gradient_dtype
        self.allow_stale = allow_stale
        self.round_timeout = round_timeout
        # Cached protocol: the aggregate G_tot over the remaining data, at one model version.
        self.gradient_total: torch.Tensor | None = None
        self.gradient_total_count = 0
        self.gradient_total_version = ""
        self._excluded_counts: dict[int, int] = {}

    def branch(self) -> "IAUFed":
        """An independent copy (ledger, counts, aggregate cache) so several methods can start from one state."""
        other = copy.copy(self)
        other._excluded_counts = dict(self._excluded_counts)
        return other

    def fill_caches(self, grid: Grid, arrays: ArrayRecord, upload: bool = False) -> dict[str, float]:
        """Final federated evaluation; each client also fills its gradient cache (and uploads it if `upload`)."""
        version = model_version(arrays)
        record = self.base_config()
        record.update({keys.CACHE_FILL: True, keys.CACHE_UPLOAD: upload, keys.MODEL_VERSION: version, "gradient-dtype": self.gradient_dtype})
        content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: record})
        partitions = self.active_partitions()
        messages = [Message(content, dst_node_id=self.directory.node_of[p], message_type=keys.EVALUATE) for p in partitions]
        replies = self.in_partition_order(grid.send_and_receive(messages, timeout=self.round_timeout))
        failed = [r for r in replies if r.has_error()]
        if failed or len(replies) < len(messages):
            raise MissingRepliesError(f"{len(messages) - len(replies) + len(failed)} client(s) did not complete the caching round")
        total = torch.zeros(self.layout.numel, dtype=torch.float64)
        count, loss_sum, acc_sum, heldout = 0, 0.0, 0.0, 0
        for reply in replies:
            metrics = reply.content[keys.METRICS]
            n = int(metrics[keys.NUM_EXAMPLES])
            loss_sum += float(metrics[keys.EVAL_LOSS]) * n
            acc_sum += float(metrics[keys.EVAL_ACC]) * n
            heldout += n
            if upload:
                total += gradient_from_reply(reply, self.layout)
                count += int(metrics[keys.GRADIENT_COUNT])
        if upload:
            self.gradient_total, self.gradient_total_count, self.gradient_total_version = total, count, version
        return {"eval_loss": loss_sum / max(heldout, 1), "eval_acc": acc_sum / max(heldout, 1)}

    def unlearn(self, grid: Grid, arrays: ArrayRecord, request: DeletionRequest, forget_count: int,
                protocol: str = "fresh", method: str = "iau") -> tuple[ArrayRecord, UnlearningReport]:
        """Apply the IAU correction for `request` (|S| = forget_count) and add it to the ledger."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}: must be one of {', '.join(PROTOCOLS)}")
        if request.client not in self.directory.node_of:
            raise ValueError(f"request for unknown client {request.client}: known partitions are 0..{max(self.directory.node_of)}")
        if request.client in self.withdrawn:
            raise ValueError(f"client {request.client} has already withdrawn; a repeated request has nothing left to remove")
        n_total = self.current_examples()
        remaining_count = n_total - forget_count
        report = UnlearningReport(method, protocol, asdict(request), forget_count, remaining_count)
        theta = arrays_to_vector(arrays, self.layout)
        stepper = CorrectionStepper(theta, self.iau)
        current = arrays
        if protocol == "fresh":
            for _ in range(self.iau.steps):
                direction = self._fresh_direction(grid, current, request, remaining_count, report)
                theta = stepper.step(direction)
                current = vector_to_arrays(theta, arrays, self.layout)
        else:
            direction = self._cached_direction(grid, current, request, forget_count, report)
            for _ in range(self.iau.steps):
                theta = stepper.step(direction)
            current = vector_to_arrays(theta, arrays, self.layout)
        self.ledger = (*self.ledger, request)
        self._excluded_counts[request.client] = self._excluded_counts.get(request.client, 0) + forget_count
        return current, report

    def current_examples(self) -> int:
        """n: training examples still held by the active clients."""
        return sum(self.directory.num_train[p] - self._excluded_counts.get(p, 0) for p in self.active_partitions())

    def _query(self, arrays: ArrayRecord, request: DeletionRequest, role: str, remaining_count: int, forget_count: int) -> RecordDict:
        record = self.base_config()
        record.update({
            keys.MODEL_VERSION: model_version(arrays), keys.ROLE: role, keys.REQUEST: json.dumps(asdict(request)),
            keys.REMAINING_COUNT: remaining_count, keys.FORGET_COUNT: forget_count, keys.CORRECTION: self.iau.correction,
            keys.ALLOW_STALE: self.allow_stale, "gradient-dtype": self.gradient_dtype,
        })
        return RecordDict({keys.ARRAYS: arrays, keys.CONFIG: record})

    def _collect(self, grid: Grid, messages: list[Message], report: UnlearningReport) -> list[Message]:
        partition_of = {nid: p for p, nid in self.directory.node_of.items()}
        report.rounds += 1
        report.clients_asked = sorted(set(report.clients_asked) | {partition_of[m.metadata.dst_node_id] for m in messages})
        replies = [r for r in self.in_partition_order(grid.send_and_receive(messages, timeout=self.round_timeout)) if not r.has_error()]
        answered = {partition_of[r.metadata.src_node_id] for r in replies}
        report.clients_answered = sorted(set(report.clients_answered) | answered)
        missing = sorted({partition_of[m.metadata.dst_node_id] for m in messages} - answered)
        if missing:
            raise MissingRepliesError(f"clients {missing} did not answer the unlearning round; the model is left unchanged")
        for reply in replies:
            metrics = reply.content[keys.METRICS]
            report.cache_hits += int(metrics.get(keys.CACHE_HIT, 0))
            if int(metrics.get(keys.CACHE_STALE, 0)):
                report.stale_caches.append(partition_of[reply.metadata.src_node_id])
        return replies

    def _fresh_direction(self, grid: Grid, arrays: ArrayRecord, request: DeletionRequest, remaining_count: int,
                         report: UnlearningReport) -> torch.Tensor:
        """One round: remaining clients send G_k/(n-|S|), client u its pre-scaled difference; the sum is d."""
        messages = []
        for p in self.active_partitions():
            if p == request.client:
                content = self._query(arrays, request, keys.ROLE_WITHDRAWING, remaining_count, report.forget_count)
            elif self.iau.correction:
                content = self._query(arrays, request, keys.ROLE_REMAINING, remaining_count, report.forget_count)
            else:
                continue
            messages.append(Message(content, dst_node_id=self.directory.node_of[p], message_type=keys.QUERY_GRADIENT))
        direction = torch.zeros(self.layout.numel, dtype=torch.float64)
        for reply in self._collect(grid, messages, report):
            direction += gradient_from_reply(reply, self.layout)
        report.direction_norm = float(direction.norm())
        return direction

    def _cached_direction(self, grid: Grid, arrays: ArrayRecord, request: DeletionRequest, forget_count: int,
                          report: UnlearningReport) -> torch.Tensor:
        """Zero rounds for the others: client u uploads G_S; g_r = (G_tot - G_S)/(n - |S|); G_tot -= G_S."""
        if self.gradient_total is None:
            raise RuntimeError("cached protocol needs the aggregate cache: call fill_caches(..., upload=True) after training")
        version = model_version(arrays)
        if version != self.gradient_total_version and not self.allow_stale:
            raise RuntimeError(f"the aggregate cache is at model version {self.gradient_total_version}, the model is at {version}: "
                               "use the fresh protocol, refresh the caches, or allow stale caches")
        content = self._query(arrays, request, keys.ROLE_FORGET_ONLY, self.gradient_total_count - forget_count, forget_count)
        message = Message(content, dst_node_id=self.directory.node_of[request.client], message_type=keys.QUERY_GRADIENT)
        (reply,) = self._collect(grid, [message], report)
        forget_sum = gradient_from_reply(reply, self.layout)
        sent_count = int(reply.content[keys.METRICS][keys.FORGET_SIZE])
        if sent_count != forget_count:
            raise InvalidReplyError(f"client {request.client} reports |S|={sent_count}, the request says {forget_count}")
        direction = direction_from_total(self.gradient_total, self.gradient_total_count, forget_sum, forget_count, self.iau.correction)
        self.gradient_total = self.gradient_total - forget_sum
        self.gradient_total_count -= forget_count
        report.direction_norm = float(direction.norm())
        return direction
