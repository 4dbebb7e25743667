"""Removal-quality metrics for federated unlearning: accuracy, backdoor ASR, distances, MIA.

All functions are pure: models are evaluated in eval mode under ``torch.no_grad()`` on the
device of their parameters, in batches, and every module's training flag is restored
afterwards. Results come back as Python floats or CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

__all__ = [
    "predict_proba",
    "per_example_loss",
    "accuracy",
    "attack_success_rate",
    "parameter_distance",
    "js_divergence",
    "output_distance",
    "membership_auc",
    "loss_threshold_mia_auc",
    "evaluate_model",
]

XY = tuple[Tensor, Tensor]
ParamLike = Mapping[str, Tensor] | Tensor


# --------------------------------------------------------------------------- helpers


def _model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter (or buffer), CPU if it has none."""
    for t in model.parameters():
        return t.device
    # Parameter-free models (e.g. a fixed lookup) may still carry buffers.
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode under no_grad, restoring every module's training flag."""
    # Record each submodule separately: model.train(flag) would flatten a mixed state
    # (e.g. a frozen, eval-mode backbone inside a training head) into a single flag.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in modes:
            m.training = flag


def _check_batch_size(batch_size: int) -> None:
    """Raise ValueError unless batch_size is a positive integer."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _check_xy(x: Tensor, y: Tensor) -> None:
    """Raise ValueError unless x and y hold the same number of examples."""
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")


def _logits(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Return the model's float32 logits (N, C) on CPU, computed batch-wise in eval mode."""
    _check_batch_size(batch_size)
    device = _model_device(model)
    n = x.shape[0]
    with _evaluating(model):
        if n == 0:
            # One forward pass on the empty batch gives the right (0, C) shape.
            return model(x.to(device)).float().cpu()
        chunks = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, n, batch_size)]
    return torch.cat(chunks, dim=0)


def _predictions(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Return the predicted class indices (N,) on CPU."""
    return _logits(model, x, batch_size).argmax(dim=1)


# --------------------------------------------------------------------------- outputs


def predict_proba(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Return the model's softmax output distribution (N, C) on CPU."""
    return torch.softmax(_logits(model, x, batch_size), dim=1)


def per_example_loss(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> Tensor:
    """Return the cross-entropy loss of each example (N,) on CPU."""
    _check_xy(x, y)
    logits = _logits(model, x, batch_size)
    return F.cross_entropy(logits, y.cpu().long(), reduction="none")


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Return the fraction of examples classified correctly (nan for empty input)."""
    _check_xy(x, y)
    if x.shape[0] == 0:
        return float("nan")
    preds = _predictions(model, x, batch_size)
    return (preds == y.cpu().long()).double().mean().item()


def attack_success_rate(model: nn.Module, x_triggered: Tensor, target: int, batch_size: int = 512) -> float:
    """Return the fraction of triggered inputs classified as the backdoor target (nan if empty)."""
    # The caller has already dropped examples whose true label is the target, so every
    # hit here is attributable to the trigger rather than to ordinary accuracy.
    if x_triggered.shape[0] == 0:
        return float("nan")
    preds = _predictions(model, x_triggered, batch_size)
    return (preds == int(target)).double().mean().item()


# --------------------------------------------------------------------------- distances


def parameter_distance(a: ParamLike, b: ParamLike) -> tuple[float, float]:
    """Return (L2 norm of a - b over floating-point entries, that norm / sqrt(#entries))."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
        # A bare tensor is the explicit quantity to compare, whatever its dtype.
        pairs = [(a, b)]
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        pairs = []
        for key in a:
            if key not in b:
                raise ValueError(f"key {key!r} is in the first state but not the second")
            ta, tb = a[key], b[key]
            if ta.shape != tb.shape:
                raise ValueError(f"shape mismatch at key {key!r}: {tuple(ta.shape)} vs {tuple(tb.shape)}")
            fa, fb = torch.is_floating_point(ta), torch.is_floating_point(tb)
            if fa != fb:
                raise ValueError(f"dtype mismatch at key {key!r}: {ta.dtype} vs {tb.dtype}")
            # Integer buffers (BatchNorm's num_batches_tracked) are bookkeeping, not weights.
            if fa:
                pairs.append((ta, tb))
        for key in b:
            if key not in a:
                raise ValueError(f"key {key!r} is in the second state but not the first")
    else:
        raise TypeError(f"parameter_distance needs two tensors or two state dicts, got {type(a).__name__} and {type(b).__name__}")

    # float64 on CPU: the sum of squares over millions of weights loses precision in float32.
    sq = 0.0
    count = 0
    for ta, tb in pairs:
        diff = ta.detach().cpu().double() - tb.detach().cpu().double()
        sq += float(diff.pow(2).sum().item())
        count += diff.numel()
    norm = math.sqrt(sq)
    normalised = norm / math.sqrt(count) if count > 0 else float("nan")
    return norm, normalised


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Return the per-row Jensen-Shannon divergence (natural log, in [0, ln 2]) of p and q."""
    if p.shape != q.shape:
        raise ValueError(f"shape mismatch: {tuple(p.shape)} vs {tuple(q.shape)}")
    out_dtype = p.dtype if torch.is_floating_point(p) else torch.float32
    # Float64 and clamping away tiny negative round-off keep the logs well-defined.
    p64 = p.detach().double().clamp_min(0.0)
    q64 = q.detach().double().clamp_min(0.0)
    m = 0.5 * (p64 + q64)
    # xlogy treats 0 * log(0 / m) as 0, and m > 0 wherever p or q is > 0.
    kl_pm = (torch.xlogy(p64, p64) - torch.xlogy(p64, m)).sum(dim=-1)
    kl_qm = (torch.xlogy(q64, q64) - torch.xlogy(q64, m)).sum(dim=-1)
    js = (0.5 * (kl_pm + kl_qm)).clamp(0.0, math.log(2.0))
    return js.to(out_dtype)


def output_distance(model_a: nn.Module, model_b: nn.Module, x: Tensor, batch_size: int = 512) -> float:
    """Return the mean JS divergence between two models' output distributions over x."""
    if x.shape[0] == 0:
        return float("nan")
    pa = predict_proba(model_a, x, batch_size)
    pb = predict_proba(model_b, x, batch_size)
    return js_divergence(pa, pb).double().mean().item()


# --------------------------------------------------------------------------- membership inference


def membership_auc(member_scores: Tensor, nonmember_scores: Tensor) -> float:
    """Return the ROC AUC that a higher score means member (nan if either side is empty)."""
    m = member_scores.detach().cpu().double().reshape(-1).numpy()
    nm = nonmember_scores.detach().cpu().double().reshape(-1).numpy()
    if m.size == 0 or nm.size == 0:
        return float("nan")
    labels = np.concatenate([np.ones(m.size), np.zeros(nm.size)])
    scores = np.concatenate([m, nm])
    return float(roc_auc_score(labels, scores))


def loss_threshold_mia_auc(
    model: nn.Module,
    x_members: Tensor,
    y_members: Tensor,
    x_nonmembers: Tensor,
    y_nonmembers: Tensor,
    batch_size: int = 512,
) -> float:
    """Return the AUC of the loss-threshold membership-inference attack (Yeom et al. 2018).

    The score is the negative per-example loss, so a lower loss means "member". 0.5 is
    chance; for unlearning the target is the retrained model's value, not 0.5.
    """
    member_scores = -per_example_loss(model, x_members, y_members, batch_size)
    nonmember_scores = -per_example_loss(model, x_nonmembers, y_nonmembers, batch_size)
    return membership_auc(member_scores, nonmember_scores)


# --------------------------------------------------------------------------- all together


def evaluate_model(
    model: nn.Module,
    *,
    test: XY,
    remained: XY,
    deleted: XY,
    triggered: Tensor | None,
    target: int,
    heldout: XY,
    reference: nn.Module | None = None,
    batch_size: int = 512,
    members: XY | None = None,
) -> dict[str, float]:
    """Return a model's removal-quality metrics, optionally against the retrained reference.

    The loss attack scores `members` (default: `deleted`) against `heldout`; pass the clean part of the
    forget set as members when it holds poisoned examples, or the attack measures the relabelling.
    """
    results: dict[str, float] = {
        "acc_test": accuracy(model, *test, batch_size=batch_size),
        "acc_remained": accuracy(model, *remained, batch_size=batch_size),
        "acc_deleted": accuracy(model, *deleted, batch_size=batch_size),
        "backdoor_asr": (float("nan") if triggered is None else attack_success_rate(model, triggered, target, batch_size=batch_size)),
        # Deleted vs never-seen held-out data: after unlearning the deleted set should look
        # like held-out data to the attacker, as it does for the retrained model.
        "mia_auc": loss_threshold_mia_auc(model, *(members if members is not None else deleted), *heldout, batch_size=batch_size),
    }
    if reference is not None:
        dist, dist_norm = parameter_distance(model.state_dict(), reference.state_dict())
        results["dist_output"] = output_distance(model, reference, test[0], batch_size)
        results["dist_output_deleted"] = output_distance(model, reference, deleted[0], batch_size)
        if triggered is not None:
            results["dist_output_triggered"] = output_distance(model, reference, triggered, batch_size)
        results["dist_para"] = dist
        results["dist_para_normalized"] = dist_norm
    return results
