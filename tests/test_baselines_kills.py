"""Hand-computed checks of fedunlearn/baselines.py written against the mutants that survived its first mutation run.

Each test names the behaviour a surviving mutant changed (docs/testing.md lists them): a boundary, an error message
that must name what is wrong, a precision the result promises, an entry that must be carried over. Expected values are
worked out here with numpy or by hand, never by the functions under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedunlearn.baselines import (
    FedEraserSettings,
    IMUSettings,
    PGASettings,
    UpdateHistory,
    apply_update,
    ball_radius_from_random,
    head_inputs,
    head_module,
    head_parameter_names,
    imu_head_ascent,
    imu_weights,
    pga_reference,
    project_to_ball,
    projected_gradient_ascent,
    rescale_update,
    weighted_ascent_loss,
    weighted_mean,
)

# ----- FedEraser -----------------------------------------------------------------------------------


def test_rescale_update_names_the_layer_missing_from_the_stored_update():
    with pytest.raises(KeyError, match="'fc.bias'.*no stored update"):
        rescale_update({"fc.weight": torch.ones(2)}, {"fc.weight": torch.ones(2), "fc.bias": torch.ones(1)})


def test_rescale_update_takes_the_old_norm_in_float64():
    # float32 storage, many entries: the float32 norm is off by ~1e-7 relative, the promised float64 one is exact.
    rng = np.random.default_rng(3)
    old = rng.standard_normal(20_000).astype(np.float32)
    cal = rng.standard_normal(20_000)
    expected = np.linalg.norm(old.astype(np.float64)) * cal / np.linalg.norm(cal)
    got = rescale_update({"w": torch.from_numpy(old)}, {"w": torch.from_numpy(cal)})["w"]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13, atol=0)


def test_apply_update_keeps_entries_the_update_does_not_have():
    theta = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(7)}
    out = apply_update(theta, {"w": torch.tensor([0.5, -1.0], dtype=torch.float64)})
    assert out["w"].dtype == torch.float32 and out["w"].tolist() == [1.5, 1.0]
    assert out["bn.num_batches_tracked"].item() == 7 and out["bn.num_batches_tracked"] is not theta["bn.num_batches_tracked"]


# ----- PGA -------------------------------------------------------------------------------------------


def test_projection_keeps_the_input_dtype():
    out = project_to_ball(torch.tensor([3.0, 4.0]), torch.zeros(2), 1.0)  # float32 in, |v| = 5 > 1
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([0.6, 0.8], abs=1e-7)


def test_a_point_on_the_sphere_is_returned_unchanged():
    # In float64, 0.9 + (0.001 - 0.9) != 0.001: a point at exactly the radius must come back as it is, not recomputed.
    vector, center = torch.tensor([1e-3], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64)
    radius = abs(1e-3 - 0.9)
    assert float(torch.dist(vector, center)) == radius
    assert project_to_ball(vector, center, radius).item() == 1e-3


# ----- IMU -------------------------------------------------------------------------------------------

VALID = {"lr": 0.01, "epochs": 1, "batch_size": 1, "damping": 0.01, "clip_quantile": 1.0}


def test_imu_settings_accept_the_edges_of_their_ranges():
    IMUSettings(**VALID)  # epochs 1, batch 1, quantile 1 are allowed


@pytest.mark.parametrize(
    "field, value",
    [("lr", 0.0), ("epochs", 0), ("batch_size", 0), ("damping", 0.0), ("clip_quantile", 0.0), ("clip_quantile", 1.5)],
)
def test_imu_settings_refuse_each_bad_value_alone(field, value):
    with pytest.raises(ValueError, match=rf"invalid IMUSettings .*{field}={value!r}.*lr > 0, epochs >= 1"):
        IMUSettings(**{**VALID, field: value})


def test_head_module_refuses_a_model_without_parameters():
    with pytest.raises(ValueError, match="^the model has no parameters: there is no final layer to unlearn$"):
        head_module(nn.Sequential(nn.ReLU(), nn.Flatten()))


def test_head_of_a_bare_layer_is_the_model_itself():
    assert head_module(nn.Linear(3, 2))[0] == ""
    assert head_parameter_names(nn.Linear(3, 2)) == ["weight", "bias"]
    assert head_parameter_names(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))) == ["2.weight", "2.bias"]


def imu_reference(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, s: IMUSettings, seed: int) -> dict:
    """IMU-head written out for a Linear-ReLU-Linear model: per-example gradients one by one with autograd, influence
    and weights in numpy, then plain SGD by hand over the same seeded batches (the generator's randperm per epoch)."""
    first, head = model[0], model[2]
    with torch.no_grad():
        features = torch.relu(first(x))
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()

    def losses(w: torch.Tensor, b: torch.Tensor, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(f @ w.T + b, labels, reduction="none")

    rows = []
    for i in range(len(x)):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        losses(w, b, features[i : i + 1], y[i : i + 1]).sum().backward()
        rows.append(np.concatenate([w.grad.numpy().ravel(), b.grad.numpy().ravel()]))
    g = np.array(rows, dtype=np.float64)
    scores = -(g * (g.mean(axis=0) / ((g**2).mean(axis=0) + s.damping))).sum(axis=1)
    weights = np.zeros(len(x))
    keep = scores < 0
    if keep.any():
        raw = np.sqrt(np.abs(scores[keep]))
        weights[keep] = np.minimum(raw, np.quantile(raw, s.clip_quantile))
    out = {"kept": int((weights > 0).sum()), "steps": 0, "loss_before": float(losses(weight, bias, features, y).mean())}
    if out["kept"]:
        generator = torch.Generator().manual_seed(seed)
        wt = torch.from_numpy(weights).to(x.dtype)
        for _ in range(s.epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), s.batch_size):
                idx = order[start : start + s.batch_size]
                if float(wt[idx].sum()) <= 0:
                    continue
                w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
                (-(wt[idx] * losses(w, b, features[idx], y[idx])).sum() / wt[idx].sum()).backward()
                weight, bias = weight - s.lr * w.grad, bias - s.lr * b.grad
                out["steps"] += 1
    out.update(loss_after=float(losses(weight, bias, features, y).mean()), weight=weight, bias=bias)
    return out


def imu_case(n: int, seed: int, scale: float = 1.0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    return model, scale * torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


# (examples, seed, input scale, settings): one example; small inputs, whose weights sum to under 1 per batch; batches
# with no kept example (batch 1); non-default damping and quantile; the default lr. One example is always kept
# (its influence is -g.(g/F) < 0), so "one-example" is also the case of exactly one kept example.
IMU_CASES = {
    "one-example": (1, 0, 1.0, IMUSettings(lr=0.3, epochs=2, batch_size=4)),
    "small-weights": (12, 1, 0.05, IMUSettings(lr=0.7, epochs=2, batch_size=3)),
    "batch-of-one": (9, 2, 1.0, IMUSettings(lr=0.2, epochs=3, batch_size=1)),
    "damping-quantile": (16, 3, 1.0, IMUSettings(lr=0.1, epochs=2, batch_size=5, damping=0.3, clip_quantile=0.5)),
    "default-lr": (10, 4, 1.0, IMUSettings(epochs=2, batch_size=4)),
}


@pytest.mark.parametrize("case", list(IMU_CASES))
def test_imu_head_ascent_equals_a_written_out_reference(case):
    n, seed, scale, settings = IMU_CASES[case]
    model, x, y = imu_case(n, seed, scale)
    expected = imu_reference(model, x, y, settings, seed=7)
    stats = imu_head_ascent(model, x, y, settings, torch.Generator().manual_seed(7))
    assert (stats.kept, stats.steps) == (expected["kept"], expected["steps"])
    assert expected["steps"] > 0  # every case takes steps: a case that stops early would not test the loop
    assert stats.loss_before == pytest.approx(expected["loss_before"], rel=1e-12)
    assert stats.loss_after == pytest.approx(expected["loss_after"], rel=1e-10)
    torch.testing.assert_close(model[2].weight.detach(), expected["weight"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[2].bias.detach(), expected["bias"], rtol=1e-10, atol=1e-12)


def test_head_inputs_of_no_examples_are_empty():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    out = head_inputs(model, torch.zeros(0, 4))
    assert out.numel() == 0


# ----- shared helpers and FedEraser's store -----------------------------------------------------------


def test_weighted_mean_refuses_mismatched_lengths_naming_both():
    with pytest.raises(ValueError, match=r"as many weights as states \(got 2 states, 1 weights\)"):
        weighted_mean([{"w": torch.ones(1)}, {"w": torch.ones(1)}], [1.0])


def test_weighted_mean_refuses_weights_summing_to_zero_and_accepts_fractions():
    with pytest.raises(ValueError, match="weights sum to 0.0: every weight must be >= 0"):
        weighted_mean([{"w": torch.ones(1)}, {"w": torch.ones(1)}], [0.0, 0.0])
    out = weighted_mean([{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}], [0.25, 0.5])  # (0.25 + 2) / 0.75 = 3
    assert out["w"].item() == pytest.approx(3.0, rel=1e-15)
    assert weighted_mean([{"w": torch.tensor([2.0])}], [0.5])["w"].item() == 2.0  # a single state


def test_federaser_settings_edges_and_messages():
    FedEraserSettings(interval=1, calibration_ratio=1.0)
    with pytest.raises(ValueError, match=r"calibration_ratio=0.0: must be in \(0, 1\]"):
        FedEraserSettings(calibration_ratio=0.0)
    with pytest.raises(ValueError, match=r"calibration_ratio=1.5: must be in \(0, 1\]"):
        FedEraserSettings(calibration_ratio=1.5)
    # Every third round from round 1 (interval 2 cannot tell r - 1 from r + 1).
    assert [r for r in range(1, 11) if FedEraserSettings(interval=3).stores(r)] == [1, 4, 7, 10]


def test_update_history_of_an_unstored_round_or_partition_is_empty():
    history = UpdateHistory(interval=1)
    history.record(1, 0, {"w": torch.ones(2)}, {"w": torch.zeros(2)}, 5)
    assert history.partitions(99) == []
    assert history.mean_update(1, [3]) is None  # the round is stored, the partition is not
    assert history.mean_update(2, [0]) is None


# ----- PGA ---------------------------------------------------------------------------------------------


def test_pga_reference_with_no_share_is_the_global_model():
    out = pga_reference(torch.tensor([1.0, -2.0]), torch.tensor([5.0, 5.0]), 0.0)
    assert out.tolist() == [1.0, -2.0]


def test_ball_radius_by_hand_and_its_message():
    # ||(1, 2) - (3, 5)||^2 = 13; sqrt(13 / 3) with the default fraction.
    assert ball_radius_from_random(torch.tensor([1.0, 2.0]), [torch.tensor([3.0, 5.0])]) == pytest.approx(np.sqrt(13 / 3), rel=1e-15)
    with pytest.raises(ValueError, match="^ball_radius_from_random needs at least one random model$"):
        ball_radius_from_random(torch.zeros(2), [])


def pga_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2).double()


def test_pga_refuses_a_zero_radius():
    model = pga_model()
    flat = torch.cat([p.detach().ravel() for p in model.parameters()])
    with pytest.raises(ValueError, match=r"radius=0.0: must be > 0"):
        projected_gradient_ascent(model, torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), flat, 0.0, PGASettings(), torch.Generator())


def test_pga_without_examples_reports_radius_and_distance_to_the_local_model():
    model = pga_model()
    reference = torch.arange(8, dtype=torch.float64)  # weight (2x3) + bias (2)
    local = reference + torch.tensor([3.0, 0, 0, 0, 0, 0, 0, -2.0], dtype=torch.float64)  # squared distance 9 + 4
    stats = projected_gradient_ascent(
        model,
        torch.zeros(0, 3, dtype=torch.float64),
        torch.zeros(0, dtype=torch.long),
        reference,
        2.5,
        PGASettings(),
        torch.Generator(),
        local,
    )
    assert stats.radius == 2.5 and stats.steps == 0
    assert stats.local_distance_sq == 13.0


def test_pga_one_clipped_ascent_step_by_hand():
    model = pga_model()
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    reference = torch.tensor([0.4, -0.3, 0.2, 0.1, 0.5, -0.6, 0.05, -0.05], dtype=torch.float64)
    w = reference[:6].reshape(2, 3).clone().requires_grad_()
    b = reference[6:].clone().requires_grad_()
    nn.functional.cross_entropy(x @ w.T + b, y).backward()
    grad = torch.cat([w.grad.ravel(), b.grad.ravel()])
    assert float(grad.norm()) > 0.5  # the clip below applies
    expected = reference + 0.1 * grad * (0.5 / (float(grad.norm()) + 1e-6))  # ascent; clip_grad_norm_'s scale
    settings = PGASettings(lr=0.1, epochs=1, batch_size=2, momentum=0.0, clip_grad=0.5, stop_distance=0.0)
    stats = projected_gradient_ascent(model, x, y, reference, 100.0, settings, torch.Generator().manual_seed(0))
    assert stats.steps == 1
    torch.testing.assert_close(torch.cat([p.detach().ravel() for p in model.parameters()]), expected, rtol=1e-12, atol=1e-12)


def test_pga_on_one_example_takes_one_step_per_epoch():
    model = pga_model()
    flat = torch.cat([p.detach().ravel() for p in model.parameters()])
    settings = PGASettings(lr=0.01, epochs=3, batch_size=4, stop_distance=0.0)
    stats = projected_gradient_ascent(
        model, torch.ones(1, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.long), flat, 10.0, settings, torch.Generator()
    )
    assert stats.steps == 3


# ----- IMU's weights and loss -------------------------------------------------------------------------


def imu_weights_numpy(g: np.ndarray, damping: float, quantile: float) -> np.ndarray:
    scores = -(g * (g.mean(axis=0) / ((g**2).mean(axis=0) + damping))).sum(axis=1)
    weights = np.zeros(len(g))
    keep = scores < 0
    raw = np.sqrt(np.abs(scores[keep]))
    weights[keep] = np.minimum(raw, np.quantile(raw, quantile))
    return weights


def test_imu_weights_use_the_damping_given_and_leave_zero_influence_out_of_the_quantile():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((9, 4))
    g[3] = 0.0  # influence exactly 0: not kept, and not counted in the quantile
    expected = imu_weights_numpy(g, damping=0.5, quantile=0.6)
    got = imu_weights(torch.from_numpy(g), damping=0.5, clip_quantile=0.6)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=0)


def test_weighted_ascent_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    ce = [float(np.log1p(np.exp(-2.0))), float(np.log1p(np.exp(1.0)))]
    weights = torch.tensor([0.2, 0.4], dtype=torch.float64)  # sum 0.6 < 1
    loss = weighted_ascent_loss(logits, y, weights)
    assert loss.dtype == logits.dtype
    assert float(loss) == pytest.approx(-(0.2 * ce[0] + 0.4 * ce[1]) / 0.6, rel=1e-6)
    zero = weighted_ascent_loss(logits, y, torch.zeros(2, dtype=torch.float64))
    assert float(zero) == 0.0  # no weight: no ascent, and no division by the zero total


PGA_VALID = {"lr": 1e-6, "epochs": 1, "batch_size": 1, "random_models": 1}


def test_pga_settings_accept_the_edges_of_their_ranges():
    PGASettings(**PGA_VALID)


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("epochs", 0), ("batch_size", 0), ("random_models", 0)])
def test_pga_settings_refuse_each_bad_value_alone(field, value):
    with pytest.raises(
        ValueError, match=rf"invalid PGASettings .*{field}={value!r}.*lr > 0, epochs >= 1, batch_size >= 1, random_models >= 1"
    ):
        PGASettings(**{**PGA_VALID, field: value})


def test_update_history_defaults_store_every_other_round_in_float32():
    history = UpdateHistory()
    for r in (1, 2, 3):
        history.record(r, 0, {"w": torch.ones(2, dtype=torch.float64)}, {"w": torch.zeros(2, dtype=torch.float64)}, 5)
    assert history.rounds == [1, 3]
    assert history.update(1, 0)["w"].dtype == torch.float32


def test_pga_counts_every_projection_and_measures_from_the_reference():
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    reference = torch.full((8,), 50.0, dtype=torch.float64)  # far from the origin: a norm of w + w_ref would be ~280
    settings = PGASettings(lr=0.5, epochs=2, batch_size=1, momentum=0.0, clip_grad=0.0, stop_distance=0.0)
    tight = projected_gradient_ascent(pga_model(), x, y, reference, 1e-9, settings, torch.Generator().manual_seed(0))
    assert tight.steps == 6 and tight.projections == 6  # every step leaves a ball of radius 1e-9
    wide = projected_gradient_ascent(pga_model(), x, y, reference, 100.0, settings, torch.Generator().manual_seed(0))
    assert wide.steps == 6 and wide.projections == 0 and 0 < wide.max_distance < 100.0
