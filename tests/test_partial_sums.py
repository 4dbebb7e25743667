"""Cohort partial sums (strategies/partial_sums.py): what the worker sends, and every check the server makes before folding.

References are numpy, written here: the partial sum is sum_k n_k w_k over float64 casts of the clients' float32 models
(exact: each product of a float32 and an integer below 2**29 is exact in float64, and np.sum of 3 terms here rounds as
the running sum does only if the order matches, so the check allows 1e-15 relative), the norms np.linalg.norm of the
float64 differences. Each refusal case names the check it exercises and is parametrised; each must leave the running
sum untouched and the sum's other clients refused too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from fedunlearn.errors import InvalidReplyError
from strategies import keys
from strategies.fedavg import model_version
from strategies.metered_grid import payload_bytes, reply_bytes
from strategies.partial_sums import PartialSumBook, is_summed, summarise
from strategies.streaming import WeightedModelSum
from strategies.validation import check_train_content

SHAPES = {"w": (6, 5), "b": (5,)}
PARTITIONS = (10, 11, 12)
COUNTS = {10: 17, 11: 5, 12: 29}


def who(partition: int) -> str:
    return f"reply from node {1000 + partition}"


def template() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({name: Array(rng.normal(0, 1, shape).astype(np.float32)) for name, shape in SHAPES.items()})


def client_arrays(partition: int, base: ArrayRecord) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(partition)
    return {name: (base[name].numpy() + rng.normal(0, 0.1, SHAPES[name])).astype(np.float32) for name in SHAPES}


def client_reply(partition: int, base: ArrayRecord, **metrics: float) -> RecordDict:
    values = {keys.NUM_EXAMPLES: COUNTS[partition], keys.TRAIN_LOSS: 0.5 + partition / 100, keys.COMPUTE_S: 0.25, **metrics}
    arrays = client_arrays(partition, base)
    return RecordDict({keys.ARRAYS: ArrayRecord({n: Array(v) for n, v in arrays.items()}), keys.METRICS: MetricRecord(values)})


def reference_sum(partitions, base: ArrayRecord) -> dict[str, np.ndarray]:
    return {
        name: np.sum(np.stack([client_arrays(p, base)[name].astype(np.float64) * COUNTS[p] for p in partitions]), axis=0) for name in SHAPES
    }


def summed(base: ArrayRecord, partitions=PARTITIONS) -> dict[int, RecordDict]:
    out = summarise([(p, client_reply(p, base)) for p in partitions], base, model_version(base), who)
    return {p: c for p, c in out if isinstance(c, RecordDict)}


def test_the_worker_sends_one_float64_sum_and_charges_each_client_its_own_reply():
    base = template()
    originals = {p: payload_bytes(client_reply(p, base)) for p in PARTITIONS}
    out = summed(base)
    carrier = out[10]
    assert set(carrier) == {keys.COHORT_SUM, keys.COHORT_SUM_INFO, keys.COHORT_METER}
    sums = carrier[keys.COHORT_SUM]
    assert isinstance(sums, ArrayRecord)
    expected = reference_sum(PARTITIONS, base)
    for name in SHAPES:
        assert sums[name].numpy().dtype == np.float64
        np.testing.assert_allclose(sums[name].numpy(), expected[name], rtol=1e-15, atol=0)
    info = carrier[keys.COHORT_SUM_INFO]
    assert isinstance(info, ConfigRecord)
    assert list(info[keys.SUM_PARTITIONS]) == list(PARTITIONS)  # type: ignore[arg-type]
    assert list(info[keys.SUM_COUNTS]) == [COUNTS[p] for p in PARTITIONS]  # type: ignore[arg-type]
    norms = [
        float(np.linalg.norm(np.concatenate([(client_arrays(p, base)[n].astype(np.float64) - base[n].numpy()).ravel() for n in SHAPES])))
        for p in PARTITIONS
    ]
    np.testing.assert_allclose(list(info[keys.SUM_NORMS]), norms, rtol=1e-12)  # type: ignore[arg-type]
    assert info[keys.MODEL_VERSION] == model_version(base)
    assert [m[keys.NUM_EXAMPLES] for m in json.loads(str(info[keys.SUM_METRICS]))] == [COUNTS[p] for p in PARTITIONS]
    for p in (11, 12):
        assert set(out[p]) == {keys.COHORT_SUMMED_IN, keys.COHORT_METER}
        assert out[p][keys.COHORT_SUMMED_IN][keys.SUM_CARRIER] == 10  # type: ignore[index]
    for p in PARTITIONS:
        assert is_summed(out[p])
        assert reply_bytes(out[p]) == originals[p]  # the meter charges the model the client would have sent
        assert out[p][keys.COHORT_METER][keys.COMPUTE_S] == 0.25  # type: ignore[index]
    assert not is_summed(client_reply(10, base))
    assert reply_bytes(client_reply(10, base)) == originals[10]


def _nan(content: RecordDict) -> None:
    record = content[keys.ARRAYS]
    assert isinstance(record, ArrayRecord)
    bad = record["b"].numpy().copy()
    bad[2] = np.nan
    record["b"] = Array(bad)


def _shape(content: RecordDict) -> None:
    record = content[keys.ARRAYS]
    assert isinstance(record, ArrayRecord)
    record["w"] = Array(np.zeros((5, 6), dtype=np.float32))


def _no_metrics(content: RecordDict) -> None:
    del content[keys.METRICS]


def _other_metrics(content: RecordDict) -> None:
    metrics = content[keys.METRICS]
    assert isinstance(metrics, MetricRecord)
    metrics["extra"] = 1.0


@pytest.mark.parametrize(
    "spoil, match", [(_nan, "non-finite"), (_shape, "has shape"), (_no_metrics, "MetricRecord"), (_other_metrics, "reports metrics")]
)
def test_the_worker_refuses_what_the_server_would_and_sums_the_rest(spoil, match):
    base = template()
    entries = [(p, client_reply(p, base)) for p in PARTITIONS]
    spoil(entries[1][1])
    expected_reason = None
    if spoil is not _other_metrics:  # the server's own check on the same content gives the same words
        with pytest.raises(InvalidReplyError) as err:
            check_train_content(_spoiled(spoil, base), base, keys.ARRAYS, who(11))
        expected_reason = str(err.value)
    out = dict(summarise([*entries, (13, Error(code=1, reason="boom"))], base, model_version(base), who))
    refused = out[11]
    assert isinstance(refused, RecordDict) and set(refused) == {keys.COHORT_REJECTED, keys.COHORT_METER}
    reason = str(refused[keys.COHORT_REJECTED][keys.REJECTED_REASON])  # type: ignore[index]
    assert match in reason and who(11) in reason
    if expected_reason is not None:
        assert reason == expected_reason
    assert isinstance(out[13], Error) and out[13].reason == "boom"  # an error reply passes through unchanged
    info = out[10][keys.COHORT_SUM_INFO]  # type: ignore[index]
    assert list(info[keys.SUM_PARTITIONS]) == [10, 12]  # type: ignore[index]
    sums = out[10][keys.COHORT_SUM]  # type: ignore[index]
    expected = reference_sum((10, 12), base)
    for name in SHAPES:
        np.testing.assert_allclose(sums[name].numpy(), expected[name], rtol=1e-15, atol=0)  # type: ignore[index]


def _spoiled(spoil, base: ArrayRecord) -> RecordDict:
    content = client_reply(11, base)
    spoil(content)
    return content


def test_the_server_folds_an_accepted_sum_as_the_clients_own_models():
    base = template()
    out = summed(base)
    book = PartialSumBook(base, model_version(base), PARTITIONS)
    models = WeightedModelSum()
    assert book.take(11, out[11], models, None, who(11)) == []  # a covered client before its carrier: waits
    folded = book.take(10, out[10], models, None, who(10))
    assert [p for p, _ in folded] == list(PARTITIONS)
    assert [m[keys.NUM_EXAMPLES] for _, m in folded] == [COUNTS[p] for p in PARTITIONS]
    assert book.take(12, out[12], models, set(folded[0][1].keys()), who(12)) == []
    assert list(book.settle()) == []
    assert models.count == 3 and models.total_weight == sum(COUNTS.values())
    total = sum(COUNTS.values())
    for name, value in models.mean().items():
        reference = reference_sum(PARTITIONS, base)[name] / total
        assert value.dtype == np.float32
        assert np.all(np.abs(value.astype(np.float64) - reference) <= 2.0**-24 * np.abs(reference))


def _set_info(key, value):
    def spoil(content: RecordDict) -> None:
        info = content[keys.COHORT_SUM_INFO]
        assert isinstance(info, ConfigRecord)
        info[key] = value

    return spoil


def _set_sum(fn):
    def spoil(content: RecordDict) -> None:
        sums = content[keys.COHORT_SUM]
        assert isinstance(sums, ArrayRecord)
        for name in list(sums.keys()):
            sums[name] = Array(fn(name, sums[name].numpy()))

    return spoil


def _drop_sum(content: RecordDict) -> None:
    del content[keys.COHORT_SUM]


def _metric_counts(content: RecordDict) -> None:
    info = content[keys.COHORT_SUM_INFO]
    assert isinstance(info, ConfigRecord)
    metrics = json.loads(str(info[keys.SUM_METRICS]))
    metrics[2][keys.NUM_EXAMPLES] = 1
    info[keys.SUM_METRICS] = json.dumps(metrics)


SERVER_REFUSALS = {
    "no sum record": (_drop_sum, "no 'cohort-sum' ArrayRecord"),
    "sum shape": (_set_sum(lambda n, v: v.reshape(-1)), "has shape"),
    "sum dtype": (_set_sum(lambda n, v: v.astype(np.float32)), "expected float64"),
    "sum non-finite": (_set_sum(lambda n, v: np.where(np.arange(v.size).reshape(v.shape) == 1, np.inf, v)), "non-finite"),
    "sum inconsistent with its norms": (_set_sum(lambda n, v: v + 5.0 * sum(COUNTS.values())), "farther than"),
    "sum one client short": (_set_sum(lambda n, v: v - 29 * client_arrays(12, template())[n].astype(np.float64)), "farther than"),
    "version": (_set_info(keys.MODEL_VERSION, "0123456789abcdef"), "model version"),
    "lengths": (_set_info(keys.SUM_NORMS, [0.1, 0.2]), "must list its own partition"),
    "a partition not asked": (_set_info(keys.SUM_PARTITIONS, [10, 11, 99]), "did not ask"),
    "a partition twice": (_set_info(keys.SUM_PARTITIONS, [10, 11, 11]), "already counted"),
    "a count of zero": (_set_info(keys.SUM_COUNTS, [17, 0, 34]), "whole counts >= 1"),
    "a fractional count": (_set_info(keys.SUM_COUNTS, [17.0, 5.5, 29.0]), "whole counts >= 1"),
    "a negative norm": (_set_info(keys.SUM_NORMS, [0.1, -0.2, 0.3]), "norms >= 0"),
    "a non-finite norm": (_set_info(keys.SUM_NORMS, [0.1, float("nan"), 0.3]), "norms >= 0"),
    "metrics not matching the counts": (_metric_counts, "num-examples=29"),
    "unreadable information": (_set_info(keys.SUM_METRICS, "{not json"), "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(SERVER_REFUSALS))
def test_the_server_refuses_a_bad_sum_and_every_client_in_it(case):
    spoil, match = SERVER_REFUSALS[case]
    base = template()
    out = summed(base)
    spoil(out[10])
    book = PartialSumBook(base, model_version(base), PARTITIONS)
    models = WeightedModelSum()
    assert book.take(11, out[11], models, None, who(11)) == []  # came first: waits for its carrier
    with pytest.raises(InvalidReplyError, match=match) as err:
        book.take(10, out[10], models, None, who(10))
    assert who(10) in str(err.value)
    assert models.count == 0 and models.total_weight == 0  # nothing folded
    with pytest.raises(InvalidReplyError, match="which was refused"):  # came after its refused carrier
        book.take(12, out[12], models, None, who(12))
    assert [(p, "refused" in reason) for p, reason in book.settle()] == [(11, True)]


def test_the_server_refuses_metric_keys_that_differ_from_the_rounds():
    base = template()
    out = summed(base)
    book = PartialSumBook(base, model_version(base), PARTITIONS)
    with pytest.raises(InvalidReplyError, match="cannot average them"):
        book.take(10, out[10], WeightedModelSum(), {keys.NUM_EXAMPLES, "other"}, who(10))


def test_a_second_sum_for_a_counted_client_and_a_client_no_sum_covers_are_refused():
    base = template()
    first, second = summed(base, (10, 11)), summed(base, (11, 12))
    book = PartialSumBook(base, model_version(base), PARTITIONS)
    models = WeightedModelSum()
    book.take(10, first[10], models, None, who(10))
    with pytest.raises(InvalidReplyError, match="already counted"):
        book.take(11, second[11], models, None, who(11))
    assert models.count == 2
    with pytest.raises(InvalidReplyError, match="does not cover it"):  # names an accepted sum that does not list it
        book.take(12, RecordDict({keys.COHORT_SUMMED_IN: ConfigRecord({keys.SUM_CARRIER: 10})}), models, None, who(12))
    lone = PartialSumBook(base, model_version(base), PARTITIONS)
    assert lone.take(12, summed(base)[12], WeightedModelSum(), None, who(12)) == []
    assert [(p, "never came" in reason) for p, reason in lone.settle()] == [(12, True)]


def test_a_client_the_worker_refused_is_refused_by_the_server_in_the_same_words():
    base = template()
    entries = [(p, client_reply(p, base)) for p in PARTITIONS]
    _nan(entries[0][1])
    out = dict(summarise(entries, base, model_version(base), who))
    book = PartialSumBook(base, model_version(base), PARTITIONS)
    with pytest.raises(InvalidReplyError) as err:
        book.take(10, out[10], WeightedModelSum(), None, who(10))  # type: ignore[arg-type]
    assert str(err.value) == str(out[10][keys.COHORT_REJECTED][keys.REJECTED_REASON])  # type: ignore[index]
    assert out[11][keys.COHORT_SUM_INFO][keys.SUM_PARTITIONS] == [11, 12]  # type: ignore[index]
