"""Likelihood-ratio membership inference (LiRA, Carlini et al. 2022), as pure tensor math.

The attacker trains K shadow models, each on a known IN half of a candidate pool, and records
every shadow's logit-scaled confidence phi = log(p_y / (1 - p_y)) on every candidate. Per
candidate, phi is modelled as Gaussian over the shadows that trained on it (IN) and over those
that did not (OUT); a target model's phi is then scored by the log likelihood ratio of the two
Gaussians. The formulas follow the reference code, tensorflow/privacy
``research/mi_lira_2021/score.py`` (the confidence) and ``plot.py`` (the Gaussian fits and the
scores). Leave-one-out scoring, where each shadow serves in turn as the target, is how U-LiRA
(Hayes et al. 2024, arXiv 2403.01218) evaluates unlearning.

Everything is computed in float64 on CPU; inputs may be any float tensors. Scores are oriented
so that higher means "member", like ``metrics.membership_auc`` expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_curve
from torch import Tensor, nn

from .metrics import _check_xy, _logits, membership_auc

__all__ = [
    "STD_FLOOR",
    "GaussianFits",
    "logit_confidence",
    "model_logit_confidence",
    "fit_gaussians",
    "lira_scores",
    "lira_offline_scores",
    "tpr_at_fpr",
    "attack_summary",
    "split_halves",
    "leave_one_out_scores",
    "loo_attack_summary",
]

# Added to every standard deviation before scoring, as plot.py does (std + 1e-30): it only
# guards against dividing by zero when all of an example's IN (or OUT) values coincide, e.g.
# with a single shadow on that side; it is far too small to act as a regulariser.
STD_FLOOR = 1e-30

_LOCATIONS = ("mean", "median")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- confidences


def logit_confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """Return phi = log(p_y / (1 - p_y)) of each row's true label (N,) in float64 on CPU."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logit_confidence needs >= 2 classes, got {logits.shape[1]}")
    z = logits.detach().cpu().double()
    y = labels.detach().cpu().long()
    if y.numel() and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got [{y.min()}, {y.max()}]")
    # p_y / (1 - p_y) = exp(z_y) / sum_{j != y} exp(z_j): the softmax normaliser cancels, so
    # working on logits never forms 1 - p_y, which rounds to 0 for a confident model (score.py
    # forms it from float64 probabilities and adds 1e-45 inside the logs for the same reason).
    z_y = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], -math.inf)
    return z_y - torch.logsumexp(others, dim=1)


def model_logit_confidence(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> Tensor:
    """Return the model's logit-scaled confidence phi (N,) on (x, y), evaluated in eval mode."""
    _check_xy(x, y)
    return logit_confidence(_logits(model, x, batch_size), y)


# --------------------------------------------------------------------------- Gaussian fits


@dataclass(frozen=True)
class GaussianFits:
    """Per-example IN and OUT Gaussians of phi over the shadows: float64 (N,) and counts (N,)."""

    mean_in: Tensor
    std_in: Tensor
    mean_out: Tensor
    std_out: Tensor
    n_in: Tensor
    n_out: Tensor


def _check_phi_mask(phi: Tensor, in_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Return phi as float64 and in_mask as bool, both (K, N) on CPU, after checking shapes."""
    if phi.dim() != 2:
        raise ValueError(f"phi must be 2-D (shadows K, examples N), got shape {tuple(phi.shape)}")
    if in_mask.shape != phi.shape:
        raise ValueError(f"in_mask has shape {tuple(in_mask.shape)} but phi has {tuple(phi.shape)}")
    if in_mask.dtype != torch.bool:
        raise ValueError(f"in_mask must be a bool tensor, got {in_mask.dtype}")
    return phi.detach().cpu().double(), in_mask.detach().cpu()


def _masked_location(values: Tensor, mask: Tensor, location: str) -> Tensor:
    """Return the per-column mean or median (N,) of values over the rows where mask is True."""
    count = mask.sum(dim=0)
    if location == "mean":
        return torch.where(mask, values, 0.0).sum(dim=0) / count
    # Median as numpy's: the average of the two middle values for an even count. Sorting with
    # the excluded entries set to +inf moves them past the `count` included ones in each column.
    ordered = torch.where(mask, values, math.inf).sort(dim=0).values
    lo = ordered.gather(0, ((count - 1) // 2)[None]).squeeze(0)
    hi = ordered.gather(0, (count // 2)[None]).squeeze(0)
    return 0.5 * (lo + hi)


def _masked_std(values: Tensor, mask: Tensor) -> Tensor:
    """Return the per-column population std (N,) over the rows where mask is True."""
    count = mask.sum(dim=0)
    mean = torch.where(mask, values, 0.0).sum(dim=0) / count
    # Population std (divide by count, not count - 1) as np.std in plot.py; it is also defined
    # for one value (0), which the floor then covers.
    sq = torch.where(mask, (values - mean) ** 2, 0.0).sum(dim=0)
    return (sq / count).sqrt()


def fit_gaussians(phi: Tensor, in_mask: Tensor, global_variance: bool, *, location: str = "mean") -> GaussianFits:
    """Return each example's IN and OUT Gaussian of phi (K, N) over the shadows in in_mask (K, N).

    global_variance=True is plot.py's ``fix_variance``: one std over every IN value of every
    example (np.std of all of dat_in) and one over every OUT value, for when K is too small
    (Carlini et al. suggest below 64) to estimate a variance per example. location="median"
    is the centre plot.py uses (np.median); "mean" is the paper's Algorithm 1.
    """
    if location not in _LOCATIONS:
        raise ValueError(f"location={location!r}: must be one of {', '.join(_LOCATIONS)}")
    values, mask = _check_phi_mask(phi, in_mask)
    num_shadows, num_examples = values.shape
    n_in = mask.sum(dim=0)
    n_out = num_shadows - n_in
    no_in, no_out = int((n_in == 0).sum()), int((n_out == 0).sum())
    if no_in or no_out:
        raise ValueError(
            f"{no_in} of {num_examples} examples have no IN shadow and {no_out} no OUT shadow "
            f"among the {num_shadows} shadows; every example needs at least one of each "
            "(use more shadows, e.g. split_halves with num_shadows >= 2)"
        )
    out_mask = ~mask
    mean_in = _masked_location(values, mask, location)
    mean_out = _masked_location(values, out_mask, location)
    if global_variance:
        # Every value on that side pooled, around the grand mean, as np.std(dat_in) does: it
        # includes the spread of the per-example means. plot.py computes std_out from dat_in as
        # well (a slip in its fix_variance branch); the OUT values are used here, as its offline
        # variant and the paper do. plot.py also truncates every example to the smallest count
        # so that dat_in is rectangular; here every value counts once.
        std_in = values[mask].std(correction=0).expand(num_examples).clone()
        std_out = values[out_mask].std(correction=0).expand(num_examples).clone()
    else:
        std_in = _masked_std(values, mask)
        std_out = _masked_std(values, out_mask)
    return GaussianFits(mean_in, std_in, mean_out, std_out, n_in, n_out)


# --------------------------------------------------------------------------- scores


def _check_target(phi_target: Tensor, fits: GaussianFits) -> Tensor:
    """Return phi_target as float64 (N,) on CPU after checking it matches the fits."""
    if phi_target.dim() != 1 or phi_target.shape != fits.mean_in.shape:
        raise ValueError(f"phi_target must have shape {tuple(fits.mean_in.shape)}, got {tuple(phi_target.shape)}")
    return phi_target.detach().cpu().double()


def _normal_logpdf(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Return log N(x; mean, std^2) elementwise (scipy.stats.norm.logpdf)."""
    z = (x - mean) / std
    return -0.5 * z * z - std.log() - _HALF_LOG_2PI


def lira_scores(phi_target: Tensor, fits: GaussianFits) -> Tensor:
    """Return online LiRA scores (N,): log N(phi; IN) - log N(phi; OUT); higher means member."""
    x = _check_target(phi_target, fits)
    # plot.py: score = -logpdf_in + logpdf_out, then roc_curve(answers, -score).
    log_in = _normal_logpdf(x, fits.mean_in, fits.std_in + STD_FLOOR)
    log_out = _normal_logpdf(x, fits.mean_out, fits.std_out + STD_FLOOR)
    return log_in - log_out


def lira_offline_scores(phi_target: Tensor, fits: GaussianFits) -> Tensor:
    """Return offline LiRA scores (N,): -log Pr[Z > phi], Z ~ OUT Gaussian; higher means member."""
    x = _check_target(phi_target, fits)
    # One-sided, as the paper's offline test (members have higher confidence than the OUT
    # models give). plot.py's offline variant ranks by -logpdf_out instead, which also flags
    # an unusually low confidence as "member". -log sf keeps resolution far in the upper tail,
    # where the low-FPR decisions are made and log cdf would have rounded to 0.
    z = (x - fits.mean_out) / (fits.std_out + STD_FLOOR)
    return -torch.special.log_ndtr(-z)


# --------------------------------------------------------------------------- ROC summaries


def tpr_at_fpr(member_scores: Tensor, nonmember_scores: Tensor, fpr: float) -> float:
    """Return the largest TPR among ROC thresholds with FPR <= fpr (nan if either side is empty)."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}")
    m = member_scores.detach().cpu().double().reshape(-1).numpy()
    nm = nonmember_scores.detach().cpu().double().reshape(-1).numpy()
    if m.size == 0 or nm.size == 0:
        return float("nan")
    labels = np.concatenate([np.ones(m.size), np.zeros(nm.size)])
    # drop_intermediate=False: sklearn would otherwise drop collinear ROC points (tied scores
    # on both sides), and a dropped point can be the best one under the FPR bound.
    fprs, tprs, _ = roc_curve(labels, np.concatenate([m, nm]), drop_intermediate=False)
    # plot.py reads tpr[np.where(fpr < .001)[0][-1]], a strict bound; this one is inclusive.
    return float(tprs[fprs <= fpr].max())


def attack_summary(member_scores: Tensor, nonmember_scores: Tensor) -> dict[str, float]:
    """Return AUC, TPR at 1% and 0.1% FPR, and the member and non-member counts of an attack."""
    return {
        "auc": membership_auc(member_scores, nonmember_scores),
        "tpr_at_1pct_fpr": tpr_at_fpr(member_scores, nonmember_scores, 0.01),
        "tpr_at_0_1pct_fpr": tpr_at_fpr(member_scores, nonmember_scores, 0.001),
        "members": member_scores.numel(),
        "non_members": nonmember_scores.numel(),
    }


# --------------------------------------------------------------------------- shadow splits


def split_halves(num_shadows: int, num_examples: int, generator: torch.Generator | None = None) -> Tensor:
    """Return IN masks (K, N): each example IN in exactly K // 2 shadows, drawn at random."""
    if num_shadows < 2:
        raise ValueError(f"split_halves needs num_shadows >= 2 (one IN, one OUT), got {num_shadows}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    # train.py's scheme: independent draws would leave some examples IN (or OUT) everywhere
    # after few shadows, so each column is a random permutation cut at K // 2 instead
    # (order = keep.argsort(0); keep = order < int(pkeep * K)).
    draws = torch.rand((num_shadows, num_examples), generator=generator, dtype=torch.float64)
    order = draws.argsort(dim=0)
    return order < num_shadows // 2


def leave_one_out_scores(phi: Tensor, in_mask: Tensor, global_variance: bool, *, location: str = "mean") -> Tensor:
    """Return online LiRA scores (K, N) of each shadow k as target, fitted on the other K - 1."""
    values, mask = _check_phi_mask(phi, in_mask)
    n_in = mask.sum(dim=0)
    n_out = values.shape[0] - n_in
    # Leaving out the only IN (or OUT) shadow of an example would leave it nothing to fit.
    if values.shape[1] and (int(n_in.min()) < 2 or int(n_out.min()) < 2):
        raise ValueError(
            "leave-one-out needs every example IN in >= 2 and OUT in >= 2 shadows, got "
            f"min IN {int(n_in.min())} and min OUT {int(n_out.min())} of {values.shape[0]} "
            "(use more shadows, e.g. split_halves with num_shadows >= 4)"
        )
    scores = torch.empty_like(values)
    for k in range(values.shape[0]):
        rest = torch.cat([torch.arange(k), torch.arange(k + 1, values.shape[0])])
        fits = fit_gaussians(values[rest], mask[rest], global_variance, location=location)
        scores[k] = lira_scores(values[k], fits)
    return scores


def loo_attack_summary(phi: Tensor, in_mask: Tensor, global_variance: bool, *, location: str = "mean") -> dict[str, float]:
    """Return attack_summary over all (shadow, example) pairs scored leave-one-out."""
    scores = leave_one_out_scores(phi, in_mask, global_variance, location=location)
    mask = in_mask.detach().cpu()
    return attack_summary(scores[mask], scores[~mask])
