"""Checks every client reply must pass before the server uses it, and checks on withdrawal requests.

Pure functions over Flower Messages: each check returns the parsed value or raises
`InvalidReplyError` with a message that names the node, the record or tensor, what was wrong
and what was expected (keys, shapes, dtypes, finite values, the model version the reply was
computed at, a positive example count). Callers record the reason (`record_rejection`) so that
rejected replies are logged and counted in the results, and never aggregated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import astuple
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedunlearn.config import NORM_ACTIONS
from fedunlearn.deletion import DeletionRequest
from fedunlearn.errors import InvalidReplyError, WithdrawalRequestError
from fedunlearn.gradients import ParamLayout

from . import keys
from .directory import ClientDirectory

logger = logging.getLogger("fedunlearn.validation")

__all__ = ["NORM_ACTIONS"]  # the choice list is defined once, in fedunlearn.config; the checks below are public too


def _who(reply: Message) -> str:
    return f"reply from node {reply.metadata.src_node_id}"


def metrics_of(reply: Message) -> MetricRecord:
    """The reply's MetricRecord; error replies and replies without one are invalid."""
    if reply.has_error():
        raise InvalidReplyError(f"{_who(reply)} is an error: {reply.error.reason}")
    return _metrics_in(reply.content, _who(reply))


def _metrics_in(content: RecordDict, who: str) -> MetricRecord:
    if keys.METRICS not in content.metric_records:
        raise InvalidReplyError(f"{who} has no '{keys.METRICS}' MetricRecord: the client must report its metrics there")
    return content.metric_records[keys.METRICS]


def positive_count(reply: Message, key: str = keys.NUM_EXAMPLES) -> int:
    """The example count `key` a reply reports; it must be a whole number >= 1."""
    return _count_in(metrics_of(reply), _who(reply), key)


def _count_in(metrics: MetricRecord, who: str, key: str = keys.NUM_EXAMPLES) -> int:
    if key not in metrics:
        raise InvalidReplyError(f"{who} does not report '{key}': the server weights and scales by it")
    value = metrics[key]
    if isinstance(value, list) or not math.isfinite(float(value)) or not float(value).is_integer() or int(value) < 1:
        raise InvalidReplyError(f"{who} reports {key}={value!r}: must be a positive whole number of examples")
    return int(value)


def echoed_version(reply: Message) -> str | None:
    """The model version a reply says it was computed at (the client echoes it in its config record)."""
    record = reply.content.config_records.get(keys.CONFIG)
    if record is None or keys.MODEL_VERSION not in record:
        return None
    return str(record[keys.MODEL_VERSION])


def check_version(reply: Message, expected: str, stale_ok: bool = False) -> str:
    """The echoed model version; it must equal `expected` unless `stale_ok` (a stale cache the run allows)."""
    version = echoed_version(reply)
    if version is None:
        raise InvalidReplyError(
            f"{_who(reply)} does not say which model it was computed at ('{keys.MODEL_VERSION}' in its "
            f"'{keys.CONFIG}' record): it cannot be checked against the server's model {expected}"
        )
    if version != expected and not stale_ok:
        raise InvalidReplyError(
            f"{_who(reply)} was computed at model version {version}, the server's model is at {expected}: "
            "a reply for another model is never aggregated (allow stale caches to accept it)"
        )
    return version


def _decode(array: Any, reply: Message | str, name: str) -> np.ndarray:
    try:
        return np.asarray(array.numpy())
    except Exception as err:  # a declared shape or dtype that does not match the bytes: unreadable
        who = reply if isinstance(reply, str) else _who(reply)
        raise InvalidReplyError(f"{who}: tensor {name!r} cannot be decoded ({type(err).__name__}: {err})") from None


def vector_from_record(record: ArrayRecord, layout: ParamLayout, reply: Message, dtype: str | None = None) -> torch.Tensor:
    """The record's tensors, checked against the model layout (names, shapes, optional dtype, finite), as one float64 vector."""
    unexpected = sorted(set(record.keys()) - set(layout.names))
    if unexpected:
        raise InvalidReplyError(
            f"{_who(reply)} holds tensor(s) {unexpected[:3]} the model does not have: expected exactly {list(layout.names)[:3]}..."
        )
    parts = {}
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if name not in record:
            raise InvalidReplyError(f"{_who(reply)} lacks tensor {name!r}: every trainable parameter must be present")
        array = record[name]
        if tuple(array.shape) != tuple(shape):
            raise InvalidReplyError(f"{_who(reply)}: tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
        if dtype is not None and array.dtype != dtype:
            raise InvalidReplyError(
                f"{_who(reply)}: tensor {name!r} has dtype {array.dtype}, expected {dtype} (the wire dtype the server asked for)"
            )
        values = _decode(array, reply, name)
        if values.dtype.kind != "f":
            raise InvalidReplyError(f"{_who(reply)}: tensor {name!r} has dtype {values.dtype}, expected a floating-point dtype")
        parts[name] = torch.from_numpy(values.astype(np.float64, copy=False).reshape(shape))
    vector = layout.flatten(parts)
    if not torch.isfinite(vector).all():
        bad = int((~torch.isfinite(vector)).sum())
        raise InvalidReplyError(f"{_who(reply)} holds {bad} non-finite value(s) (NaN or inf): never aggregated")
    return vector


def gradient_vector(reply: Message, layout: ParamLayout, dtype: str | None = None) -> torch.Tensor:
    """The gradient vector a reply carries in its '{gradient}' ArrayRecord, checked against the layout."""
    if reply.has_error():
        raise InvalidReplyError(f"{_who(reply)} is an error: {reply.error.reason}")
    record = reply.content.get(keys.GRADIENT)  # not `array_records`: that view is a cycle keeping the record after it is dropped
    if not isinstance(record, ArrayRecord):
        raise InvalidReplyError(f"{_who(reply)} has no '{keys.GRADIENT}' ArrayRecord")
    return vector_from_record(record, layout, reply, dtype)


def check_gradient_reply(
    reply: Message,
    layout: ParamLayout,
    version: str,
    *,
    dtype: str | None = None,
    stale_ok: bool = False,
    count_key: str = keys.NUM_EXAMPLES,
) -> torch.Tensor:
    """A gradient reply of the correction round or the caching upload: count, version, then the vector."""
    positive_count(reply, count_key)
    check_version(reply, version, stale_ok=stale_ok)
    return gradient_vector(reply, layout, dtype)


def check_train_reply(reply: Message, template: ArrayRecord | None, arrays_key: str = keys.ARRAYS) -> int:
    """A FedAvg training reply: one model with the global model's keys, shapes and dtypes, finite, and a positive count."""
    if reply.has_error():
        raise InvalidReplyError(f"{_who(reply)} is an error: {reply.error.reason}")
    return check_train_content(reply.content, template, arrays_key, _who(reply))


def check_train_content(content: RecordDict, template: ArrayRecord | None, arrays_key: str = keys.ARRAYS, who: str = "reply") -> int:
    """`check_train_reply` on a reply's content (a cohort worker checks its virtual clients' replies with it); `who` names the sender."""
    count = _count_in(_metrics_in(content, who), who)
    # A plain dict, not Flower's `array_records` view: the view is a reference cycle holding every model it lists, so a
    # model the streamed round drops would live on until the cyclic garbage collector ran (measured in tests/test_streaming.py).
    records = {name: record for name, record in content.items() if isinstance(record, ArrayRecord)}
    if list(records.keys()) != [arrays_key]:
        raise InvalidReplyError(f"{who} holds ArrayRecords {list(records.keys())}: expected exactly one, '{arrays_key}'")
    record = records[arrays_key]
    if template is not None:
        check_like(record, template, who)
    for name, array in record.items():
        values = _decode(array, who, name)
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise InvalidReplyError(f"{who}: tensor {name!r} holds non-finite values (NaN or inf): never aggregated")
    return count


def check_like(record: ArrayRecord, template: ArrayRecord, who: str, dtype: str | None = None) -> None:
    """The record has the template's tensor names and shapes, and its dtypes (or `dtype` for every tensor, when given)."""
    if set(record.keys()) != set(template.keys()):
        missing = sorted(set(template.keys()) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(template.keys()))
        raise InvalidReplyError(f"{who}: model tensors differ from the global model's (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, expected in template.items():
        got = record[name]
        if tuple(got.shape) != tuple(expected.shape):
            raise InvalidReplyError(f"{who}: tensor {name!r} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        wanted = expected.dtype if dtype is None else dtype
        if got.dtype != wanted:
            raise InvalidReplyError(f"{who}: tensor {name!r} has dtype {got.dtype}, expected {wanted}")


def bound_norm(vector: torch.Tensor, bound: float, action: str, who: str) -> tuple[torch.Tensor, bool]:
    """Apply the gradient-norm bound (`bound` <= 0: none): clip the vector to it, or reject it. Returns (vector, clipped)."""
    if action not in NORM_ACTIONS:
        raise ValueError(f"gradient-norm-action={action!r}: must be one of {', '.join(NORM_ACTIONS)}")
    if bound <= 0:
        return vector, False
    norm = float(vector.norm())
    if norm <= bound:
        return vector, False
    if action == "reject":
        raise InvalidReplyError(f"{who}: contribution norm {norm:.4g} exceeds the bound {bound:g} (gradient-norm-action=reject)")
    return vector * (bound / norm), True


def record_rejection(
    log: list[dict[str, Any]], phase: str, partition: int | None, reply: Message | int, reason: str, server_round: int | None = None
) -> dict[str, Any]:
    """Log why a reply was rejected and append the entry to `log` (what the results count); `reply` or its sender's node id."""
    node = reply if isinstance(reply, int) else int(reply.metadata.src_node_id)
    entry: dict[str, Any] = {"phase": phase, "partition": partition, "node": node, "reason": reason}
    if server_round is not None:
        entry["round"] = server_round
    log.append(entry)
    logger.warning("rejected %s reply of client %s: %s", phase, partition, reason)
    return entry


def record_failure(
    log: list[dict[str, Any]], phase: str, partition: int | None, reason: str, server_round: int | None = None
) -> dict[str, Any]:
    """Log a client that did not answer (an error reply or none) and append the entry to `log`."""
    entry: dict[str, Any] = {"phase": phase, "partition": partition, "reason": reason}
    if server_round is not None:
        entry["round"] = server_round
    log.append(entry)
    logger.info("client %s did not answer the %s round: %s", partition, phase, reason)
    return entry


def same_request(a: DeletionRequest, b: DeletionRequest) -> bool:
    """Two requests ask to forget the same data (the round they arrived at does not matter)."""
    return astuple(a)[:3] == astuple(b)[:3]


def check_withdrawal(
    directory: ClientDirectory, ledger: Iterable[DeletionRequest], request: DeletionRequest, requester: int | None = None
) -> bool:
    """True when `request` repeats one already served; raises WithdrawalRequestError when it may not be served.

    `requester` is the node id the request came from: only the node that serves the partition
    may ask to withdraw its data (None: the operator's own scenario, as in the simulator).
    """
    if request.client not in directory.node_of:
        known = directory.partitions
        span = f"0..{max(known)}" if known else "none"
        raise WithdrawalRequestError(f"request for unknown client {request.client}: known partitions are {span}")
    owner = directory.node_of[request.client]
    if requester is not None and requester != owner:
        raise WithdrawalRequestError(
            f"node {requester} asked to withdraw the data of client {request.client}, which node {owner} "
            "serves: only the node itself may ask to withdraw its data"
        )
    ledger = tuple(ledger)
    if any(same_request(request, served) for served in ledger):
        return True
    if any(served.client == request.client and served.client_level for served in ledger):
        raise WithdrawalRequestError(
            f"client {request.client} has already withdrawn entirely: a new request for its "
            f"{request.samples!r} examples has nothing left to remove"
        )
    return False


def finite_metric(reply: Message, key: str) -> float:
    """A metric the server averages; it must be present and finite."""
    value = metrics_of(reply).get(key)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidReplyError(f"{_who(reply)} reports {key}={value!r}: must be a finite number")
    return float(value)
