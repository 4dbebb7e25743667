"""Hand-computed checks written against the mutants that survived the first mutation run (docs/testing.md).

Each test names the behaviour a surviving mutant changed: a boundary (>= vs >), an error message that must name the
value, a default that is used, an edge case (one example, an empty set). The values are worked out by hand here,
never by the functions under test.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from test_validation import LAYOUT, NODE_OF, NUM_TRAIN, gradient_record, gradient_reply, record_of, request_message
from torch import nn

from fedunlearn.cache import CacheStore, GradientCache, exclusion_digest
from fedunlearn.deletion import DeletionRequest
from fedunlearn.errors import InvalidReplyError, WithdrawalRequestError
from fedunlearn.iau import (
    STEP_RULES,
    CorrectionStepper,
    IAUSettings,
    StepRule,
    choose_radius,
    direction_from_parts,
    direction_from_total,
    iau_update,
    register_step_rule,
    remaining_contribution,
    withdrawing_contribution,
)
from fedunlearn.metrics import (
    _model_device,
    accuracy,
    attack_success_rate,
    js_divergence,
    parameter_distance,
    per_example_loss,
    predict_proba,
)
from strategies import keys
from strategies.fedavg import ClientDirectory
from strategies.local_grid import LocalGrid
from strategies.validation import (
    bound_norm,
    check_gradient_reply,
    check_train_reply,
    check_version,
    check_withdrawal,
    echoed_version,
    finite_metric,
    gradient_vector,
    metrics_of,
    positive_count,
    record_failure,
    record_rejection,
    same_request,
    vector_from_record,
)


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    """Messages need a run id: LocalGrid sets the task identity a Flower runtime would."""
    LocalGrid(ClientApp(), 1)


# =========================================================================== fedunlearn/iau.py


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"eta": 0.0}, r"eta=0.0: must be > 0 \(typical 1e-3 .. 1e-2 for adam-first-step\)"),
        ({"steps": 0}, r"steps=0: must be >= 1"),
        ({"radius": 0.0}, r"radius=0.0: must be > 0 \(a fraction of \|\|theta\|\|, e.g. 0.02\)"),
        ({"correction_weight": -0.5}, r"correction_weight=-0.5: must be >= 0"),
        ({"calibrate": "loss"}, r"calibrate='loss': must be one of off, heldout-loss"),
        ({"refresh_every": -1}, r"refresh_every=-1: must be >= 0 \(0 = never\)"),
        ({"step_rule": "sign"}, r"step_rule='sign': must be one of sgd, adam-first-step, normalised"),
        ({"eta": float("nan")}, r"eta=nan"),
        ({"radius": float("nan")}, r"radius=nan"),
        ({"correction_weight": float("nan")}, r"correction_weight=nan"),
    ],
)
def test_settings_refuse_each_bad_value_by_name(changes, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        IAUSettings(**changes)


def test_settings_accept_the_boundaries_and_keep_the_measured_defaults():
    IAUSettings(steps=1, correction_weight=0.0, refresh_every=0, calibrate="heldout-loss")  # each boundary is allowed
    default = IAUSettings()
    assert (
        default.eta,
        default.steps,
        default.step_rule,
        default.correction,
        default.radius,
        default.correction_weight,
        default.per_layer,
        default.calibrate,
        default.refresh_every,
    ) == (0.045, 2, "normalised", True, 0.04, 3.0, False, "off", 0)


def test_a_step_rule_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="^step rule 'sgd' is registered twice$"):
        register_step_rule("sgd")(StepRule)
    assert STEP_RULES["sgd"].__name__ == "SGDStep"


def test_the_base_step_rule_has_no_step():
    with pytest.raises(NotImplementedError):
        StepRule(torch.zeros(2), IAUSettings()).step(torch.zeros(2), torch.zeros(2))


def test_contributions_by_hand():
    g = torch.tensor([2.0, -4.0])
    assert remaining_contribution(g, 4).tolist() == [0.5, -1.0]
    assert remaining_contribution(g, 4, weight=3.0).tolist() == [1.5, -3.0]
    assert remaining_contribution(g.to(torch.float32), 4).dtype == torch.float64
    kept, forget = torch.tensor([8.0, 0.0]), torch.tensor([3.0, 6.0])
    # lambda G_{u without S}/(n - |S|) - G_S/|S| = 2 * (8, 0)/4 - (3, 6)/3 = (4 - 1, 0 - 2)
    assert withdrawing_contribution(kept, forget, 4, 3, weight=2.0).tolist() == [3.0, -2.0]
    assert withdrawing_contribution(kept, forget, 4, 3).tolist() == [1.0, -2.0]  # lambda defaults to 1
    assert withdrawing_contribution(kept, forget, 4, 3, correction=False).tolist() == [-1.0, -2.0]
    assert withdrawing_contribution(None, forget, 4, 3).tolist() == [-1.0, -2.0]  # client-level: nothing kept
    assert withdrawing_contribution(kept, forget.to(torch.float32), 4, 3).dtype == torch.float64


def test_direction_by_hand_and_its_refusals():
    remaining, forget = torch.tensor([6.0, 3.0]), torch.tensor([1.0, 2.0])
    assert direction_from_parts(remaining, 3, forget, 2).tolist() == [1.5, 0.0]  # (2, 1) - (0.5, 1)
    assert direction_from_parts(remaining, 3, forget, 2, correction=False).tolist() == [-0.5, -1.0]
    assert direction_from_parts(remaining, 3, forget, 2, weight=2.0).tolist() == [3.5, 1.0]
    assert direction_from_parts(remaining, 1, forget, 1).tolist() == [5.0, 1.0]  # counts of one are allowed
    assert direction_from_parts(remaining, 0, forget, 2, correction=False).tolist() == [-0.5, -1.0]  # nothing remains: g_r unused
    with pytest.raises(ValueError, match="^forget_count=0: the forget set must not be empty$"):
        direction_from_parts(remaining, 3, forget, 0)
    with pytest.raises(ValueError, match="^remaining_count=0: nothing would remain after deletion$"):
        direction_from_parts(remaining, 0, forget, 2)
    # Cached protocol: g_r = (G_tot - G_S) / (n - |S|): ((7, 5) - (1, 2)) / (5 - 2) - (1, 2) / 2
    total = torch.tensor([7.0, 5.0])
    assert direction_from_total(total, 5, forget, 2).tolist() == [1.5, 0.0]
    assert direction_from_total(total, 5, forget, 2, correction=False).tolist() == [-0.5, -1.0]
    assert direction_from_total(total, 5, forget, 2, weight=2.0).tolist() == [3.5, 1.0]
    assert direction_from_total(total.to(torch.float32), 5, forget, 2).dtype == torch.float64


def test_stepper_refuses_a_wrong_shape_or_non_finite_direction_by_name():
    stepper = CorrectionStepper(torch.zeros(3), IAUSettings(step_rule="sgd"))
    with pytest.raises(ValueError, match=r"^direction has shape \(2,\), parameters \(3,\)$"):
        stepper.step(torch.zeros(2))
    with pytest.raises(ValueError, match="^direction has non-finite entries: a client sent NaN/inf or the forget set is empty$"):
        stepper.step(torch.tensor([0.0, float("inf"), 0.0]))


def test_stepper_keeps_its_own_copy_and_accumulates_steps():
    theta = torch.tensor([1.0, 2.0])
    stepper = CorrectionStepper(theta, IAUSettings(step_rule="sgd", eta=0.5))
    first = stepper.step(torch.tensor([2.0, 0.0]))
    first += 100.0  # the caller changing the returned tensor must not move the stepper
    theta += 100.0  # nor the caller's theta
    assert stepper.step(torch.tensor([0.0, 2.0])).tolist() == [0.0, 1.0]
    assert stepper.theta.dtype == torch.float64 and not stepper.theta.requires_grad


def test_adam_first_step_uses_eta_and_a_fresh_optimizer_per_stepper():
    theta = torch.tensor([1.0, -1.0], dtype=torch.float64)
    settings = IAUSettings(step_rule="adam-first-step", eta=0.1)
    stepper = CorrectionStepper(theta, settings)
    assert stepper.step(torch.tensor([3.0, -3.0])).tolist() == pytest.approx([0.9, -0.9], abs=1e-7)
    # A second step of the same Adam uses its moments: m = 0.9*0.1*3 + 0.1*3 = 0.57 of (1,-1)... the update is still about eta
    # per coordinate for a constant gradient (m_hat = g, v_hat = g^2).
    assert stepper.step(torch.tensor([3.0, -3.0])).tolist() == pytest.approx([0.8, -0.8], abs=1e-7)
    assert CorrectionStepper(theta, settings).step(torch.tensor([3.0, -3.0])).tolist() == pytest.approx([0.9, -0.9], abs=1e-7)


def test_normalised_step_with_a_calibrated_length_and_a_zero_direction():
    theta = torch.tensor([3.0, 4.0])  # ||theta|| = 5
    stepper = CorrectionStepper(theta, IAUSettings(step_rule="normalised", radius=0.1))
    stepper.length = 0.2  # a length chosen by the client overrides the radius
    assert stepper.step(torch.tensor([0.0, 5.0])).tolist() == pytest.approx([3.0, 3.0])
    zero = CorrectionStepper(theta, IAUSettings(step_rule="normalised", radius=0.1)).step(torch.zeros(2))
    assert zero.tolist() == [3.0, 4.0]  # d = 0: no step, no NaN


def test_per_layer_normalised_step_with_a_calibrated_length_and_without_segments():
    theta = torch.tensor([3.0, 0.0, 4.0, 0.0])  # ||theta|| = 5
    settings = IAUSettings(step_rule="normalised", radius=0.1, per_layer=True)
    stepper = CorrectionStepper(theta, settings, segments=(2, 2))
    stepper.length = 0.4  # step length 0.4 * 5 = 2; each of the two layers moves 2 * sqrt(2/4)
    got = stepper.step(torch.tensor([0.0, 7.0, 0.0, -1.0]))
    share = 2.0 * math.sqrt(0.5)
    assert got.tolist() == pytest.approx([3.0, -share, 4.0, share])
    # Without segments the per-layer rule is the whole-vector rule.
    whole = CorrectionStepper(theta, settings).step(torch.tensor([0.0, 7.0, 0.0, -1.0]))
    d = torch.tensor([0.0, 7.0, 0.0, -1.0], dtype=torch.float64)
    assert whole.tolist() == pytest.approx((theta.double() - 0.5 * d / d.norm()).tolist())
    # A layer whose slice of d is zero does not move (and does not turn NaN).
    zero_layer = CorrectionStepper(theta, settings, segments=(2, 2)).step(torch.tensor([0.0, 0.0, 0.0, -1.0]))
    assert zero_layer.tolist() == pytest.approx([3.0, 0.0, 4.0, 0.5 * math.sqrt(0.5)])


def test_iau_update_takes_k_steps_and_returns_the_input_dtype():
    theta = torch.tensor([1.0, 1.0], dtype=torch.float32)
    out = iau_update(theta, torch.tensor([1.0, -1.0]), IAUSettings(step_rule="sgd", eta=0.25, steps=3))
    assert out.dtype == torch.float32 and out.tolist() == [0.25, 1.75]


def test_choose_radius_takes_the_first_radius_where_forget_loss_reaches_heldout_loss_inclusive():
    assert choose_radius(lambda r: (0.5, 0.5), grid=(0.01, 0.02))[0] == 0.01  # equal counts as reached
    radius, trail = choose_radius(lambda r: (r, 0.025))  # the default grid
    assert radius == 0.03 and [t["radius"] for t in trail] == [0.005, 0.01, 0.02, 0.03]
    radius, trail = choose_radius(lambda r: (0.0, 1.0))
    assert radius == 0.08 and len(trail) == 7


def test_float32_inputs_are_computed_in_float64():
    """A float32 sum divided by a count in float32 loses digits: every division here must happen in float64."""
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])  # float32
    assert direction_from_parts(zero, 1, one, 3).item() == -1 / 3
    assert direction_from_parts(one, 3, zero, 1).item() == 1 / 3
    assert direction_from_parts(one, 3, zero, 1, weight=0.1).item() == 0.1 / 3
    assert withdrawing_contribution(None, one, 1, 3).item() == -1 / 3
    assert withdrawing_contribution(one, zero, 3, 1).item() == 1 / 3
    assert remaining_contribution(one, 3).item() == 1 / 3
    stepper = CorrectionStepper(torch.tensor([1.0, 1.0]), IAUSettings(step_rule="sgd", eta=0.1))
    assert stepper.theta.dtype == torch.float64  # a float64 copy from the start
    assert stepper.step(torch.tensor([1.0, 3.0])).tolist() == [1.0 - 0.1, 1.0 - 0.1 * 3.0]  # eta * d in float64


def test_step_rules_used_directly_take_float32_and_answer_float64():
    from fedunlearn.iau import AdamFirstStep, NormalisedStep

    theta = torch.tensor([1.0, 1.0])  # float32; sqrt(2) differs between float32 and float64
    normalised = NormalisedStep(theta, IAUSettings(step_rule="normalised", radius=0.5)).step(theta, torch.tensor([1.0, 0.0]))
    assert normalised.dtype == torch.float64 and normalised.tolist() == [1.0 - 0.5 * math.sqrt(2.0), 1.0]
    settings = IAUSettings(step_rule="normalised", radius=0.5, per_layer=True)
    per_layer = NormalisedStep(theta, settings, (1, 1)).step(theta, torch.tensor([1.0, 0.0]))
    assert per_layer.dtype == torch.float64 and per_layer.tolist() == [1.0 - 0.5 * math.sqrt(2.0) * math.sqrt(0.5), 1.0]
    adam = AdamFirstStep(theta, IAUSettings(step_rule="adam-first-step", eta=0.1))
    moved = adam.step(theta, torch.tensor([1.0, -1.0]))
    assert moved.dtype == torch.float64 and moved.tolist() == pytest.approx([0.9, 1.1], abs=1e-8)
    assert abs(moved[0].item() - 0.9) < 1e-8  # float64 arithmetic: within Adam's eps, not float32's 1e-7


def test_a_rule_knows_its_settings_and_segments():
    settings = IAUSettings(step_rule="adam-first-step", eta=0.1)
    stepper = CorrectionStepper(torch.zeros(4), settings, segments=(3, 1))
    assert stepper.settings is settings and stepper.rule.settings is settings and stepper.rule.segments == (3, 1)
    for rule in ("sgd", "normalised"):
        s = IAUSettings(step_rule=rule)
        assert CorrectionStepper(torch.zeros(2), s, segments=(1, 1)).rule.settings is s


def test_a_new_step_rule_is_registered_under_its_name():
    try:

        @register_step_rule("test-only-rule")
        class Halve(StepRule):
            def step(self, theta, direction, length=None):
                return theta / 2

        assert STEP_RULES["test-only-rule"] is Halve
    finally:
        STEP_RULES.pop("test-only-rule", None)


def test_normalised_step_divides_by_a_norm_below_one_and_walks_three_layers():
    theta = torch.tensor([3.0, 4.0], dtype=torch.float64)  # ||theta|| = 5
    got = CorrectionStepper(theta, IAUSettings(step_rule="normalised", radius=0.1)).step(torch.tensor([0.0, 0.5]))
    assert got.tolist() == pytest.approx([3.0, 3.5])  # d / ||d|| is a unit vector even when ||d|| < 1
    theta3 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)  # ||theta|| = sqrt(3)
    settings = IAUSettings(step_rule="normalised", radius=0.1, per_layer=True)
    got3 = CorrectionStepper(theta3, settings, segments=(1, 1, 1)).step(torch.tensor([1.0, 2.0, -3.0]))
    share = 0.1 * math.sqrt(3.0) * math.sqrt(1 / 3)  # each layer of one entry moves by its share, along its own sign
    assert got3.tolist() == pytest.approx([1.0 - share, 1.0 - share, 1.0 + share])


# =========================================================================== fedunlearn/cache.py


def test_exclusion_digest_is_the_short_sha256_of_the_sorted_unique_int64_indices():
    expected = hashlib.sha256(np.array([1, 2, 3], dtype=np.int64).tobytes()).hexdigest()[:16]
    assert exclusion_digest(torch.tensor([3, 1, 2, 2], dtype=torch.int32)) == expected
    assert len(expected) == 16


def test_removing_everything_a_cache_holds_is_allowed_and_keeps_the_version():
    cache = GradientCache(torch.tensor([1.0, 2.0], dtype=torch.float32), 3, "v7", "old")
    empty = cache.without(torch.tensor([1.0, 2.0]), 3, "all")
    assert (empty.num_examples, empty.version, empty.scope) == (0, "v7", "all")
    assert empty.gradient_sum.dtype == torch.float64 and empty.gradient_sum.tolist() == [0.0, 0.0]
    assert cache.scope == "old" and GradientCache(torch.zeros(1), 1, "v").scope == "none"
    with pytest.raises(ValueError, match="^cannot remove 4 examples from a cache over 3$"):
        cache.without(torch.zeros(2), 4, "s")


def test_is_at_needs_both_the_version_and_the_scope():
    cache = GradientCache(torch.zeros(1), 1, "v1", "s1")
    assert cache.is_at("v1", "s1")
    assert not cache.is_at("v2", "s1") and not cache.is_at("v1", "s2")


def test_nbytes_counts_the_stored_vector():
    assert GradientCache(torch.zeros(5, dtype=torch.float32), 1, "v").nbytes == 20
    assert GradientCache(torch.zeros(5, dtype=torch.float64), 1, "v").nbytes == 40


def test_store_files_naming_atomic_write_and_sizes(tmp_path):
    root = tmp_path / "deep" / "caches"
    store = CacheStore(root)  # creates missing parents; float32 by default
    assert store.dtype == torch.float32
    store.put(3, GradientCache(torch.arange(4, dtype=torch.float64), 9, "v", "s"))
    assert [p.name for p in root.iterdir()] == ["client-000003.safetensors"]  # no temporary file left behind
    size = (root / "client-000003.safetensors").stat().st_size
    assert store.client_bytes(3) == size == store.total_bytes() and store.client_bytes(4) == 0
    back = store.get(3)
    assert back.gradient_sum.tolist() == [0.0, 1.0, 2.0, 3.0] and back.scope == "s"
    store.put(3, GradientCache(torch.ones(4), 1, "v2"))  # replaced, not appended
    assert store.get(3).version == "v2" and store.get(3).num_examples == 1 and len(list(root.iterdir())) == 1
    store.delete(3)
    store.delete(3)  # absent: a no-op
    assert store.total_bytes() == 0 and store.get(3) is None
    with pytest.raises(ValueError, match="^cache dtype='int8': must be one of float64, float32, bfloat16, float16$"):
        CacheStore(tmp_path, "int8")


def test_the_store_writes_its_own_precision_and_reads_files_without_a_scope(tmp_path):
    from safetensors.torch import load_file, save_file

    store = CacheStore(tmp_path, "float32")
    store.put(2, GradientCache(torch.tensor([1.0, 2.0], dtype=torch.float64), 1, "v"))
    assert load_file(str(tmp_path / "client-000002.safetensors"))["gradient_sum"].dtype == torch.float32  # stored as asked
    # A cache file written before scopes were recorded covers the whole client: scope "none".
    save_file({"gradient_sum": torch.zeros(2)}, str(tmp_path / "client-000005.safetensors"), metadata={"num_examples": "4", "version": "v"})
    assert store.get(5).scope == "none"


def test_the_store_keeps_other_clients_files_apart(tmp_path):
    store = CacheStore(tmp_path, "float64")
    store.put(1, GradientCache(torch.tensor([1.0]), 1, "a"))
    store.put(12, GradientCache(torch.tensor([2.0]), 2, "b"))
    (tmp_path / "unrelated.txt").write_text("x" * 1000)  # only the cache files count
    assert store.get(1).version == "a" and store.get(12).version == "b"
    assert store.total_bytes() == store.client_bytes(1) + store.client_bytes(12)


# =========================================================================== fedunlearn/metrics.py


class Constant(nn.Module):
    """Parameter-free model returning fixed logits for any input (and buffers only if asked)."""

    def __init__(self, logits: list[float], buffer: bool = False) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)
        if buffer:
            self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def test_model_device_falls_back_to_buffers_then_to_cpu():
    assert _model_device(Constant([0.0])) == torch.device("cpu")
    assert _model_device(Constant([0.0], buffer=True)) == torch.device("cpu")
    assert _model_device(nn.Linear(2, 2)) == torch.device("cpu")


def test_input_checks_name_the_shapes():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"^labels must be 1-D, got shape \(2, 1\)$"):
        per_example_loss(model, torch.zeros(2, 2), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="^x has 3 examples but y has 2$"):
        accuracy(model, torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="^batch_size must be >= 1, got 0$"):
        predict_proba(model, torch.zeros(1, 2), batch_size=0)
    predict_proba(model, torch.zeros(1, 2), batch_size=1)  # 1 is allowed


def test_one_example_and_uneven_batches():
    model = Constant([0.0, 2.0, 1.0])
    assert accuracy(model, torch.zeros(1, 4), torch.tensor([1])) == 1.0  # a single example is scored, not nan
    assert accuracy(model, torch.zeros(1, 4), torch.tensor([0])) == 0.0
    assert attack_success_rate(model, torch.zeros(1, 4), target=1) == 1.0
    probs = predict_proba(model, torch.zeros(5, 4), batch_size=2)  # batches of 2, 2, 1
    assert probs.shape == (5, 3)
    expected = torch.softmax(torch.tensor([0.0, 2.0, 1.0]), dim=0)
    torch.testing.assert_close(probs, expected.expand(5, 3))
    empty = predict_proba(model, torch.zeros(0, 4))
    assert empty.shape == (0, 3)
    assert math.isnan(attack_success_rate(model, torch.zeros(0, 4), target=1))


class BatchSpy(nn.Module):
    """A linear model that records the size of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.linear(x)


def test_every_metric_passes_its_batch_size_on():
    from fedunlearn.metrics import evaluate_model, loss_threshold_mia_auc, output_distance

    torch.manual_seed(0)
    model, reference = BatchSpy(), BatchSpy()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    evaluate_model(
        model, test=(x, y), remained=(x, y), deleted=(x, y), triggered=x, target=1, heldout=(x, y), reference=reference, batch_size=2
    )
    assert model.batches and max(model.batches) == 2 and max(reference.batches) == 2
    for name, call in {
        "output_distance": lambda m: output_distance(m, reference, x, batch_size=2),
        "loss_threshold_mia_auc": lambda m: loss_threshold_mia_auc(m, x, y, x, y, batch_size=2),
    }.items():
        spy = BatchSpy()
        call(spy)
        assert max(spy.batches) == 2, name


def test_the_loss_attack_scores_the_members_given_not_the_deleted_set():
    from fedunlearn.metrics import evaluate_model, loss_threshold_mia_auc

    model = Constant([0.0, 3.0, 0.0])  # loss is low on label 1, high on label 0
    x = torch.zeros(4, 2)
    ones, zeros = torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    got = evaluate_model(
        model, test=(x, ones), remained=(x, ones), deleted=(x, zeros), triggered=None, target=1, heldout=(x, zeros), members=(x, ones)
    )
    assert got["mia_auc"] == 1.0 == loss_threshold_mia_auc(model, x, ones, x, zeros)  # members (low loss) beat held-out
    assert (
        evaluate_model(model, test=(x, ones), remained=(x, ones), deleted=(x, zeros), triggered=None, target=1, heldout=(x, ones))[
            "mia_auc"
        ]
        == 0.0
    )  # default members = deleted (high loss)


def test_js_divergence_stays_in_zero_to_ln2_despite_round_off():
    """Nearly equal rows round to tiny negatives, disjoint rows to just above ln 2: the clamp keeps [0, ln 2] exact."""
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2000, 10, dtype=torch.float64, generator=generator), 1)
    q = (p + 1e-12 * torch.randn(p.shape, dtype=torch.float64, generator=generator)).clamp_min(0)
    near = js_divergence(p, q / q.sum(1, keepdim=True))
    assert float(near.min()) >= 0.0
    weights = torch.rand(2000, 10, dtype=torch.float64, generator=generator) + 0.01
    mask = torch.rand(2000, 10, generator=generator) < 0.5
    mask[:, 0], mask[:, 1] = True, False  # every row has mass on both sides
    a, b = torch.where(mask, weights, 0.0), torch.where(~mask, weights, 0.0)
    disjoint = js_divergence(a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True))
    assert float(disjoint.max()) <= math.log(2.0) and float(disjoint.min()) == pytest.approx(math.log(2.0), abs=1e-12)


def test_membership_auc_of_one_empty_side_is_nan_without_asking_sklearn():
    import warnings

    from fedunlearn.metrics import membership_auc

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn warns (and answers nan) when only one class is present
        assert math.isnan(membership_auc(torch.tensor([1.0, 2.0]), torch.empty(0)))
        assert math.isnan(membership_auc(torch.empty(0), torch.tensor([1.0, 2.0])))


def test_single_examples_are_scored_and_an_empty_side_is_nan():
    from fedunlearn.metrics import membership_auc, output_distance

    assert membership_auc(torch.tensor([2.0]), torch.tensor([1.0])) == 1.0
    assert membership_auc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert math.isnan(membership_auc(torch.tensor([1.0, 2.0]), torch.empty(0)))
    assert math.isnan(membership_auc(torch.empty(0), torch.tensor([1.0, 2.0])))
    one = output_distance(Constant([1.0, 0.0]), Constant([0.0, 1.0]), torch.zeros(1, 2))
    p, q = torch.softmax(torch.tensor([1.0, 0.0]), 0), torch.softmax(torch.tensor([0.0, 1.0]), 0)
    m = (p + q) / 2
    assert one == pytest.approx(float(0.5 * ((p * (p / m).log()).sum() + (q * (q / m).log()).sum())), rel=1e-5)
    assert math.isnan(output_distance(Constant([1.0, 0.0]), Constant([0.0, 1.0]), torch.zeros(0, 2)))


def test_parameter_distance_refusals_name_both_sides():
    with pytest.raises(ValueError, match=r"^shape mismatch: \(2,\) vs \(3,\)$"):
        parameter_distance(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="^dtype mismatch at key 'n': torch.int64 vs torch.float32$"):
        parameter_distance({"n": torch.zeros(1, dtype=torch.int64)}, {"n": torch.zeros(1)})
    with pytest.raises(TypeError, match="^parameter_distance needs two tensors or two state dicts, got Tensor and dict$"):
        parameter_distance(torch.zeros(1), {"w": torch.zeros(1)})
    with pytest.raises(TypeError, match="got dict and Tensor$"):
        parameter_distance({"w": torch.zeros(1)}, torch.zeros(1))


def test_parameter_distance_of_one_entry_and_of_nothing():
    assert parameter_distance(torch.tensor([1.0]), torch.tensor([4.0])) == (3.0, 3.0)  # one entry: / sqrt(1)
    norm, normalised = parameter_distance({}, {})
    assert norm == 0.0 and math.isnan(normalised)
    int_only = parameter_distance({"n": torch.tensor([1])}, {"n": torch.tensor([5])})
    assert int_only[0] == 0.0 and math.isnan(int_only[1])  # integer buffers are not weights


def test_js_divergence_refuses_mismatched_shapes_and_works_row_wise_on_any_rank():
    with pytest.raises(ValueError, match=r"^shape mismatch: \(2, 3\) vs \(3, 2\)$"):
        js_divergence(torch.zeros(2, 3), torch.zeros(3, 2))
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.25, 0.75], [1.0, 0.0]]])
    q = torch.tensor([[[0.0, 1.0], [0.5, 0.5]], [[0.75, 0.25], [1.0, 0.0]]])
    got = js_divergence(p, q)
    assert got.shape == (2, 2)
    # Rows by hand: disjoint one-hots give ln 2; equal rows 0; (1/4, 3/4) vs (3/4, 1/4): m = (1/2, 1/2),
    # KL(p||m) = 1/4 ln(1/2) + 3/4 ln(3/2), the same for q.
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    torch.testing.assert_close(got, torch.tensor([[math.log(2), 0.0], [kl, 0.0]]), rtol=0, atol=1e-7)
    assert js_divergence(p, q).dtype == torch.float32
    assert js_divergence(p.double(), q.double()).dtype == torch.float64
    assert js_divergence(torch.tensor([[1, 0]]), torch.tensor([[0, 1]])).dtype == torch.float32  # integer input: float32


def test_js_divergence_clamps_negative_round_off_and_negative_inputs():
    p = torch.tensor([[1.0, -1e-12]])  # a tiny negative probability is treated as 0
    q = torch.tensor([[1.0, 0.0]])
    assert js_divergence(p, q).item() == 0.0
    assert js_divergence(q, p).item() == 0.0
    q2 = torch.tensor([[0.6, 0.4]])
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)  # noqa: E731
    m = [0.8, 0.2]
    assert js_divergence(torch.tensor([[1.0, 0.0]]), q2).item() == pytest.approx(0.5 * (kl([1.0, 0.0], m) + kl([0.6, 0.4], m)), rel=1e-6)
    assert js_divergence(q2, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.5 * (kl([1.0, 0.0], m) + kl([0.6, 0.4], m)), rel=1e-6)


# =========================================================================== strategies/validation.py


def reply_with(content: RecordDict, node: int = NODE_OF[1]) -> Message:
    """A reply to a message for `node`, its source set as the engine would."""
    reply = Message(content, reply_to=request_message(node))
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def test_error_replies_and_missing_records_are_named():
    error = Message(Error(code=1, reason="boom"), reply_to=request_message(NODE_OF[2]))
    error.metadata.__dict__["_src_node_id"] = NODE_OF[2]
    with pytest.raises(InvalidReplyError, match=f"^reply from node {NODE_OF[2]} is an error: boom$"):
        metrics_of(error)
    with pytest.raises(InvalidReplyError, match=f"^reply from node {NODE_OF[2]} is an error: boom$"):
        check_gradient_reply(error, LAYOUT, "v1")
    with pytest.raises(InvalidReplyError, match="has no 'metrics' MetricRecord: the client must report its metrics there$"):
        metrics_of(reply_with(RecordDict()))
    with pytest.raises(InvalidReplyError, match="does not report 'num-examples': the server weights and scales by it$"):
        positive_count(reply_with(RecordDict({keys.METRICS: MetricRecord({"other": 1})})))
    with pytest.raises(InvalidReplyError, match=r"reports num-examples=\[1, 2\]: must be a positive whole number of examples$"):
        positive_count(reply_with(RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: [1, 2]})})))
    assert positive_count(reply_with(RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1})}))) == 1
    assert positive_count(reply_with(RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3.0})}))) == 3


def test_the_echoed_version_and_its_check():
    assert echoed_version(reply_with(RecordDict())) is None
    assert echoed_version(reply_with(RecordDict({keys.CONFIG: ConfigRecord({"other": 1})}))) is None
    old = reply_with(RecordDict({keys.CONFIG: ConfigRecord({keys.MODEL_VERSION: "v0"})}))
    assert echoed_version(old) == "v0"
    assert check_version(old, "v1", stale_ok=True) == "v0"  # a stale cache the run allows
    assert check_version(old, "v0") == "v0"
    with pytest.raises(
        InvalidReplyError,
        match="was computed at model version v0, the server's model is at v1: a reply for another "
        r"model is never aggregated \(allow stale caches to accept it\)$",
    ):
        check_version(old, "v1")
    with pytest.raises(
        InvalidReplyError,
        match=r"does not say which model it was computed at \('model-version' in its 'config' record\): "
        "it cannot be checked against the server's model v1$",
    ):
        check_version(reply_with(RecordDict()), "v1")


def test_gradient_reply_checks_name_the_tensor_and_what_was_expected():
    vector = np.arange(8, dtype=np.float64)
    to = request_message(NODE_OF[1])
    who = f"reply from node {NODE_OF[1]}"
    cases = {
        "shape": rf"^{who}: tensor 'w' has shape \(2, 3\), expected \(3, 2\)$",
        "dtype": rf"^{who}: tensor 'w' has dtype float64, expected float32 \(the wire dtype the server asked for\)$",
        "missing-tensor": rf"^{who} lacks tensor 'b': every trainable parameter must be present$",
        "extra-tensor": rf"^{who} holds tensor\(s\) \['extra'\] the model does not have: expected exactly \['w', 'b'\]\.\.\.$",
        "nan": rf"^{who} holds 1 non-finite value\(s\) \(NaN or inf\): never aggregated$",
        "no-gradient": rf"^{who} has no 'gradient' ArrayRecord$",
        "undecodable": rf"^{who}: tensor 'b' cannot be decoded \(",
    }
    for corruption, message in cases.items():
        with pytest.raises(InvalidReplyError, match=message):
            check_gradient_reply(gradient_reply(to, vector, 5, corruption=corruption), LAYOUT, "v1", dtype="float32")
    # No dtype asked: float64 is accepted; an integer tensor never is.
    got = check_gradient_reply(gradient_reply(to, vector, 5, corruption="dtype"), LAYOUT, "v1")
    assert got.dtype == torch.float64 and got.tolist() == vector.tolist()
    ints = reply_with(RecordDict({keys.GRADIENT: record_of({"w": np.zeros((3, 2), dtype=np.int32), "b": np.zeros(2, dtype=np.int32)})}))
    with pytest.raises(InvalidReplyError, match=r"tensor 'w' has dtype int32, expected a floating-point dtype$"):
        vector_from_record(ints.content.array_records[keys.GRADIENT], LAYOUT, ints)
    # A stale reply is accepted when the run allows stale caches; another count key is read where asked.
    stale = gradient_reply(to, vector, 5, version="v0")
    assert check_gradient_reply(stale, LAYOUT, "v1", stale_ok=True).tolist() == vector.astype(np.float32).tolist()
    forget = gradient_reply(to, vector, 4, count_key=keys.FORGET_SIZE)
    assert check_gradient_reply(forget, LAYOUT, "v1", count_key=keys.FORGET_SIZE).tolist() == vector.tolist()
    with pytest.raises(InvalidReplyError, match="does not report 'num-examples'"):
        check_gradient_reply(forget, LAYOUT, "v1")


def train_reply(tensors: dict[str, np.ndarray], count: float = 3, records: dict[str, ArrayRecord] | None = None) -> Message:
    content = RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: count})})
    for name, record in (records or {keys.ARRAYS: record_of(tensors)}).items():
        content[name] = record
    return reply_with(content)


def test_train_reply_checks_name_the_tensor_and_what_was_expected():
    template = gradient_record(np.zeros(8))
    good = {"w": np.ones((3, 2), dtype=np.float32), "b": np.ones(2, dtype=np.float32)}
    assert check_train_reply(train_reply(good, 7), template) == 7
    assert check_train_reply(train_reply(good, 7), None) == 7  # no template: any tensors, still finite and counted
    who = f"reply from node {NODE_OF[1]}"
    with pytest.raises(InvalidReplyError, match=rf"^{who} holds ArrayRecords \['arrays', 'x'\]: expected exactly one, 'arrays'$"):
        check_train_reply(train_reply(good, records={keys.ARRAYS: record_of(good), "x": record_of(good)}), template)
    with pytest.raises(
        InvalidReplyError, match=rf"^{who}: model tensors differ from the global model's \(missing \['b'\], unexpected \['c'\]\)$"
    ):
        check_train_reply(train_reply({"w": good["w"], "c": good["b"]}), template)
    with pytest.raises(InvalidReplyError, match=rf"^{who}: tensor 'w' has shape \(2, 3\), expected \(3, 2\)$"):
        check_train_reply(train_reply({**good, "w": np.ones((2, 3), dtype=np.float32)}), template)
    with pytest.raises(InvalidReplyError, match=rf"^{who}: tensor 'b' has dtype float64, expected float32$"):
        check_train_reply(train_reply({**good, "b": np.ones(2)}), template)
    with pytest.raises(InvalidReplyError, match=rf"^{who}: tensor 'b' holds non-finite values \(NaN or inf\): never aggregated$"):
        check_train_reply(train_reply({**good, "b": np.array([1.0, np.inf], dtype=np.float32)}), None)
    # Integer tensors (a BatchNorm counter) are not checked for finiteness; they cannot hold NaN.
    assert check_train_reply(train_reply({**good, "n": np.array([3], dtype=np.int64)}), None) == 3
    with pytest.raises(InvalidReplyError, match="expected exactly one, 'weights'"):
        check_train_reply(train_reply(good), template, arrays_key="weights")


def test_norm_bound_at_the_bound_and_its_action_names():
    at_bound = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm 5
    assert bound_norm(at_bound, 5.0, "reject", "client 1") == (at_bound, False)  # equal is within the bound
    clipped, was = bound_norm(at_bound, 2.5, "clip", "client 1")
    assert was and clipped.tolist() == [1.5, 2.0]
    assert bound_norm(at_bound, -1.0, "reject", "c")[1] is False  # negative: no bound either
    with pytest.raises(ValueError, match="^gradient-norm-action='drop': must be one of clip, reject$"):
        bound_norm(at_bound, 1.0, "drop", "client 1")


def test_rejections_and_failures_are_logged_with_their_round(caplog):
    log: list[dict] = []
    reply = reply_with(RecordDict(), node=NODE_OF[2])
    with caplog.at_level("INFO"):
        entry = record_rejection(log, "unlearn", 2, reply, "bad shape", server_round=4)
        plain = record_rejection(log, "train", 2, reply, "nan")
        failure = record_failure(log, "unlearn", 3, "timeout", server_round=5)
        failure_plain = record_failure(log, "train", None, "error")
    assert entry == {"phase": "unlearn", "partition": 2, "node": NODE_OF[2], "reason": "bad shape", "round": 4}
    assert plain == {"phase": "train", "partition": 2, "node": NODE_OF[2], "reason": "nan"}
    assert failure == {"phase": "unlearn", "partition": 3, "reason": "timeout", "round": 5}
    assert failure_plain == {"phase": "train", "partition": None, "reason": "error"}
    assert log == [entry, plain, failure, failure_plain]
    messages = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.name == "fedunlearn.validation"]
    assert messages == [
        ("fedunlearn.validation", "WARNING", "rejected unlearn reply of client 2: bad shape"),
        ("fedunlearn.validation", "WARNING", "rejected train reply of client 2: nan"),
        ("fedunlearn.validation", "INFO", "client 3 did not answer the unlearn round: timeout"),
        ("fedunlearn.validation", "INFO", "client None did not answer the train round: error"),
    ]


def test_same_request_ignores_only_the_round():
    a = DeletionRequest(client=1, samples="random", fraction=0.3, at_round=2)
    assert same_request(a, DeletionRequest(client=1, samples="random", fraction=0.3, at_round=5))
    assert not same_request(a, DeletionRequest(client=2, samples="random", fraction=0.3))
    assert not same_request(a, DeletionRequest(client=1, samples="poisoned"))
    assert not same_request(a, DeletionRequest(client=1, samples="random", fraction=0.4))


def test_withdrawal_checks_for_an_empty_directory_and_a_requester_that_owns_the_partition():
    with pytest.raises(WithdrawalRequestError, match="^request for unknown client 0: known partitions are none$"):
        check_withdrawal(ClientDirectory(), (), DeletionRequest(client=0))
    directory = ClientDirectory(node_of=dict(NODE_OF), num_train=dict(NUM_TRAIN))
    assert check_withdrawal(directory, [], DeletionRequest(client=1, samples="poisoned"), requester=NODE_OF[1]) is False
    # A list ledger (any iterable) is read like a tuple; a sample request after a sample request of the client is served.
    served = [DeletionRequest(client=1, samples="poisoned")]
    assert check_withdrawal(directory, iter(served), DeletionRequest(client=1, samples="poisoned")) is True
    assert check_withdrawal(directory, served, DeletionRequest(client=1, samples="random", fraction=0.2)) is False
    with pytest.raises(
        WithdrawalRequestError,
        match="^client 3 has already withdrawn entirely: a new request for its 'random' examples has nothing left to remove$",
    ):
        check_withdrawal(directory, (DeletionRequest(client=3),), DeletionRequest(client=3, samples="random", fraction=0.5))
    with pytest.raises(
        WithdrawalRequestError,
        match=f"^node {NODE_OF[0]} asked to withdraw the data of client 1, which node "
        f"{NODE_OF[1]} serves: only the node itself may ask to withdraw its data$",
    ):
        check_withdrawal(directory, (), DeletionRequest(client=1), requester=NODE_OF[0])


def test_finite_metric():
    def with_metric(value) -> Message:
        return reply_with(RecordDict({keys.METRICS: MetricRecord({"loss": value})}))

    assert finite_metric(with_metric(0.25), "loss") == 0.25
    assert finite_metric(with_metric(2), "loss") == 2.0
    for bad, shown in ((float("nan"), "nan"), (float("inf"), "inf"), ([1.0, 2.0], r"\[1.0, 2.0\]")):
        with pytest.raises(InvalidReplyError, match=rf"reports loss={shown}: must be a finite number$"):
            finite_metric(with_metric(bad), "loss")
    with pytest.raises(InvalidReplyError, match="reports accuracy=None: must be a finite number$"):
        finite_metric(with_metric(1.0), "accuracy")


# ----- strategies/validation.py survivors of the full run (docs/testing.md) ------------------------------------
def test_a_norm_bound_below_one_is_still_a_bound():
    vector = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm 5
    clipped, was_clipped = bound_norm(vector, 0.5, "clip", "client 1")
    assert was_clipped and float(clipped.norm()) == pytest.approx(0.5) and torch.allclose(clipped / 0.5, vector / 5.0)
    with pytest.raises(InvalidReplyError, match=r"^client 1: contribution norm 5 exceeds the bound 0.5"):
        bound_norm(vector, 0.5, "reject", "client 1")


def test_an_error_reply_or_an_undecodable_tensor_is_named_in_the_gradient_check():
    error = Message(Error(code=1, reason="boom"), reply_to=request_message(NODE_OF[2]))
    error.metadata.__dict__["_src_node_id"] = NODE_OF[2]
    with pytest.raises(InvalidReplyError, match=f"^reply from node {NODE_OF[2]} is an error: boom$"):
        gradient_vector(error, LAYOUT)
    reply = gradient_reply(request_message(NODE_OF[1]), np.ones(LAYOUT.numel), corruption="undecodable")
    reply.metadata.__dict__["_src_node_id"] = NODE_OF[1]
    with pytest.raises(InvalidReplyError, match=rf"^reply from node {NODE_OF[1]}: tensor 'b' cannot be decoded \(ValueError: "):
        gradient_vector(reply, LAYOUT)


def test_an_undecodable_tensor_in_a_training_reply_is_named():
    good = {"w": np.ones((3, 2), dtype=np.float32), "b": np.ones(2, dtype=np.float32)}
    record = record_of(good)
    record["b"] = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x00\x01\x02")  # 3 bytes for 2 floats
    with pytest.raises(InvalidReplyError, match=rf"^reply from node {NODE_OF[1]}: tensor 'b' cannot be decoded \(ValueError: "):
        check_train_reply(train_reply(good, 7, records={keys.ARRAYS: record}), None)
