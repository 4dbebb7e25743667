"""IAU-Fed: FedAvg for training plus the distributed IAU correction when a client withdraws."""

from __future__ import annotations

import copy
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedunlearn.deletion import DeletionRequest
from fedunlearn.errors import InvalidReplyError, MissingRepliesError, UnlearningAbortedError
from fedunlearn.gradients import ParamLayout
from fedunlearn.iau import PROTOCOLS, CorrectionStepper, IAUSettings, direction_from_parts, direction_from_total, withdrawing_contribution

from . import keys
from .fedavg import UnlearningFedAvg, model_version
from .rounds import MISSING_POLICIES, RoundPolicy, ask_clients
from .secagg import SecAggAbortedError, secure_caching, secure_direction
from .validation import (
    bound_norm,
    check_gradient_reply,
    check_version,
    check_withdrawal,
    finite_metric,
    gradient_vector,
    metrics_of,
    positive_count,
)
from .wire import WireSettings, as_int

logger = logging.getLogger("fedunlearn.iau_fed")

__all__ = ["MISSING_POLICIES", "GradientQuery", "IAUFed", "RoundPolicy", "UnlearningReport", "arrays_to_vector", "vector_to_arrays"]


@dataclass(frozen=True)
class GradientQuery(WireSettings):
    """What a `query.gradient` message asks of a client (besides the seed and the ledger every message carries).

    `role`: remaining, withdrawing or forget-only; `request`: the DeletionRequest served, as JSON;
    `remaining_count`: n - |S| (or n_A when renormalised); `correction`/`correction_weight`: whether and how much of
    the remaining-data term goes into the withdrawing client's vector; `allow_stale`: a remaining client may answer
    from a cache at another model version; `gradient_dtype`: the dtype the gradient travels in.
    """

    model_version: str
    role: str
    request: str
    remaining_count: int
    forget_count: int
    correction: bool = True
    correction_weight: float = 1.0
    allow_stale: bool = False
    gradient_dtype: str = "float32"

    WIRE = {
        "model_version": keys.MODEL_VERSION,
        "role": keys.ROLE,
        "request": keys.REQUEST,
        "remaining_count": keys.REMAINING_COUNT,
        "forget_count": keys.FORGET_COUNT,
        "correction": keys.CORRECTION,
        "correction_weight": keys.CORRECTION_WEIGHT,
        "allow_stale": keys.ALLOW_STALE,
        "gradient_dtype": keys.GRADIENT_DTYPE,
    }

    @property
    def deletion_request(self) -> DeletionRequest:
        """The request being served."""
        return DeletionRequest(**json.loads(self.request))


class _Abort(Exception):
    """Internal: the round cannot produce a correct update; unlearn() turns it into UnlearningAbortedError."""


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
    # What went wrong and what was done about it (faults and validation).
    status: str = "complete"  # complete | renormalised | fallback | aborted | repeat
    missing_clients: list[int] = field(default_factory=list)  # remaining clients left out after the retries
    retries: int = 0  # extra rounds spent re-asking clients
    renormalised_count: int = 0  # n_A: examples g_r was normalised by when clients were missing (0: none missing)
    clipped_clients: list[int] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # replies refused by validation, with the reason
    failures: list[dict[str, Any]] = field(default_factory=list)  # error replies and replies that never came
    fallback: str = ""  # "uploaded-cache": an offline withdrawing client's uploaded cache stood in for it
    gradient_version: str = ""  # cached protocol: the model version every gradient of the direction was taken at
    reason: str = ""
    steps: int = 0  # steps taken (each a round in the fresh protocol, a message to client u in the cached one)
    step_norms: list[float] = field(default_factory=list)  # ||theta_j+1 - theta_j|| of each step
    radius: float = 0.0  # the normalised rule's relative step length used (chosen by client u when calibrated)
    calibration: list[dict[str, float]] = field(default_factory=list)  # client u's trail: radii tried, losses seen
    remaining_term: str = ""  # cached protocol: where g_r of each step came from (the cache, or a refresh round)
    stale_drift: list[float] = field(default_factory=list)  # cached, K > 1: ||g_r used - g_r at the step's model|| / ||...||
    secure_aggregation: list[dict[str, Any]] = field(default_factory=list)  # each secure round: stages, survivors, error bound
    # The model before each step (not written to results.json): what the stale-drift measurement needs.
    step_arrays: list[ArrayRecord] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for results.json."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "step_arrays"}


def arrays_to_vector(arrays: ArrayRecord | Mapping[str, torch.Tensor], layout: ParamLayout) -> torch.Tensor:
    """Trainable parameters of an ArrayRecord (or of its decoded state dict) as one float64 vector."""
    state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
    return layout.flatten({n: state[n].to(torch.float64) for n in layout.names})


def vector_to_arrays(vector: torch.Tensor, template: ArrayRecord | Mapping[str, torch.Tensor], layout: ParamLayout) -> ArrayRecord:
    """A copy of `template` with its trainable parameters replaced by `vector` (dtypes kept).

    `template` may be an ArrayRecord's decoded state dict (`to_torch_state_dict()`, left unchanged): decoding
    every array from its bytes is most of the cost, and a multi-step correction builds one model per step
    from the same template.
    """
    state = dict(template.to_torch_state_dict() if isinstance(template, ArrayRecord) else template)
    for name, value in layout.unflatten(vector).items():
        state[name] = value.to(state[name].dtype).clone()
    return ArrayRecord(OrderedDict(state))


class IAUFed(UnlearningFedAvg):
    """UnlearningFedAvg plus `fill_caches` (the final evaluation) and `unlearn` (the IAU correction).

    Use it as the training strategy of any ServerApp (`strategy.start(...)`), then call
    `fill_caches` once after training and `unlearn` for each deletion request.
    """

    def __init__(
        self,
        *,
        layout: ParamLayout,
        iau: IAUSettings,
        gradient_dtype: str = "float32",
        allow_stale: bool = False,
        round_timeout: float = 600.0,
        policy: RoundPolicy | None = None,
        keep_client_uploads: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.policy = policy or RoundPolicy()
        # Keep each client's uploaded cache (P floats per client on the server): the ALGORITHMS.md fallback
        # for a withdrawing client that is offline at request time.
        self.keep_client_uploads = keep_client_uploads
        self.client_uploads: dict[int, tuple[torch.Tensor, int, str]] = {}
        self.cache_missing: list[int] = []
        self.layout = layout
        self.iau = iau
        self.gradient_dtype = gradient_dtype
        self.allow_stale = allow_stale
        self.round_timeout = round_timeout
        # Cached protocol: the aggregate G_tot over the remaining data, at one model version.
        self.gradient_total: torch.Tensor | None = None
        self.gradient_total_count = 0
        self.gradient_total_version = ""
        self.gradient_total_arrays: ArrayRecord | None = None  # the model G_tot was computed at (kept for later requests)
        self._excluded_counts: dict[int, int] = {}
        # Bytes each client reports its stored gradient cache occupies (filled by fill_caches).
        self.client_cache_bytes: dict[int, int] = {}

    def branch(self) -> IAUFed:
        """An independent copy (ledger, counts, aggregate cache) so several methods can start from one state."""
        other = copy.copy(self)
        other._excluded_counts = dict(self._excluded_counts)
        other.rejected, other.failures = [], []
        return other

    def fill_caches(self, grid: Grid, arrays: ArrayRecord, upload: bool = False) -> dict[str, Any]:
        """Final federated evaluation; each client also fills its gradient cache (and uploads it if `upload`).

        Replies are validated (held-out count, echoed model version, finite metrics, the uploaded
        gradient's layout); clients that do not answer are asked again up to `policy.retries` times.
        Without upload, clients still missing are listed in `cache_missing` (they compute their
        gradient when asked); with upload every client is needed for G_tot, so MissingRepliesError.
        """
        version = model_version(arrays)
        record = self.base_config()
        record.update(
            {keys.CACHE_FILL: True, keys.CACHE_UPLOAD: upload, keys.MODEL_VERSION: version, keys.GRADIENT_DTYPE: self.gradient_dtype}
        )
        content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: record})
        partitions = self.active_partitions()
        messages = [Message(content, dst_node_id=self.directory.node_of[p], message_type=keys.EVALUATE) for p in partitions]

        total = torch.zeros(self.layout.numel, dtype=torch.float64)
        wire = torch.float32 if self.gradient_dtype == "float32" else torch.float64

        def parse(partition: int, reply: Message) -> tuple[Message, None, int]:
            positive_count(reply)
            check_version(reply, version)
            finite_metric(reply, keys.EVAL_LOSS)
            finite_metric(reply, keys.EVAL_ACC)
            if not upload:
                return reply, None, 0
            count = positive_count(reply, keys.GRADIENT_COUNT)
            if secure:  # the secure sum took the vector out of the reply
                return reply, None, count
            vector = gradient_vector(reply, self.layout, self.gradient_dtype)
            # Summed as the replies arrive, and the upload dropped from the reply: 1000 clients never hold
            # 1000 float64 vectors at once (measured: 19 GB at 1000 McMahan-CNN clients before).
            total.add_(vector)
            if self.keep_client_uploads:
                self.client_uploads[partition] = (vector.to(wire), count, version)
            del reply.content[keys.GRADIENT]
            return reply, None, count

        secure = upload and self.policy.secure is not None
        if secure:  # G_tot through the secure sum: the server never holds one client's cache
            accepted, missing, total, secure_report = secure_caching(self, grid, messages, parse)
        else:
            accepted, missing = self._ask(grid, messages, "caching", parse, None)
        if missing and upload:
            raise MissingRepliesError(
                f"clients {missing} did not complete the caching round after {self.policy.retries} retries: "
                "the aggregate cache of the cached protocol needs every client (see the logged reasons)"
            )
        self.cache_missing = missing
        if missing:
            logger.warning("clients %s did not fill their caches; they will compute their gradients when asked", missing)
        count, loss_sum, acc_sum, heldout = 0, 0.0, 0.0, 0
        for partition in sorted(accepted):
            reply, _, gradient_count = accepted[partition]
            metrics = reply.content[keys.METRICS]
            n = int(metrics[keys.NUM_EXAMPLES])
            loss_sum += float(metrics[keys.EVAL_LOSS]) * n
            acc_sum += float(metrics[keys.EVAL_ACC]) * n
            heldout += n
            if keys.CACHE_BYTES in metrics:
                self.client_cache_bytes[partition] = int(metrics[keys.CACHE_BYTES])
            count += gradient_count
        if upload:
            self.gradient_total, self.gradient_total_count, self.gradient_total_version = total, count, version
            self.gradient_total_arrays = arrays
        evaluation: dict[str, Any] = {"eval_loss": loss_sum / max(heldout, 1), "eval_acc": acc_sum / max(heldout, 1)}
        return {**evaluation, "secure_aggregation": secure_report} if secure else evaluation

    def unlearn(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        request: DeletionRequest,
        forget_count: int,
        protocol: str = "fresh",
        method: str = "iau",
        requester: int | None = None,
    ) -> tuple[ArrayRecord, UnlearningReport]:
        """Apply the IAU correction for `request` (|S| = forget_count) and add it to the ledger.

        `requester` is the node the request came from (None: the operator's scenario); only the
        node serving the partition may ask. A request repeating one already served returns
        `arrays` unchanged with report.status 'repeat' (idempotent, no second correction).
        When the policy aborts (clients missing with `on_missing='abort'`, or a withdrawing client
        that is offline with no uploaded cache), UnlearningAbortedError is raised with the report,
        and neither the model nor this strategy's state has changed.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}: must be one of {', '.join(PROTOCOLS)}")
        n_total = self.current_examples()
        if check_withdrawal(self.directory, self.ledger, request, requester):
            logger.warning("repeated request %s: already served, returning the current model without a second correction", asdict(request))
            return arrays, UnlearningReport(
                method,
                protocol,
                asdict(request),
                forget_count,
                n_total - forget_count,
                status="repeat",
                reason="repeats a request already served",
            )
        remaining_count = n_total - forget_count
        report = UnlearningReport(method, protocol, asdict(request), forget_count, remaining_count)
        template = arrays.to_torch_state_dict()  # decoded once: every step's model is built from it
        theta = arrays_to_vector(template, self.layout)
        segments = tuple(int(np.prod(shape)) for shape in self.layout.shapes)
        stepper = CorrectionStepper(theta, self.iau, segments)
        current = arrays
        # The cached protocol takes G_S out of G_tot at its first step: an abort at a later step puts it back, so an
        # aborted request leaves the strategy as it found it (the aggregate cache included), not only the model.
        saved_total = (self.gradient_total, self.gradient_total_count)
        try:
            for step in range(self.iau.steps):
                # Fresh: every step a round at the current model. Cached: step 1 from G_tot and client u's G_S at the
                # cache's version; later steps client u recomputes G_S at the current model alone, g_r stays the cache's
                # (stale) unless a refresh round is due.
                refresh = protocol == "cached" and step > 0 and self.iau.refresh_every > 0 and step % self.iau.refresh_every == 0
                if protocol == "fresh" or refresh:
                    direction = self._fresh_direction(grid, current, request, remaining_count, report)
                elif step == 0:
                    direction = self._cached_direction(grid, current, request, forget_count, report)
                    report.remaining_term = "aggregate cache G_tot at the cached model"
                else:
                    direction = self._cached_step_direction(grid, current, request, forget_count, report)
                if refresh:
                    report.remaining_term += f"; refreshed by a fresh round at step {step + 1}"
                if step == 0 and self.iau.calibrate != "off" and self.iau.step_rule == "normalised":
                    stepper.length = self._calibrate(grid, current, direction, request, report)
                report.step_arrays.append(current)
                before = theta
                theta = stepper.step(direction)
                report.step_norms.append(float((theta - before).norm()))
                report.steps += 1
                current = vector_to_arrays(theta, template, self.layout)
                if report.fallback and step + 1 < self.iau.steps:
                    # An offline client u's uploaded cache is G_S at one model: it cannot give G_S at the next one.
                    report.reason = f"withdrawing client offline: {step + 1} of {self.iau.steps} steps, from its uploaded cache"
                    break
            if self.iau.step_rule == "normalised":
                report.radius = stepper.length if stepper.length is not None else self.iau.radius
        except (_Abort, SecAggAbortedError) as abort:
            self.gradient_total, self.gradient_total_count = saved_total
            report.status, report.reason = "aborted", str(abort)
            logger.warning("%s: request of client %s aborted, model left unchanged: %s", method, request.client, abort)
            raise UnlearningAbortedError(
                f"{method}: the request of client {request.client} was aborted and the model left unchanged: {abort}",
                report=report.to_dict(),
            ) from None
        self.record_request(request, forget_count)
        return current, report

    def record_request(self, request: DeletionRequest, forget_count: int) -> None:
        """Put a served request in force (the ledger and the example counts), as `unlearn` does; a no-op if it already is.

        For requests served by other means (retraining, a baseline), so the next request of a
        stream sees the clients and counts that remain.
        """
        if request in self.ledger:
            return
        self.ledger = (*self.ledger, request)
        self._excluded_counts[request.client] = self._excluded_counts.get(request.client, 0) + forget_count

    def current_examples(self) -> int:
        """n: training examples still held by the active clients."""
        return sum(self._kept(p) for p in self.active_partitions())

    def _kept(self, partition: int) -> int:
        return self.directory.num_train[partition] - self._excluded_counts.get(partition, 0)

    def _query(
        self, arrays: ArrayRecord, version: str, request: DeletionRequest, role: str, remaining_count: int, forget_count: int
    ) -> RecordDict:
        """A `query.gradient` message's content at `arrays`, whose `model_version` the caller hashed once for the round."""
        # Hashing here, once per message, cost a SHA-256 pass over every parameter for each of the n clients of a round.
        record = self.base_config()
        record.update(
            GradientQuery(
                model_version=version,
                role=role,
                request=json.dumps(asdict(request)),
                remaining_count=remaining_count,
                forget_count=forget_count,
                correction=self.iau.correction,
                correction_weight=float(self.iau.correction_weight),
                allow_stale=self.allow_stale,
                gradient_dtype=self.gradient_dtype,
            ).to_record()
        )
        return RecordDict({keys.ARRAYS: arrays, keys.CONFIG: record})

    def _ask(
        self, grid: Grid, messages: list[Message], phase: str, parse: Callable[[int, Message], Any], report: UnlearningReport | None
    ) -> tuple[dict[int, Any], list[int]]:
        """Send `messages`, validate each reply with `parse`, re-ask the clients still missing up to `policy.retries` times.

        Returns ({partition: parse's result} for the accepted replies, the partitions still missing).
        A reply `parse` refuses (InvalidReplyError) is logged, recorded and never used.
        """
        outcome = ask_clients(
            grid,
            messages,
            directory=self.directory,
            phase=phase,
            parse=parse,
            retries=self.policy.retries,
            timeout=self.round_timeout,
            rejected_log=self.rejected,
            failures_log=self.failures,
            stream=True,  # each reply's vector is summed and dropped by parse: never hold the round's uploads at once
        )
        if report is not None:
            report.rounds += outcome.attempts
            report.retries += outcome.retries
            report.rejected.extend(outcome.rejected)
            report.failures.extend(outcome.failures)
            report.clients_asked = sorted(set(report.clients_asked) | set(outcome.asked))
            report.clients_answered = sorted(set(report.clients_answered) | set(outcome.accepted))
        return outcome.accepted, outcome.missing

    def _contribution(
        self,
        partition: int,
        reply: Message,
        version: str,
        report: UnlearningReport,
        count_key: str = keys.NUM_EXAMPLES,
        bound_scale: float = 1.0,
    ) -> tuple[Message, torch.Tensor]:
        """A validated gradient reply of the correction round, within the norm bound (applied to vector / bound_scale)."""
        stale_ok = self.allow_stale and bool(as_int(metrics_of(reply).get(keys.CACHE_STALE, 0)))
        vector = check_gradient_reply(reply, self.layout, version, dtype=self.gradient_dtype, stale_ok=stale_ok, count_key=count_key)
        bounded, clipped = bound_norm(vector / bound_scale, self.policy.norm_bound, self.policy.norm_action, f"client {partition}")
        if clipped:
            logger.warning(
                "client %s: contribution norm %.4g clipped to the bound %g",
                partition,
                float(vector.norm()) / bound_scale,
                self.policy.norm_bound,
            )
            report.clipped_clients.append(partition)
            vector = bounded * bound_scale
        return reply, vector

    def _note_cache_use(self, replies: list[Message], report: UnlearningReport) -> None:
        partition_of = {nid: p for p, nid in self.directory.node_of.items()}
        for reply in replies:
            metrics = reply.content.metric_records[keys.METRICS]
            report.cache_hits += as_int(metrics.get(keys.CACHE_HIT, 0))
            if as_int(metrics.get(keys.CACHE_STALE, 0)):
                report.stale_caches.append(partition_of[reply.metadata.src_node_id])

    def _offline_withdrawing(self, request: DeletionRequest, version: str, forget_count: int, report: UnlearningReport) -> torch.Tensor:
        """G_S of a withdrawing client that did not answer: the cache it uploaded (client-level requests only), else abort."""
        client = request.client
        upload = self.client_uploads.get(client)
        if upload is None:
            raise _Abort(
                f"withdrawing client {client} did not answer and the server holds no cache it uploaded (only a caching "
                "round with upload, the cached protocol's, and kept uploads leaves one): retry when the client is back"
            )
        if not request.client_level:
            raise _Abort(
                f"withdrawing client {client} did not answer and asked to forget part of its data ({request.samples!r}): "
                "its uploaded cache sums all its examples, so G_S cannot be taken from it; retry when the client is back"
            )
        vector, count, uploaded_at = upload
        if count != forget_count:
            raise _Abort(
                f"client {client}'s uploaded cache covers {count} examples, the request {forget_count} (other deletions "
                "came after the upload): retry when the client is back"
            )
        if uploaded_at != version and not self.allow_stale:
            raise _Abort(
                f"withdrawing client {client} did not answer and its uploaded cache is at model version {uploaded_at}, "
                f"the model at {version}: allow stale caches to use it anyway"
            )
        report.fallback = "uploaded-cache" + (" (stale)" if uploaded_at != version else "")
        if report.status == "complete":
            report.status = "fallback"
        logger.warning("withdrawing client %s is offline: using the cache it uploaded at version %s", client, uploaded_at)
        return vector.to(torch.float64)

    def _fresh_direction(
        self, grid: Grid, arrays: ArrayRecord, request: DeletionRequest, remaining_count: int, report: UnlearningReport
    ) -> torch.Tensor:
        """One round: remaining clients send G_k/(n-|S|), client u its pre-scaled difference; the sum is d.

        Remaining clients still missing after the retries: with `on_missing='renormalise'` their
        share is dropped and g_r renormalised over those that answered. Design: the vectors that
        arrived stay pre-scaled sums (secure-aggregation compatible); the server rescales their
        sum by (n-|S|)/n_A, n_A = the examples the answering clients still hold (their own and
        client u's kept ones), which is exactly sum G_k / n_A. Client u's vector does not depend
        on n - |S| for a client-level request; a sample-level one mixes both terms, so u is asked
        once more with n_A (answered from its cache). With 'abort' the round aborts.
        """
        version = model_version(arrays)
        client = request.client
        messages = []
        for p in self.active_partitions():
            if p == client:
                content = self._query(arrays, version, request, keys.ROLE_WITHDRAWING, remaining_count, report.forget_count)
            elif self.iau.correction:
                content = self._query(arrays, version, request, keys.ROLE_REMAINING, remaining_count, report.forget_count)
            else:
                continue
            messages.append(Message(content, dst_node_id=self.directory.node_of[p], message_type=keys.QUERY_GRADIENT))
        if self.policy.secure is not None:  # the server sees only the sum: d itself
            return secure_direction(self, grid, messages, version, report)

        remaining_sum = torch.zeros(self.layout.numel, dtype=torch.float64)
        withdrawing: dict[str, torch.Tensor] = {}

        def parse(partition: int, reply: Message) -> tuple[Message, None]:
            reply, vector = self._contribution(partition, reply, version, report)
            # Summed as the replies arrive and dropped from the reply: no client's vector is kept beyond this point.
            if partition == client:
                withdrawing["vector"] = vector
            else:
                remaining_sum.add_(vector)
            del reply.content[keys.GRADIENT]
            return reply, None

        accepted, missing = self._ask(grid, messages, "unlearn", parse, report)
        self._note_cache_use([reply for reply, _ in accepted.values()], report)
        if client in missing:
            forget_sum = self._offline_withdrawing(request, version, report.forget_count, report)
            withdrawing["vector"] = withdrawing_contribution(
                None, forget_sum, remaining_count, report.forget_count, self.iau.correction, self.iau.correction_weight
            )
        others_missing = [p for p in missing if p != client]
        if not others_missing:
            direction = remaining_sum + withdrawing["vector"]
            report.direction_norm = float(direction.norm())
            return direction
        report.missing_clients = sorted(set(report.missing_clients) | set(others_missing))
        if self.policy.on_missing == "abort":
            raise _Abort(
                f"client(s) {others_missing} did not answer the correction round after {self.policy.retries} retries (unlearn-policy=abort)"
            )
        answering = sorted(p for p in accepted if p != client)
        withdrawing_kept = 0 if request.client_level else self._kept(client) - report.forget_count
        answered_count = sum(self._kept(p) for p in answering) + withdrawing_kept
        if answered_count < 1:
            raise _Abort(f"no remaining client answered (missing: {others_missing}): g_r cannot be estimated")
        withdrawing_vector = withdrawing["vector"]
        if not request.client_level and self.iau.correction:
            content = self._query(arrays, version, request, keys.ROLE_WITHDRAWING, answered_count, report.forget_count)
            again, still = self._ask(
                grid,
                [Message(content, dst_node_id=self.directory.node_of[client], message_type=keys.QUERY_GRADIENT)],
                "unlearn",
                parse,
                report,
            )
            if still:
                raise _Abort(f"withdrawing client {client} did not answer the renormalised request (n_A = {answered_count})")
            withdrawing_vector = withdrawing["vector"]  # parse replaced it with the renormalised reply
        direction = remaining_sum * (remaining_count / answered_count) + withdrawing_vector
        logger.warning("correction round renormalised over %d examples: clients %s missing", answered_count, others_missing)
        report.status, report.renormalised_count = "renormalised", answered_count
        report.direction_norm = float(direction.norm())
        return direction

    def _cached_direction(
        self, grid: Grid, arrays: ArrayRecord, request: DeletionRequest, forget_count: int, report: UnlearningReport
    ) -> torch.Tensor:
        """Zero rounds for the others: client u uploads G_S; g_r = (G_tot - G_S)/(n - |S|); G_tot -= G_S."""
        if self.gradient_total is None or self.gradient_total_arrays is None:
            raise RuntimeError("cached protocol needs the aggregate cache: call fill_caches(..., upload=True) after training")
        # Every gradient of the cached protocol is taken at the model G_tot was computed at: G_S too, so G_tot - G_S
        # stays an exact sum over the remaining data at one version, request after request. From the second request
        # of a stream on, the model being corrected has moved past that version (the protocol's approximation;
        # report.gradient_version says at which model the direction was taken).
        version = self.gradient_total_version
        report.gradient_version = version
        accepted, missing = self._ask_forget_sum(
            grid, self.gradient_total_arrays, version, request, forget_count, self.gradient_total_count - forget_count, report
        )
        if missing:
            forget_sum = self._offline_withdrawing(request, version, forget_count, report)
        else:
            reply, forget_sum = accepted[request.client]
            self._note_cache_use([reply], report)
        direction = direction_from_total(
            self.gradient_total, self.gradient_total_count, forget_sum, forget_count, self.iau.correction, self.iau.correction_weight
        )
        self.gradient_total = self.gradient_total - forget_sum
        self.gradient_total_count -= forget_count
        report.direction_norm = float(direction.norm())
        return direction

    def _ask_forget_sum(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        version: str,
        request: DeletionRequest,
        forget_count: int,
        remaining_count: int,
        report: UnlearningReport,
    ) -> tuple[dict[int, Any], list[int]]:
        """Ask client u alone for G_S at `arrays` (validated: |S|, the version, the norm bound)."""
        content = self._query(arrays, version, request, keys.ROLE_FORGET_ONLY, remaining_count, forget_count)
        message = Message(content, dst_node_id=self.directory.node_of[request.client], message_type=keys.QUERY_GRADIENT)

        def parse(partition: int, reply: Message) -> tuple[Message, torch.Tensor]:
            sent_count = positive_count(reply, keys.FORGET_SIZE)
            if sent_count != forget_count:
                raise InvalidReplyError(f"client {partition} reports |S|={sent_count}, the request says {forget_count}")
            return self._contribution(partition, reply, version, report, count_key=keys.FORGET_SIZE, bound_scale=float(forget_count))

        return self._ask(grid, [message], "unlearn", parse, report)

    def _cached_step_direction(
        self, grid: Grid, arrays: ArrayRecord, request: DeletionRequest, forget_count: int, report: UnlearningReport
    ) -> torch.Tensor:
        """A later step of the cached protocol: client u sends G_S at the current model; g_r is the cache's (stale)."""
        assert self.gradient_total is not None
        accepted, missing = self._ask_forget_sum(
            grid, arrays, model_version(arrays), request, forget_count, self.gradient_total_count, report
        )
        if missing:
            raise _Abort(f"withdrawing client {request.client} did not answer step {report.steps + 1} of the cached correction")
        _, forget_sum = accepted[request.client]
        # self.gradient_total already excludes G_S (at the cache's version): it is the remaining data's sum there.
        direction = direction_from_parts(
            self.gradient_total, self.gradient_total_count, forget_sum, forget_count, self.iau.correction, self.iau.correction_weight
        )
        report.direction_norm = float(direction.norm())
        return direction

    def _calibrate(
        self, grid: Grid, arrays: ArrayRecord, direction: torch.Tensor, request: DeletionRequest, report: UnlearningReport
    ) -> float:
        """Client u chooses the normalised step's relative length from its own data (one message to u alone)."""
        version = model_version(arrays)
        record = self.base_config()
        record.update({keys.MODEL_VERSION: version, keys.REQUEST: json.dumps(asdict(request))})
        content = RecordDict(
            {
                keys.ARRAYS: arrays,
                keys.CONFIG: record,
                keys.DIRECTION: ArrayRecord(OrderedDict((n, t.to(torch.float32)) for n, t in self.layout.unflatten(direction).items())),
            }
        )
        message = Message(content, dst_node_id=self.directory.node_of[request.client], message_type=keys.QUERY_CALIBRATE)

        def parse(partition: int, reply: Message) -> tuple[float, list[dict[str, float]]]:
            check_version(reply, version)
            radius = finite_metric(reply, keys.RADIUS)
            if not radius > 0:
                raise InvalidReplyError(f"client {partition} chose a step length {radius}: must be > 0")
            return float(radius), json.loads(str(reply.content[keys.CONFIG].get(keys.CALIBRATION_TRAIL, "[]")))

        accepted, missing = self._ask(grid, [message], "unlearn", parse, report)
        if missing:
            raise _Abort(f"withdrawing client {request.client} did not answer the step-length query")
        radius, trail = accepted[request.client]
        report.calibration = trail
        return radius
