"""Tests for fedunlearn.lira: hand-computed formulas, then the attack end to end on real models."""

from __future__ import annotations

import math
import statistics

import pytest
import scipy.stats
import torch
from torch import nn

from fedunlearn.lira import (
    STD_FLOOR,
    attack_summary,
    fit_gaussians,
    leave_one_out_scores,
    lira_offline_scores,
    lira_scores,
    logit_confidence,
    loo_attack_summary,
    model_logit_confidence,
    split_halves,
    tpr_at_fpr,
)
from fedunlearn.metrics import loss_threshold_mia_auc, membership_auc
from fedunlearn.mia import ShadowAttack
from fedunlearn.models import build_model
from fedunlearn.training import TrainSettings, local_train

T, F = True, False

# Four shadows (rows) by three examples (columns), with which shadow trained on which example.
# Column 0: IN {1, 3}, OUT {5, 7}; column 1: IN {10, 30}, OUT {20, 40};
# column 2: IN {0, 6, 2}, OUT {0} (one OUT value: a zero std the floor must cover).
PHI = torch.tensor([[1.0, 10.0, 0.0], [3.0, 20.0, 0.0], [5.0, 30.0, 6.0], [7.0, 40.0, 2.0]])
IN_MASK = torch.tensor([[T, T, F], [T, F, T], [F, T, T], [F, F, T]])


# --------------------------------------------------------------------------- confidences


def test_logit_confidence_by_hand() -> None:
    """phi = log(p_y / (1 - p_y)), computed here from the softmax with math.exp."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [2.0, 0.0, -1.0]])
    phi = logit_confidence(logits, torch.tensor([0, 2]))
    denominator = math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)
    p0, p2 = math.exp(2.0) / denominator, math.exp(-1.0) / denominator
    assert phi.dtype == torch.float64 and phi.shape == (2,)
    assert phi[0].item() == pytest.approx(math.log(p0 / (1.0 - p0)), rel=1e-12)
    assert phi[1].item() == pytest.approx(math.log(p2 / (1.0 - p2)), rel=1e-12)


def test_logit_confidence_extreme_logits_stay_finite() -> None:
    """A confident model's 1 - p_y rounds to 0 in floating point; phi must still be z_y - z_other."""
    logits = torch.tensor([[100.0, 0.0], [100.0, 0.0]])
    phi = logit_confidence(logits, torch.tensor([0, 1]))
    assert torch.isfinite(phi).all()
    assert phi.tolist() == [100.0, -100.0]


def test_logit_confidence_rejects_bad_shapes() -> None:
    """One class, mismatched labels and out-of-range labels are errors, not silent infinities."""
    with pytest.raises(ValueError, match=">= 2 classes"):
        logit_confidence(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        logit_confidence(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie"):
        logit_confidence(torch.zeros(3, 4), torch.tensor([0, 1, 4]))


def test_model_logit_confidence_matches_its_logits_and_restores_mode() -> None:
    """The model helper is logit_confidence of the model's logits, batched, in eval mode."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    model.train()
    x, y = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 4
    with torch.no_grad():
        expected = logit_confidence(model[0](x), y)  # dropout is off in eval mode
    got = model_logit_confidence(model, x, y, batch_size=3)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert model.training


# --------------------------------------------------------------------------- Gaussian fits


def test_fit_gaussians_per_example_by_hand() -> None:
    """Per-example means and population stds (np.std, divide by the count) of IN and OUT."""
    fits = fit_gaussians(PHI, IN_MASK, global_variance=False)
    assert fits.mean_in.dtype == torch.float64
    assert fits.mean_in.tolist() == pytest.approx([2.0, 20.0, 8.0 / 3.0])
    assert fits.mean_out.tolist() == pytest.approx([6.0, 30.0, 0.0])
    # {1, 3}: sqrt(((1-2)^2 + (3-2)^2) / 2) = 1; a sample std would give sqrt(2).
    assert fits.std_in.tolist() == pytest.approx([1.0, 10.0, math.sqrt(56.0) / 3.0])
    assert fits.std_out.tolist() == pytest.approx([1.0, 10.0, 0.0])
    assert fits.n_in.tolist() == [2, 2, 3]
    assert fits.n_out.tolist() == [2, 2, 1]


def test_fit_gaussians_global_variance_by_hand() -> None:
    """fix_variance: one std over every IN value of every example, one over every OUT value."""
    fits = fit_gaussians(PHI, IN_MASK, global_variance=True)
    std_in = statistics.pstdev([1.0, 3.0, 10.0, 30.0, 0.0, 6.0, 2.0])
    std_out = statistics.pstdev([5.0, 7.0, 20.0, 40.0, 0.0])
    assert fits.std_in.tolist() == pytest.approx([std_in] * 3)
    assert fits.std_out.tolist() == pytest.approx([std_out] * 3)
    # The means stay per example.
    assert fits.mean_in.tolist() == pytest.approx([2.0, 20.0, 8.0 / 3.0])
    assert fits.mean_out.tolist() == pytest.approx([6.0, 30.0, 0.0])


def test_fit_gaussians_median_location() -> None:
    """location='median' is plot.py's np.median: the middle value, or the two middle ones averaged."""
    fits = fit_gaussians(PHI, IN_MASK, global_variance=False, location="median")
    assert fits.mean_in.tolist() == pytest.approx([2.0, 20.0, 2.0])
    assert fits.mean_out.tolist() == pytest.approx([6.0, 30.0, 0.0])
    # The std is still around the mean, as np.std is.
    assert fits.std_in.tolist() == pytest.approx([1.0, 10.0, math.sqrt(56.0) / 3.0])


def test_fit_gaussians_needs_an_in_and_an_out_shadow_per_example() -> None:
    """An example that every shadow trained on (or none did) cannot be fitted."""
    no_out = IN_MASK.clone()
    no_out[:, 1] = True
    with pytest.raises(ValueError, match=r"0 of 3 examples have no IN shadow and 1 no OUT.*more shadows"):
        fit_gaussians(PHI, no_out, global_variance=False)
    no_in = IN_MASK.clone()
    no_in[:, 0] = False
    with pytest.raises(ValueError, match=r"1 of 3 examples have no IN shadow"):
        fit_gaussians(PHI, no_in, global_variance=True)
    with pytest.raises(ValueError, match="in_mask has shape"):
        fit_gaussians(PHI, IN_MASK[:, :2], global_variance=False)


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("global_variance", [False, True])
def test_lira_scores_match_scipy(global_variance: bool) -> None:
    """The online score is norm.logpdf under IN minus norm.logpdf under OUT (stds + the floor)."""
    fits = fit_gaussians(PHI, IN_MASK, global_variance)
    target = torch.tensor([2.5, 33.0, 1.0])
    scores = lira_scores(target, fits)
    expected = [
        scipy.stats.norm.logpdf(x, fits.mean_in[i].item(), fits.std_in[i].item() + STD_FLOOR)
        - scipy.stats.norm.logpdf(x, fits.mean_out[i].item(), fits.std_out[i].item() + STD_FLOOR)
        for i, x in enumerate(target.tolist())
    ]
    assert scores.dtype == torch.float64
    assert scores.tolist() == pytest.approx(expected, rel=1e-12)


def test_lira_scores_are_higher_for_member_like_confidences() -> None:
    """A phi at the IN mean scores above one at the OUT mean: higher means member."""
    fits = fit_gaussians(PHI[:, :2], IN_MASK[:, :2], global_variance=False)
    at_in = lira_scores(fits.mean_in, fits)
    at_out = lira_scores(fits.mean_out, fits)
    assert (at_in > 0).all() and (at_out < 0).all()


def test_lira_scores_stay_finite_on_a_zero_std() -> None:
    """Column 2 has one OUT value (std 0): the floor keeps the ratio finite, on and off that value."""
    fits = fit_gaussians(PHI, IN_MASK, global_variance=False)
    assert fits.std_out[2].item() == 0.0
    for value in (0.0, 1.0):
        scores = lira_scores(torch.tensor([2.0, 20.0, value]), fits)
        assert torch.isfinite(scores).all(), scores


def test_lira_offline_scores_are_minus_log_sf() -> None:
    """Offline: -log Pr[Z > phi] for Z ~ N(mean_out, std_out), increasing in phi."""
    fits = fit_gaussians(PHI[:, :2], IN_MASK[:, :2], global_variance=False)
    target = torch.tensor([9.0, 10.0])
    expected = [-scipy.stats.norm.logsf(x, fits.mean_out[i].item(), fits.std_out[i].item()) for i, x in enumerate(target.tolist())]
    assert lira_offline_scores(target, fits).tolist() == pytest.approx(expected, rel=1e-9)
    assert (lira_offline_scores(target + 1.0, fits) > lira_offline_scores(target, fits)).all()


# --------------------------------------------------------------------------- ROC summaries


def test_tpr_at_fpr_by_hand() -> None:
    """Thresholds: >= 0.8 gives TPR 2/3 at FPR 0; >= 0.3 gives TPR 1 at FPR 1/4."""
    members = torch.tensor([0.9, 0.8, 0.3])
    non_members = torch.tensor([0.7, 0.2, 0.1, 0.05])
    assert tpr_at_fpr(members, non_members, 0.0) == pytest.approx(2.0 / 3.0)
    assert tpr_at_fpr(members, non_members, 0.2) == pytest.approx(2.0 / 3.0)
    assert tpr_at_fpr(members, non_members, 0.25) == pytest.approx(1.0)  # the bound is inclusive
    assert tpr_at_fpr(members, non_members, 1.0) == pytest.approx(1.0)


def test_tpr_at_fpr_keeps_roc_points_between_ties() -> None:
    """Ties at 0.5 and 0.4 make collinear ROC points; the one at (1/4, 2/3) is the answer."""
    members = torch.tensor([0.9, 0.5, 0.4])
    non_members = torch.tensor([0.5, 0.4, 0.1, 0.0])
    assert tpr_at_fpr(members, non_members, 0.25) == pytest.approx(2.0 / 3.0)


def test_tpr_at_fpr_empty_side_and_bad_fpr() -> None:
    """An empty side has no ROC curve (nan); an FPR outside [0, 1] is an error."""
    assert math.isnan(tpr_at_fpr(torch.tensor([]), torch.tensor([0.1]), 0.01))
    assert math.isnan(tpr_at_fpr(torch.tensor([0.1]), torch.tensor([]), 0.01))
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(torch.tensor([0.1]), torch.tensor([0.2]), 1.5)


def test_attack_summary_by_hand() -> None:
    """1000 non-members 0..999; members 1000.5, 995.5, 980.5, -1."""
    non_members = torch.arange(1000, dtype=torch.float64)
    members = torch.tensor([1000.5, 995.5, 980.5, -1.0])
    summary = attack_summary(members, non_members)
    assert set(summary) == {"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "members", "non_members"}
    # Member-above-non-member pairs: 1000 + 996 + 981 + 0 out of 4 * 1000.
    assert summary["auc"] == pytest.approx(2977 / 4000)
    # <= 10 false positives (threshold 990): 1000.5 and 995.5; <= 1 (threshold 999): 1000.5.
    assert summary["tpr_at_1pct_fpr"] == pytest.approx(0.5)
    assert summary["tpr_at_0_1pct_fpr"] == pytest.approx(0.25)
    assert (summary["members"], summary["non_members"]) == (4, 1000)


# --------------------------------------------------------------------------- shadow splits


@pytest.mark.parametrize("num_shadows", [2, 8, 5])
def test_split_halves_balances_every_example(num_shadows: int) -> None:
    """Every column has exactly K // 2 IN shadows; the rows differ; a seed reproduces the draw."""
    mask = split_halves(num_shadows, 50, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (num_shadows, 50)
    assert (mask.sum(dim=0) == num_shadows // 2).all()
    assert len({tuple(row.tolist()) for row in mask}) == num_shadows
    assert torch.equal(mask, split_halves(num_shadows, 50, torch.Generator().manual_seed(0)))
    assert not torch.equal(mask, split_halves(num_shadows, 50, torch.Generator().manual_seed(1)))


def test_split_halves_needs_two_shadows() -> None:
    """One shadow cannot be both IN and OUT for an example."""
    with pytest.raises(ValueError, match="num_shadows >= 2"):
        split_halves(1, 10)


def test_leave_one_out_scores_fit_on_the_other_shadows() -> None:
    """Row k is shadow k scored against the Gaussians of the other K - 1 shadows only."""
    generator = torch.Generator().manual_seed(0)
    mask = split_halves(6, 20, generator)
    phi = 2.0 * mask + torch.randn(6, 20, generator=generator, dtype=torch.float64)
    for global_variance in (False, True):
        scores = leave_one_out_scores(phi, mask, global_variance)
        for k in range(6):
            rest = [j for j in range(6) if j != k]
            expected = lira_scores(phi[k], fit_gaussians(phi[rest], mask[rest], global_variance))
            assert torch.allclose(scores[k], expected, rtol=1e-12, atol=0.0)
        summary = loo_attack_summary(phi, mask, global_variance)
        assert summary == attack_summary(scores[mask], scores[~mask])
        assert (summary["members"], summary["non_members"]) == (60, 60)


def test_leave_one_out_needs_two_in_and_two_out_shadows() -> None:
    """With K = 2 leaving one shadow out leaves an example without its IN or OUT side."""
    mask = split_halves(2, 5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"IN in >= 2 and OUT in >= 2.*more shadows"):
        leave_one_out_scores(torch.zeros(2, 5), mask, True)


# --------------------------------------------------------------------------- end to end

NUM_SHADOWS = 16
PER_SIDE = 200  # members and non-members: enough that chance AUC lies well inside 0.5 +- 0.1
# Adam at 1e-2 for 60 epochs fits 200 random labels to a training loss of ~0.03.
MEMORISE = TrainSettings(epochs=60, lr=0.01, batch_size=32, optimizer="adam")


def _train(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """An MLP on 8x8 digits trained to memorise (x, y)."""
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 8, 8), 10)
    local_train(model, x, y, MEMORISE, torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="module")
def attack_world() -> dict[str, object]:
    """Digits with random labels: shadows on split halves of a pool, a target on a known half,
    and a model trained on other data that saw neither its members nor its non-members."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    generator = torch.Generator().manual_seed(0)
    # Random labels: nothing generalises, so a model's confidence on a pool example depends
    # only on whether it trained on that example.
    y = torch.randint(0, 10, (len(x),), generator=generator)
    order = torch.randperm(len(x), generator=generator)
    pool, other = order[: 2 * PER_SIDE], order[2 * PER_SIDE : 3 * PER_SIDE]
    x_pool, y_pool = x[pool], y[pool]

    in_mask = split_halves(NUM_SHADOWS, len(pool), generator)
    shadows = [_train(x_pool[in_mask[k]], y_pool[in_mask[k]], 100 + k) for k in range(NUM_SHADOWS)]
    phi = torch.stack([model_logit_confidence(shadow, x_pool, y_pool) for shadow in shadows])
    # The shadow-model attack (ART's classifier) learns from the same shadows' outputs on their IN and OUT halves.
    shadow_attack = ShadowAttack(build_model("mlp", (1, 8, 8), 10), (1, 8, 8), 10, seed=0)
    for k, shadow in enumerate(shadows[:4]):
        shadow_attack.add_shadow(shadow, (x_pool[in_mask[k]], y_pool[in_mask[k]]), (x_pool[~in_mask[k]], y_pool[~in_mask[k]]))
    shadow_attack.fit()
    members = torch.zeros(len(pool), dtype=torch.bool)
    members[torch.randperm(len(pool), generator=generator)[:PER_SIDE]] = True
    targets = {
        "memorised": _train(x_pool[members], y_pool[members], 1),
        "unseen": _train(x[other], y[other], 2),
    }
    return {
        "x": x_pool,
        "y": y_pool,
        "phi": phi,
        "in_mask": in_mask,
        "members": members,
        "targets": targets,
        "shadow_attack": shadow_attack,
    }


@pytest.mark.parametrize("attack", ["lira", "loss", "shadow"])
@pytest.mark.parametrize(("target", "low", "high"), [("memorised", 0.9, 1.0), ("unseen", 0.4, 0.6)])
def test_attack_separates_members_only_when_the_target_trained_on_them(
    attack_world: dict, attack: str, target: str, low: float, high: float
) -> None:
    """AUC >= 0.9 on the memorising target's members vs non-members; ~0.5 for the unseen model."""
    x, y, members = attack_world["x"], attack_world["y"], attack_world["members"]
    model = attack_world["targets"][target]
    if attack == "lira":
        # Global variance: 16 shadows give 8 values per side, too few for a std per example.
        fits = fit_gaussians(attack_world["phi"], attack_world["in_mask"], global_variance=True)
        scores = lira_scores(model_logit_confidence(model, x, y), fits)
        auc = membership_auc(scores[members], scores[~members])
    elif attack == "shadow":
        attack_model = attack_world["shadow_attack"]
        auc = membership_auc(
            torch.from_numpy(attack_model.member_scores(model, x[members], y[members])),
            torch.from_numpy(attack_model.member_scores(model, x[~members], y[~members])),
        )
    else:
        auc = loss_threshold_mia_auc(model, x[members], y[members], x[~members], y[~members])
    assert low <= auc <= high, f"{attack} AUC on the {target} target: {auc:.3f}"


def test_leave_one_out_attack_on_the_shadows(attack_world: dict) -> None:
    """Every shadow as the target in turn (U-LiRA's protocol): its members stand out."""
    summary = loo_attack_summary(attack_world["phi"], attack_world["in_mask"], global_variance=True)
    assert summary["members"] == summary["non_members"] == NUM_SHADOWS * PER_SIDE
    assert summary["auc"] >= 0.9
    assert summary["tpr_at_1pct_fpr"] > 0.1  # far above the 0.01 of a blind guess
