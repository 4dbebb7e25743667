"""Gradient caches: subset removal against direct computation, storage round trips, dtypes."""

from __future__ import annotations

import pytest
import torch

from fedunlearn.cache import CacheStore, GradientCache, exclusion_digest
from fedunlearn.gradients import gradient_sum
from fedunlearn.models import build_model


@pytest.fixture
def model_and_data():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    x = torch.randn(57, 1, 8, 8)
    y = torch.randint(0, 10, (57,))
    return model, x, y


def test_removing_a_subset_equals_direct_computation(model_and_data):
    model, x, y = model_and_data
    full, _, _ = gradient_sum(model, x, y, batch_size=16)
    subset = torch.tensor([0, 3, 4, 10, 31, 56])
    keep = torch.ones(57, dtype=torch.bool)
    keep[subset] = False
    subset_sum, _, _ = gradient_sum(model, x[subset], y[subset], batch_size=16)
    direct, _, _ = gradient_sum(model, x[keep], y[keep], batch_size=16)
    cache = GradientCache(full, 57, "v1").without(subset_sum, len(subset), exclusion_digest(subset))
    assert cache.num_examples == 51
    assert cache.version == "v1"
    torch.testing.assert_close(cache.gradient_sum, direct, rtol=1e-5, atol=1e-6)
    # And it is not trivially equal to the full sum.
    assert (cache.gradient_sum - full).abs().max() > 1e-3


def test_gradient_sum_is_a_sum_not_a_mean(model_and_data):
    model, x, y = model_and_data
    total, loss_sum, _ = gradient_sum(model, x, y, batch_size=10)
    halves = gradient_sum(model, x[:20], y[:20])[0] + gradient_sum(model, x[20:], y[20:])[0]
    torch.testing.assert_close(total, halves, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    autograd = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    torch.testing.assert_close(total, autograd, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        expected_loss = float(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"))
    assert loss_sum == pytest.approx(expected_loss, rel=1e-5)


def test_removing_more_than_held_is_refused():
    with pytest.raises(ValueError, match="cannot remove 5 examples"):
        GradientCache(torch.zeros(3), 4, "v").without(torch.zeros(3), 5, "s")


@pytest.mark.parametrize("dtype,tol", [("float64", 0.0), ("float32", 1e-6), ("bfloat16", 1e-2), ("float16", 1e-3)])
def test_store_round_trip_keeps_metadata_and_precision(tmp_path, dtype, tol):
    store = CacheStore(tmp_path, dtype)
    vector = torch.randn(1000, dtype=torch.float64)
    store.put(3, GradientCache(vector, 42, "abc", "scope1"))
    back = store.get(3)
    assert (back.num_examples, back.version, back.scope) == (42, "abc", "scope1")
    assert back.gradient_sum.dtype == torch.float64
    torch.testing.assert_close(back.gradient_sum, vector, rtol=tol, atol=tol * 4)
    bytes_per = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    assert store.total_bytes() >= 1000 * bytes_per
    assert store.get(4) is None
    store.delete(3)
    assert store.get(3) is None


def test_digest_depends_on_the_set_not_the_order():
    assert exclusion_digest(torch.tensor([3, 1, 2])) == exclusion_digest(torch.tensor([1, 2, 3, 3]))
    assert exclusion_digest(torch.tensor([1, 2])) != exclusion_digest(torch.tensor([1, 3]))
    assert exclusion_digest(torch.empty(0, dtype=torch.int64)) == "none"
