"""IAU step rules by hand, and the distributed multi-step update against an independent pooled reference."""

from __future__ import annotations

import math

import pooled
import pytest
import torch
from test_distributed_iau import Setup

from fedunlearn.deletion import DeletionRequest, forget_indices, kept_indices
from fedunlearn.iau import STEP_RULES, CorrectionStepper, IAUSettings, choose_radius, direction_from_parts
from strategies.iau_fed import arrays_to_vector

# --------------------------------------------------------------------------- the rules, by hand


def test_step_rules_are_registered_once_by_name():
    assert set(STEP_RULES) == {"sgd", "adam-first-step", "normalised"}
    with pytest.raises(ValueError, match="step_rule"):
        IAUSettings(step_rule="sign")


def test_sgd_step_by_hand():
    got = CorrectionStepper(torch.tensor([1.0, 2.0]), IAUSettings(step_rule="sgd", eta=0.5)).step(torch.tensor([2.0, -4.0]))
    assert got.tolist() == [0.0, 4.0]


def test_adam_first_step_moves_every_coordinate_by_about_eta():
    stepper = CorrectionStepper(torch.tensor([1.0, 2.0, 3.0]), IAUSettings(step_rule="adam-first-step", eta=0.01))
    got = stepper.step(torch.tensor([5.0, -0.001, 0.0]))
    # Adam's first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected: m/(sqrt(v)+eps) = g / (|g| + eps'): sign(g).
    eps = 1e-8
    expected = [1.0 - 0.01 * 5.0 / (5.0 + eps), 2.0 + 0.01 * 0.001 / (0.001 + eps), 3.0]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_normalised_step_has_the_relative_length_asked_for():
    theta = torch.tensor([3.0, 4.0])  # ||theta|| = 5
    got = CorrectionStepper(theta, IAUSettings(step_rule="normalised", radius=0.1)).step(torch.tensor([0.0, 2.0]))
    assert got.tolist() == pytest.approx([3.0, 3.5])  # moved 0.1 * 5 = 0.5 along -d/||d||


def test_per_layer_normalised_step_normalises_each_layer_and_keeps_the_total_length():
    theta = torch.tensor([1.0, 0.0, 0.0, 2.0])  # ||theta|| = sqrt(5)
    d = torch.tensor([10.0, 0.0, 0.0, -0.5])  # layer 1 = first 3 entries, layer 2 = the last
    settings = IAUSettings(step_rule="normalised", radius=0.2, per_layer=True)
    got = CorrectionStepper(theta, settings, segments=(3, 1)).step(d)
    size = 0.2 * math.sqrt(5)
    expected = [1.0 - size * math.sqrt(3 / 4), 0.0, 0.0, 2.0 + size * math.sqrt(1 / 4)]
    assert got.tolist() == pytest.approx(expected)
    assert float((got - theta).norm()) == pytest.approx(size)


def test_the_correction_weight_scales_g_r_only():
    d = direction_from_parts(torch.tensor([4.0, 0.0]), 2, torch.tensor([0.0, 3.0]), 3, weight=3.0)
    assert d.tolist() == [6.0, -1.0]  # 3 * (4, 0) / 2 - (0, 3) / 3


def test_the_client_rule_takes_the_first_radius_where_the_forget_set_looks_unseen():
    seen = []

    def losses(radius):
        seen.append(radius)
        return 10 * radius, 0.25  # forget loss grows with the step; held-out stays

    radius, trail = choose_radius(losses, grid=(0.01, 0.02, 0.03, 0.05))
    assert radius == 0.03 and seen == [0.01, 0.02, 0.03] and trail[-1] == {"radius": 0.03, "forget_loss": 0.3, "heldout_loss": 0.25}
    assert choose_radius(lambda r: (0.0, 1.0), grid=(0.01, 0.02))[0] == 0.02  # never reached: the largest


# --------------------------------------------------------------------------- distributed == pooled, written independently


def reference_steps(setup, request, theta, *, steps, radius, weight, stale_remaining):
    """K normalised steps theta <- theta - radius ||theta|| d / ||d||, d = weight g_r - g_f, by hand (tests/pooled.py).

    stale_remaining: g_r stays the one at the first theta (the cached protocol); else it is taken anew at each step.
    Returns the parameters, |S| and the bound on their float32 rounding error (each step's bound, added up).
    """
    data, cfg = setup.data, setup.cfg
    forget = forget_indices(data, request)
    withdrawn = {request.client} if request.client_level else set()
    remaining = torch.cat([kept_indices(data, p, [request]) for p in range(cfg.num_clients) if p not in withdrawn])
    x, y = data.x_train, data.y_train
    g_r0 = pooled.pooled_sums(setup.model, theta, x[remaining], y[remaining])
    bound = torch.zeros_like(theta)
    for _ in range(steps):
        g_r = g_r0 if stale_remaining else pooled.pooled_sums(setup.model, theta, x[remaining], y[remaining])
        direction = pooled.direction(g_r, pooled.pooled_sums(setup.model, theta, x[forget], y[forget]), weight)
        # An error carried in from the previous step moves this step's start: it is carried on, plus this step's own.
        bound = 2 * bound + pooled.step_error(theta, direction, "normalised", radius=radius)
        theta = pooled.step(theta, direction.d, "normalised", radius=radius)
    return theta, len(forget), bound


@pytest.mark.parametrize("cache_dtype", ["float64", "float32"])
@pytest.mark.parametrize("protocol", ["fresh", "cached"])
@pytest.mark.parametrize("kind", ["client-level", "sample-random"])
def test_multi_step_update_equals_an_independent_pooled_reference(small_cfg, tmp_path, kind, protocol, cache_dtype):
    request = DeletionRequest(client=1) if kind == "client-level" else DeletionRequest(client=2, samples="random", fraction=0.3)
    cfg = small_cfg.replace(forget_client=request.client, cache_dtype=cache_dtype)
    settings = IAUSettings(step_rule="normalised", radius=0.05, steps=3, correction_weight=2.0)
    setup = Setup(cfg, tmp_path, settings)
    theta = arrays_to_vector(setup.arrays, setup.layout)
    expected, forget_count, bound = reference_steps(
        setup, request, theta, steps=3, radius=0.05, weight=2.0, stale_remaining=protocol == "cached"
    )

    setup.strategy.fill_caches(setup.grid, setup.arrays, upload=protocol == "cached")
    new_arrays, report = setup.strategy.unlearn(setup.grid, setup.arrays, request, forget_count, protocol=protocol)
    got = arrays_to_vector(new_arrays, setup.layout)
    pooled.assert_within(got, expected, bound)
    assert report.steps == 3 and len(report.step_norms) == 3
    assert report.step_norms[0] == pytest.approx(0.05 * float(theta.norm()), rel=1e-5)
    if protocol == "fresh":
        assert report.rounds == 3  # a round per step, every client asked
    else:
        assert report.rounds == 3 and report.clients_asked == [request.client]  # three messages to client u, none to others


def test_the_stale_cached_remaining_term_differs_from_the_fresh_one(small_cfg, tmp_path):
    """The two references disagree on a multi-step update: the equality test above can tell the protocols apart."""
    setup = Setup(
        small_cfg.replace(forget_client=1), tmp_path, IAUSettings(step_rule="normalised", radius=0.05, steps=3, correction_weight=1.0)
    )
    theta = arrays_to_vector(setup.arrays, setup.layout)
    fresh, _, bound = reference_steps(setup, DeletionRequest(client=1), theta, steps=3, radius=0.05, weight=1.0, stale_remaining=False)
    stale, _, _ = reference_steps(setup, DeletionRequest(client=1), theta, steps=3, radius=0.05, weight=1.0, stale_remaining=True)
    assert float((fresh - stale).norm()) > 1e-4 and bool(((fresh - stale).abs() > bound).any())


def test_calibration_reads_only_the_withdrawing_clients_own_data(small_cfg, tmp_path, monkeypatch):
    """By construction the client's rule sees its forget set and its held-out examples: never the test split."""
    import strategies.methods.iau as client_app  # the calibrate handler (and the ClientRuntime it reads) live there

    seen: list[torch.Tensor] = []
    original = client_app.ClientRuntime.arrays_xy

    def recording(self, indices):
        seen.append(indices.clone())
        return original(self, indices)

    cfg = small_cfg.replace(forget_client=1)
    settings = IAUSettings(step_rule="normalised", radius=0.05, steps=1, calibrate="heldout-loss")
    setup = Setup(cfg, tmp_path, settings)
    setup.strategy.fill_caches(setup.grid, setup.arrays)
    request = DeletionRequest(client=1)
    forget_count = len(forget_indices(setup.data, request))
    monkeypatch.setattr(client_app.ClientRuntime, "arrays_xy", recording)
    calls = []
    real = client_app.calibrate_radius
    monkeypatch.setattr(
        client_app,
        "calibrate_radius",
        lambda runtime, arrays, direction, forget, heldout: (
            calls.append((forget.clone(), heldout.clone())) or real(runtime, arrays, direction, forget, heldout)
        ),
    )
    _, report = setup.strategy.unlearn(setup.grid, setup.arrays, request, forget_count, protocol="fresh")
    assert len(calls) == 1
    forget, heldout = calls[0]
    assert torch.equal(torch.sort(forget).values, setup.data.client_train[1])
    assert torch.equal(heldout, setup.data.client_heldout[1])
    own = torch.cat([setup.data.client_train[1], setup.data.client_heldout[1]])
    assert all(torch.isin(s, own).all() for s in seen[-2:])  # the calibration's reads are client 1's examples only
    assert report.calibration and report.radius in [t["radius"] for t in report.calibration]
    assert report.rounds == 2  # the correction round plus one message to client u
