"""Cohort partial sums: a cohort worker folds its virtual clients' training models into one float64 sum before replying.

In cohort mode a physical node answers a training round for up to 64 virtual clients at once. Without this, its
packed reply holds one model per client, and every copy of it on the way (the worker's reply, Ray's object store,
the driver's unpacked replies) holds them all: at 1000 McMahan-CNN clients that is most of the 9.3 GB the memory
benchmark measured for all processes (BENCHMARKS.md, issue 15). With it, the worker checks each of its clients'
models as the server would, adds n_k w_k into a float64 running sum (`WeightedModelSum`), drops the model, and
replies with the sum alone. The server folds that sum into its own running sum as it would fold n_k w_k one
client at a time: the round's mean is the same sum regrouped (float64 additions in another order, about 1e-16
relative before the cast to float32; tests/test_streaming.py measures both against numpy).

The server asks (`keys.PARTIAL_SUMS` in the train config; `UnlearningFedAvg(partial_sums=True)`, only when no
update recorder needs every client's model and the round is streamed); a per-client node ignores the key and
replies as always, so one round can mix both kinds of reply.

Wire, per virtual client of the packed reply (every client still gets its own reply, so the server's stream, the
failure and rejection records and the per-client metering stay as they were):
- the first accepted client (the carrier): `COHORT_SUM` (ArrayRecord, float64, the global model's names and
  shapes), `COHORT_SUM_INFO` (the partitions covered, their counts, their update norms ||w_k - w_global||, the
  model version they trained from, their metric records as JSON);
- every other accepted client: `COHORT_SUMMED_IN` naming the carrier;
- a client the worker refused: `COHORT_REJECTED` with the reason, worded as the server words it;
- a client that raised: its Error, unchanged;
- every non-error one: `COHORT_METER` with the bytes its own reply would have carried and its compute seconds, so
  that rounds, participations, bytes and compute are metered per virtual client exactly as before.

What moves into the worker: `check_train_content` per client (one ArrayRecord, the global model's names, shapes
and dtypes, finite values, a positive example count) and equal metric keys within the cohort. What the server
still checks, per partial sum (`PartialSumBook`): the sum's names and shapes are the global model's, float64,
finite; the covered partitions were asked this round, each once in the round, with positive whole counts and
finite non-negative norms; the version is the hash of the global model the round sent; the metric records carry a
positive `num-examples` equal to the counts and the round's metric keys; and the sum is consistent with the norms
it reports (triangle inequality: ||S/N - w_global|| <= sum_k n_k ||w_k - w_global|| / N, N = sum_k n_k), which a
corrupted or mis-weighted sum fails in general. A client named in a `COHORT_SUMMED_IN` whose carrier was refused,
or that no accepted sum covers by the round's end, is recorded as rejected. The server cannot check one client's
model inside a sum (that is the point of the sum): a worker is trusted as far as its own clients' models go.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from fedunlearn.errors import InvalidReplyError

from . import keys
from .metered_grid import payload_bytes
from .streaming import WeightedModelSum
from .validation import check_like, check_train_content
from .wire import as_float, as_int

__all__ = ["PartialSumBook", "is_summed", "summarise"]

Entry = tuple[int, "RecordDict | Error"]
SUMMED_RECORDS = (keys.COHORT_SUM_INFO, keys.COHORT_SUMMED_IN, keys.COHORT_REJECTED)
# Relative slack of the triangle check: both sides are float64 sums over the same float32 values.
TRIANGLE_RTOL = 1e-9


def _compute_of(content: RecordDict) -> float:
    metrics = content.metric_records.get(keys.METRICS)
    if metrics is None or keys.COMPUTE_S not in metrics:
        return 0.0
    try:
        return as_float(metrics[keys.COMPUTE_S])
    except (TypeError, ValueError):
        return 0.0


def _update_norm(model: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> float:
    """||w - w_global||_2 over every tensor, in float64."""
    total = 0.0
    for name, value in model.items():
        diff = value.astype(np.float64) - base[name]
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def summarise(entries: Iterable[Entry], template: ArrayRecord, version: str, who: Callable[[int], str]) -> list[Entry]:
    """A cohort's training replies as one partial sum (the module docstring's wire); each model is dropped once added.

    `entries` may be a generator (the worker's loop trains one client per item), so at most one client model is alive
    besides the sum. `template` is the global model the clients trained from, `version` its hash, `who(partition)`
    the sender's name in a rejection reason ("reply from node <virtual node id>", as the server says it).
    """
    base = {name: array.numpy().astype(np.float64) for name, array in template.items()}
    models = WeightedModelSum()
    out: list[Entry] = []
    covered: list[tuple[int, int, float, dict[str, Any]]] = []  # partition, count, update norm, metrics
    metric_keys: set[str] | None = None
    for partition, content in entries:
        if isinstance(content, Error):
            out.append((partition, content))
            continue
        meter = MetricRecord({keys.WIRE_BYTES: payload_bytes(content), keys.COMPUTE_S: _compute_of(content)})
        try:
            count = check_train_content(content, template, keys.ARRAYS, who(partition))
            metrics = content.metric_records[keys.METRICS]
            if metric_keys is None:
                metric_keys = set(metrics.keys())
            elif set(metrics.keys()) != metric_keys:
                raise InvalidReplyError(
                    f"{who(partition)} reports metrics {sorted(metrics.keys())}, its cohort's first reply {sorted(metric_keys)}: "
                    "cannot average them"
                )
        except InvalidReplyError as err:
            out.append(
                (partition, RecordDict({keys.COHORT_REJECTED: ConfigRecord({keys.REJECTED_REASON: str(err)}), keys.COHORT_METER: meter}))
            )
            continue
        record = content[keys.ARRAYS]
        assert isinstance(record, ArrayRecord)  # check_train_content made sure
        model = {name: array.numpy() for name, array in record.items()}
        models.add(model, count)
        covered.append((partition, count, _update_norm(model, base), dict(metrics)))
        del content[keys.ARRAYS], record, model
        out.append((partition, RecordDict({keys.COHORT_METER: meter})))
    if not covered:
        return out
    carrier = covered[0][0]
    info = ConfigRecord(
        {
            keys.SUM_PARTITIONS: [p for p, _, _, _ in covered],
            keys.SUM_COUNTS: [n for _, n, _, _ in covered],
            keys.SUM_NORMS: [norm for _, _, norm, _ in covered],
            keys.MODEL_VERSION: version,
            keys.SUM_METRICS: json.dumps([m for _, _, _, m in covered]),
        }
    )
    sums = ArrayRecord({name: Array(models.sums[name]) for name in template.keys()})
    summed = {p for p, _, _, _ in covered}
    for partition, content in out:
        if isinstance(content, Error):
            continue
        if partition == carrier:
            content[keys.COHORT_SUM] = sums
            content[keys.COHORT_SUM_INFO] = info
        elif partition in summed:
            content[keys.COHORT_SUMMED_IN] = ConfigRecord({keys.SUM_CARRIER: carrier})
    return out


def is_summed(content: RecordDict) -> bool:
    """Whether a training reply's content is part of a cohort's partial sum (carrier, covered, or refused by the worker)."""
    return any(name in content for name in SUMMED_RECORDS)


class PartialSumBook:
    """One training round's partial sums on the server: checks each (module docstring), folds it, settles who it covers.

    `template` is the global model the round sent, `version` its hash, `asked` the partitions the round asked.
    """

    def __init__(self, template: ArrayRecord, version: str, asked: Iterable[int]) -> None:
        self.template = template
        self.version = version
        self.asked = set(asked)
        self.covered: dict[int, int] = {}  # partition -> carrier partition, for every accepted sum
        self.refused: dict[int, str] = {}  # carrier partition -> why its sum was refused
        self.waiting: dict[int, int] = {}  # covered client -> the carrier it names, while that carrier has not come
        self._base: dict[str, np.ndarray] | None = None  # the global model in float64, decoded once per round

    def take(
        self, partition: int, content: RecordDict, models: WeightedModelSum, metric_keys: set[str] | None, who: str
    ) -> list[tuple[int, MetricRecord]]:
        """Fold a carrier's sum into `models` and return its clients' metric records; [] for a covered client.

        Raises InvalidReplyError for a client the worker refused, a sum that fails a check (its clients are then
        refused too, when they come or at `settle`), or a covered client whose carrier's sum was refused.
        """
        if keys.COHORT_REJECTED in content:
            reason = content[keys.COHORT_REJECTED]
            assert isinstance(reason, ConfigRecord)
            # the same check and wording as the server's, so results read alike in both modes
            raise InvalidReplyError(str(reason.get(keys.REJECTED_REASON, "refused by its cohort worker (no reason given)")))
        if keys.COHORT_SUM_INFO not in content:
            link = content[keys.COHORT_SUMMED_IN]
            assert isinstance(link, ConfigRecord)
            carrier = as_int(link[keys.SUM_CARRIER])
            if carrier in self.refused:
                raise InvalidReplyError(f"{who}: its model is in the partial sum of client {carrier}'s reply, which was refused")
            if self.covered.get(partition) == carrier:
                return []
            if carrier in self.covered.values() or partition in self.covered:
                raise InvalidReplyError(f"{who} names client {carrier}'s partial sum, which does not cover it")
            self.waiting[partition] = carrier
            return []
        try:
            return self._fold(partition, content, models, metric_keys, who)
        except InvalidReplyError as err:
            self.refused[partition] = str(err)
            raise

    def _fold(
        self, partition: int, content: RecordDict, models: WeightedModelSum, metric_keys: set[str] | None, who: str
    ) -> list[tuple[int, MetricRecord]]:
        info, sums = content[keys.COHORT_SUM_INFO], content.get(keys.COHORT_SUM)
        assert isinstance(info, ConfigRecord)
        if not isinstance(sums, ArrayRecord):
            raise InvalidReplyError(f"{who} carries partial-sum information but no '{keys.COHORT_SUM}' ArrayRecord")
        try:
            partitions = [as_int(p) for p in _listed(info, keys.SUM_PARTITIONS)]
            counts = [as_int(n) if float(n).is_integer() else -1 for n in _listed(info, keys.SUM_COUNTS)]
            norms = [as_float(v) for v in _listed(info, keys.SUM_NORMS)]
            metrics = json.loads(str(info[keys.SUM_METRICS]))
            version = str(info[keys.MODEL_VERSION])
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidReplyError(f"{who}: its partial-sum information cannot be read ({type(err).__name__}: {err})") from None
        if not (len(partitions) == len(counts) == len(norms) == len(metrics)) or partition not in partitions:
            raise InvalidReplyError(
                f"{who}: its partial sum lists {len(partitions)} partitions, {len(counts)} counts, {len(norms)} norms and "
                f"{len(metrics)} metric records, and must list its own partition {partition}"
            )
        if version != self.version:
            raise InvalidReplyError(f"{who}: its partial sum was computed from model version {version}, the round sent {self.version}")
        strangers = sorted(set(partitions) - self.asked)
        twice = sorted({p for p in partitions if partitions.count(p) > 1 or p in self.covered})
        if strangers or twice:
            raise InvalidReplyError(
                f"{who}: its partial sum covers partitions the round did not ask ({strangers[:5]}) or already counted ({twice[:5]})"
            )
        if any(n < 1 for n in counts) or any(not math.isfinite(v) or v < 0 for v in norms):
            raise InvalidReplyError(
                f"{who}: its partial sum reports counts {counts[:5]} and norms {norms[:5]}: need whole counts >= 1, norms >= 0"
            )
        records = []
        for p, n, values in zip(partitions, counts, metrics, strict=True):
            if not isinstance(values, dict) or values.get(keys.NUM_EXAMPLES) != n:
                raise InvalidReplyError(f"{who}: client {p}'s metrics in the partial sum do not report num-examples={n}")
            if metric_keys is not None and set(values) != metric_keys:
                raise InvalidReplyError(
                    f"{who}: client {p} reports metrics {sorted(values)}, the round's first reply {sorted(metric_keys)}: cannot average them"
                )
            records.append((p, MetricRecord(values)))
        check_like(sums, self.template, who, dtype="float64")
        arrays = {name: np.asarray(array.numpy()) for name, array in sums.items()}
        if not all(np.isfinite(v).all() for v in arrays.values()):
            raise InvalidReplyError(f"{who}: its partial sum holds non-finite values (NaN or inf): never aggregated")
        total = sum(counts)
        if self._base is None:
            self._base = {name: array.numpy().astype(np.float64) for name, array in self.template.items()}
        distance = math.sqrt(sum(float(np.sum((arrays[name] / total - base) ** 2)) for name, base in self._base.items()))
        bound = sum(n * v for n, v in zip(counts, norms, strict=True)) / total
        if distance > bound * (1 + TRIANGLE_RTOL) + 1e-12:
            raise InvalidReplyError(
                f"{who}: its partial sum's mean lies {distance:.6g} from the global model, farther than its clients' reported "
                f"update norms allow ({bound:.6g}): the sum does not match them"
            )
        models.add_sum(arrays, {name: np.dtype(array.dtype) for name, array in self.template.items()}, total, len(partitions))
        for p in partitions:
            self.covered[p] = partition
            self.waiting.pop(p, None)
        return records

    def settle(self) -> Iterator[tuple[int, str]]:
        """(partition, reason) for each covered client whose carrier's sum never came or was refused (the round is over)."""
        for partition, carrier in sorted(self.waiting.items()):
            if carrier in self.refused:
                yield partition, f"its model is in the partial sum of client {carrier}'s reply, which was refused"
            else:
                yield partition, f"its model is in the partial sum of client {carrier}'s reply, which never came"
        self.waiting.clear()


def _listed(info: ConfigRecord, key: str) -> list[Any]:
    value = info[key]
    if not isinstance(value, list):
        raise TypeError(f"{key} is {type(value).__name__}, expected a list")
    return list(value)
