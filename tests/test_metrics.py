"""Tests for fedunlearn.metrics."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedunlearn.metrics import (
    accuracy,
    attack_success_rate,
    evaluate_model,
    js_divergence,
    loss_threshold_mia_auc,
    membership_auc,
    output_distance,
    parameter_distance,
    per_example_loss,
    predict_proba,
)

LN2 = math.log(2.0)


def identity_linear(n: int, scale: float = 1.0) -> nn.Linear:
    """Return a Linear(n, n) whose logits are scale * x, so argmax(x) is the prediction."""
    layer = nn.Linear(n, n)
    with torch.no_grad():
        layer.weight.copy_(scale * torch.eye(n))
        layer.bias.zero_()
    return layer


# --------------------------------------------------------------------------- accuracy / ASR


def test_accuracy_on_known_predictions() -> None:
    """Accuracy counts argmax hits of a hand-built linear model."""
    model = identity_linear(3)
    # Predictions: 0, 1, 2, 2 (argmax of each row).
    x = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [1.0, 0, 2.0]])
    y = torch.tensor([0, 1, 1, 2])
    assert accuracy(model, x, y) == pytest.approx(0.75)
    # Batching must not change the answer.
    assert accuracy(model, x, y, batch_size=1) == pytest.approx(0.75)


def test_accuracy_empty_is_nan() -> None:
    """Empty input gives nan, not a division error."""
    model = identity_linear(3)
    assert math.isnan(accuracy(model, torch.empty(0, 3), torch.empty(0, dtype=torch.long)))


def test_attack_success_rate_counts_target_hits() -> None:
    """ASR is the fraction of triggered inputs predicted as the target class."""
    model = identity_linear(3)
    x = torch.tensor([[0, 0, 1.0], [0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0]])
    assert attack_success_rate(model, x, target=2) == pytest.approx(3 / 5)
    assert attack_success_rate(model, x, target=0, batch_size=2) == pytest.approx(1 / 5)
    assert math.isnan(attack_success_rate(model, torch.empty(0, 3), target=0))


def test_predict_proba_and_loss_match_direct_computation() -> None:
    """Batched softmax and per-example loss agree with one direct forward pass."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    with torch.no_grad():
        logits = model(x)
    probs = predict_proba(model, x, batch_size=3)
    assert probs.shape == (10, 3)
    assert torch.allclose(probs, torch.softmax(logits, dim=1), atol=1e-6)
    assert torch.allclose(probs.sum(dim=1), torch.ones(10), atol=1e-6)
    losses = per_example_loss(model, x, y, batch_size=4)
    assert torch.allclose(losses, F.cross_entropy(logits, y, reduction="none"), atol=1e-6)


# --------------------------------------------------------------------------- parameter distance


def test_parameter_distance_hand_computed_tensors() -> None:
    """A difference of [3, 4] has norm 5 and normalised norm 5 / sqrt(2)."""
    dist, norm = parameter_distance(torch.tensor([3.0, 4.0]), torch.zeros(2))
    assert dist == pytest.approx(5.0)
    assert norm == pytest.approx(5.0 / math.sqrt(2.0))


def test_parameter_distance_dicts_span_all_float_entries() -> None:
    """Over dicts the norm pools every float entry and ignores integer buffers."""
    a = {
        "w": torch.tensor([[1.0, 2.0]]),
        "b": torch.tensor([0.0]),
        "num_batches_tracked": torch.tensor(7),
    }
    b = {
        "w": torch.tensor([[1.0, 0.0]]),  # diff 0, 2
        "b": torch.tensor([1.0]),  # diff -1
        "num_batches_tracked": torch.tensor(1000),  # ignored
    }
    dist, norm = parameter_distance(a, b)
    assert dist == pytest.approx(math.sqrt(5.0))
    assert norm == pytest.approx(math.sqrt(5.0) / math.sqrt(3.0))


def test_parameter_distance_ignores_batchnorm_counter_in_state_dict() -> None:
    """Identical models with different BatchNorm counters are at distance 0."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    other = copy.deepcopy(model)
    other[1].num_batches_tracked += 5
    dist, norm = parameter_distance(model.state_dict(), other.state_dict())
    assert dist == 0.0 and norm == 0.0


def test_parameter_distance_key_mismatch_names_key() -> None:
    """Missing keys and shape mismatches raise ValueError naming the key."""
    a = {"layer.weight": torch.zeros(2), "layer.bias": torch.zeros(1)}
    with pytest.raises(ValueError, match="layer.bias"):
        parameter_distance(a, {"layer.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="extra"):
        parameter_distance(a, {**a, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="layer.weight"):
        parameter_distance(a, {"layer.weight": torch.zeros(3), "layer.bias": torch.zeros(1)})
    with pytest.raises(ValueError):
        parameter_distance(torch.zeros(2), torch.zeros(3))


# --------------------------------------------------------------------------- JS divergence


def test_js_identical_rows_is_zero() -> None:
    """JS(p, p) = 0, including rows with zeros."""
    p = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    assert torch.allclose(js_divergence(p, p), torch.zeros(2), atol=1e-7)


def test_js_disjoint_one_hot_is_ln2() -> None:
    """Disjoint supports reach the maximum ln 2."""
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(js_divergence(p, q), torch.full((2,), LN2), atol=1e-6)


def _numpy_js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Direct per-row JS divergence in numpy (strictly positive inputs)."""
    m = 0.5 * (p + q)
    return 0.5 * (p * np.log(p / m)).sum(axis=1) + 0.5 * (q * np.log(q / m)).sum(axis=1)


def test_js_symmetric_and_matches_numpy() -> None:
    """JS is symmetric and agrees with a direct numpy computation on random rows."""
    rng = np.random.default_rng(0)
    p_np = rng.dirichlet(np.ones(5), size=20)
    q_np = rng.dirichlet(np.ones(5), size=20)
    p, q = torch.from_numpy(p_np), torch.from_numpy(q_np)
    js_pq, js_qp = js_divergence(p, q), js_divergence(q, p)
    assert torch.allclose(js_pq, js_qp, atol=1e-12)
    np.testing.assert_allclose(js_pq.numpy(), _numpy_js(p_np, q_np), rtol=1e-9, atol=1e-12)
    assert bool((js_pq >= 0).all()) and bool((js_pq <= LN2).all())


def test_output_distance_zero_for_same_model_positive_otherwise() -> None:
    """DIST_output is 0 against itself and positive against a different model."""
    torch.manual_seed(1)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(16, 4)
    assert output_distance(a, copy.deepcopy(a), x) == pytest.approx(0.0, abs=1e-9)
    d = output_distance(a, b, x, batch_size=5)
    expected = js_divergence(predict_proba(a, x), predict_proba(b, x)).mean().item()
    assert 0.0 < d <= LN2
    assert d == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- membership inference


def test_membership_auc_perfect_separation() -> None:
    """Every member scoring above every non-member gives AUC 1 (and 0 reversed)."""
    members = torch.tensor([5.0, 6.0, 7.0])
    nonmembers = torch.tensor([1.0, 2.0])
    assert membership_auc(members, nonmembers) == pytest.approx(1.0)
    assert membership_auc(nonmembers, members) == pytest.approx(0.0)


def test_membership_auc_identical_distributions_is_half() -> None:
    """Samples from one distribution give AUC 0.5 (exactly so for identical samples)."""
    same = torch.arange(100, dtype=torch.float64)
    assert membership_auc(same, same.clone()) == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20_000, generator=gen)
    b = torch.randn(20_000, generator=gen)
    assert membership_auc(a, b) == pytest.approx(0.5, abs=0.015)


def test_membership_auc_matches_pairwise_count_with_ties() -> None:
    """AUC equals P(member > non-member) + 1/2 P(tie), counted over all pairs."""
    rng = np.random.default_rng(3)
    # Small integers force many ties.
    m = rng.integers(0, 5, size=13).astype(float)
    n = rng.integers(0, 5, size=9).astype(float)
    wins = sum((mi > ni) + 0.5 * (mi == ni) for mi in m for ni in n)
    brute = wins / (len(m) * len(n))
    assert membership_auc(torch.from_numpy(m), torch.from_numpy(n)) == pytest.approx(brute)


def test_membership_auc_empty_side_is_nan() -> None:
    """An empty side makes the AUC undefined."""
    assert math.isnan(membership_auc(torch.empty(0), torch.tensor([1.0])))
    assert math.isnan(membership_auc(torch.tensor([1.0]), torch.empty(0)))


Setup = tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _memorising_setup(n: int = 60) -> Setup:
    """Return a fixed model plus members it fits (tiny loss) and non-members it misfits."""
    gen = torch.Generator().manual_seed(0)
    model = identity_linear(3, scale=10.0)
    labels = torch.randint(0, 3, (n,), generator=gen)
    x_m = F.one_hot(labels, 3).float() + 0.05 * torch.randn(n, 3, generator=gen)
    y_m = labels
    labels_n = torch.randint(0, 3, (n,), generator=gen)
    x_n = F.one_hot(labels_n, 3).float() + 0.05 * torch.randn(n, 3, generator=gen)
    y_n = (labels_n + 1) % 3  # the model confidently predicts the wrong class: large loss
    return model, x_m, y_m, x_n, y_n


def test_loss_threshold_mia_detects_memorisation() -> None:
    """Members with tiny loss and non-members with large loss are told apart."""
    model, x_m, y_m, x_n, y_n = _memorising_setup()
    assert per_example_loss(model, x_m, y_m).max() < 0.01
    assert per_example_loss(model, x_n, y_n).min() > 5.0
    assert loss_threshold_mia_auc(model, x_m, y_m, x_n, y_n) > 0.9
    # Swapping the roles flips the attack.
    assert loss_threshold_mia_auc(model, x_n, y_n, x_m, y_m) < 0.1


# --------------------------------------------------------------------------- evaluate_model


BASE_KEYS = {"acc_test", "acc_remained", "acc_deleted", "backdoor_asr", "mia_auc"}
REF_KEYS = {"dist_output", "dist_output_deleted", "dist_para", "dist_para_normalized"}


def _net() -> nn.Module:
    """Return a small net with dropout and BatchNorm, whose results depend on the mode."""
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def test_evaluate_model_keys_values_and_mode_restored() -> None:
    """evaluate_model returns the documented keys and leaves training flags untouched."""
    torch.manual_seed(0)
    model, x_m, y_m, x_n, y_n = _memorising_setup(30)
    net = _net()
    net.train()
    net[3].eval()  # a mixed state must survive too
    before = [m.training for m in net.modules()]
    bn_mean = net[1].running_mean.clone()
    kwargs = dict(
        test=(x_n, y_n),
        remained=(x_m, y_m),
        deleted=(x_m, y_m),
        triggered=None,
        target=0,
        heldout=(x_n, y_n),
    )

    out = evaluate_model(net, **kwargs)
    assert set(out) == BASE_KEYS
    assert math.isnan(out["backdoor_asr"])
    assert [m.training for m in net.modules()] == before
    # Eval mode means BatchNorm statistics were not updated.
    assert torch.equal(net[1].running_mean, bn_mean)

    out = evaluate_model(net, **{**kwargs, "triggered": x_m}, reference=copy.deepcopy(net))
    assert set(out) == BASE_KEYS | REF_KEYS | {"dist_output_triggered"}
    assert out["dist_output_triggered"] == pytest.approx(0.0, abs=1e-9)
    assert [m.training for m in net.modules()] == before
    assert 0.0 <= out["backdoor_asr"] <= 1.0
    assert out["dist_para"] == 0.0 and out["dist_para_normalized"] == 0.0
    assert out["dist_output"] == pytest.approx(0.0, abs=1e-9)
    assert out["dist_output_deleted"] == pytest.approx(0.0, abs=1e-9)


def test_evaluate_model_values_on_memorising_model() -> None:
    """On the memorising model the metrics take their hand-derivable values."""
    model, x_m, y_m, x_n, y_n = _memorising_setup(40)
    model.train()
    reference = identity_linear(3, scale=1.0)
    out = evaluate_model(
        model,
        test=(x_m, y_m),
        remained=(x_m, y_m),
        deleted=(x_m, y_m),
        triggered=torch.tensor([[0.0, 0.0, 1.0]] * 4),
        target=2,
        heldout=(x_n, y_n),
        reference=reference,
    )
    assert model.training
    assert out["acc_test"] == pytest.approx(1.0)
    assert out["acc_deleted"] == pytest.approx(1.0)
    assert out["backdoor_asr"] == pytest.approx(1.0)
    assert out["mia_auc"] > 0.9
    # Weight difference is 9 * I (3 entries of 9), biases equal: norm 9 * sqrt(3) over 12 entries.
    assert out["dist_para"] == pytest.approx(9.0 * math.sqrt(3.0))
    assert out["dist_para_normalized"] == pytest.approx(9.0 * math.sqrt(3.0) / math.sqrt(12.0))
    assert 0.0 < out["dist_output"] <= LN2
