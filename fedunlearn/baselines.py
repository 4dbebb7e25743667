"""Baseline unlearning math (ALGORITHMS.md section 5): FedEraser, PGA and IMU-head. Torch in, torch out; no Flower.

Symbols follow the papers:
- FedEraser (Liu et al., arXiv 2012.13891): the server keeps the client updates u_k = w_k - theta_t of
  every Delta_t-th round; unlearning replays them, the remaining clients calibrate from the new
  model, and per layer theta_next = theta_cal + ||u_old|| * u_cal / ||u_cal||, where u_old and u_cal
  are the (example-weighted) mean updates of the remaining clients, as in the authors' code.
- PGA (Halimi et al., arXiv 2207.05521): w_ref = (N w - w_u) / (N - 1), the mean of the other clients'
  last local models; client u maximises its loss by gradient ascent projected onto the L2 ball of
  radius r around w_ref (r from the authors' rule: sqrt(mean ||w_ref - w_random||^2 / 3)), stopping early, as the
  authors' code does, once ||w - w_u||^2 exceeds a fixed threshold (2.2).
- IMU-head (Fan et al., arXiv 2508.01620): per-example gradients g_i of the final layer, diagonal
  Fisher F = mean(g_i^2) + 0.01, influence I_i = -sum_j g_ij * mean(g)_j / F_j; examples with
  I_i < 0 get weight w_i = sqrt(|I_i|) clipped at the 0.93 quantile; the head ascends
  -sum w_i CE_i / sum w_i.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .gradients import load_model_vector, model_vector

StateDict = Mapping[str, torch.Tensor]


def floating_keys(state: StateDict) -> list[str]:
    """Names of the floating-point entries of a state dict (integer buffers are not model updates)."""
    return [name for name, tensor in state.items() if torch.is_floating_point(tensor)]


def state_difference(after: StateDict, before: StateDict) -> dict[str, torch.Tensor]:
    """after - before over the floating entries, in float64."""
    return {name: after[name].to(torch.float64) - before[name].to(torch.float64) for name in floating_keys(before)}


def weighted_mean(states: list[StateDict], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_k weights_k * states_k / sum_k weights_k, entry by entry, in float64."""
    if not states or len(states) != len(weights):
        raise ValueError(f"weighted_mean needs as many weights as states (got {len(states)} states, {len(weights)} weights), at least one")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights sum to {total}: every weight must be >= 0 and at least one > 0")
    return {name: sum(w * s[name].to(torch.float64) for s, w in zip(states, weights, strict=True)) / total for name in states[0]}  # type: ignore[misc]


# ----- FedEraser ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FedEraserSettings:
    """How often updates are stored (every `interval` rounds) and the calibration's share of the local epochs."""

    interval: int = 2
    calibration_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval={self.interval}: must be >= 1 (1 stores every round)")
        if not 0.0 < self.calibration_ratio <= 1.0:
            raise ValueError(f"calibration_ratio={self.calibration_ratio}: must be in (0, 1]")

    def stores(self, server_round: int) -> bool:
        """True for the rounds whose updates are kept: 1, 1 + interval, 1 + 2 * interval, ..."""
        return (server_round - 1) % self.interval == 0

    def calibration_epochs(self, local_epochs: int) -> int:
        """ceil(r * E) local epochs, at least one (the authors' code rounds up)."""
        return max(1, math.ceil(self.calibration_ratio * local_epochs - 1e-9))


@dataclass
class StoredRound:
    """The client updates of one stored round: partition -> (update tensors, examples it trained on)."""

    updates: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    num_examples: dict[int, int] = field(default_factory=dict)


class UpdateHistory:
    """FedEraser's server-side store: every client's update u_k = w_k - theta_t in every `interval`-th round.

    Updates are kept at `dtype` (float32 by default); `nbytes` is the memory they occupy.
    """

    def __init__(self, interval: int = 2, dtype: torch.dtype = torch.float32) -> None:
        self.settings = FedEraserSettings(interval=interval)
        self.dtype = dtype
        self._rounds: dict[int, StoredRound] = {}

    def wants(self, server_round: int) -> bool:
        """Whether round `server_round` is one FedEraser stores."""
        return self.settings.stores(server_round)

    def record(self, server_round: int, partition: int, client_state: StateDict, global_before: StateDict, num_examples: int) -> None:
        """Keep u_k = client_state - global_before of `partition` in round `server_round` (ignored for other rounds)."""
        if not self.wants(server_round):
            return
        update = {name: value.to(self.dtype) for name, value in state_difference(client_state, global_before).items()}
        stored = self._rounds.setdefault(server_round, StoredRound())
        stored.updates[partition] = update
        stored.num_examples[partition] = int(num_examples)

    @property
    def rounds(self) -> list[int]:
        """Stored round numbers, ascending."""
        return sorted(self._rounds)

    def partitions(self, server_round: int) -> list[int]:
        """Partitions whose update of `server_round` is stored."""
        return sorted(self._rounds[server_round].updates) if server_round in self._rounds else []

    def update(self, server_round: int, partition: int) -> dict[str, torch.Tensor]:
        """The stored update of one client in one round."""
        return self._rounds[server_round].updates[partition]

    def mean_update(self, server_round: int, partitions: Iterable[int]) -> dict[str, torch.Tensor] | None:
        """u_old: the example-weighted mean stored update of `partitions` in `server_round` (None if none stored)."""
        stored = self._rounds.get(server_round)
        chosen = [p for p in partitions if stored is not None and p in stored.updates]
        if stored is None or not chosen:
            return None
        return weighted_mean([stored.updates[p] for p in chosen], [float(stored.num_examples[p]) for p in chosen])

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored update tensors."""
        return sum(
            t.numel() * t.element_size() for stored in self._rounds.values() for update in stored.updates.values() for t in update.values()
        )

    @property
    def num_updates(self) -> int:
        """How many client updates are stored (over all rounds)."""
        return sum(len(stored.updates) for stored in self._rounds.values())


def rescale_update(old_update: StateDict, calibration_update: StateDict) -> dict[str, torch.Tensor]:
    """Per layer ||u_old|| * u_cal / ||u_cal||: the old step length in the calibrated direction (0 where u_cal is 0)."""
    out: dict[str, torch.Tensor] = {}
    for name, cal in calibration_update.items():
        cal64 = cal.to(torch.float64)
        cal_norm = cal64.norm()
        if name not in old_update:
            raise KeyError(f"layer {name!r} has a calibration update but no stored update: the model layouts differ")
        out[name] = torch.zeros_like(cal64) if cal_norm == 0 else old_update[name].to(torch.float64).norm() * cal64 / cal_norm
    return out


def federaser_step(theta: StateDict, old_update: StateDict, calibration_update: StateDict) -> dict[str, torch.Tensor]:
    """theta_next = theta_cal + ||u_old|| * u_cal / ||u_cal|| per layer; dtypes and non-float entries kept."""
    step = rescale_update(old_update, calibration_update)
    return {
        name: (value.to(torch.float64) + step[name]).to(value.dtype) if name in step else value.clone() for name, value in theta.items()
    }


def apply_update(theta: StateDict, update: StateDict) -> dict[str, torch.Tensor]:
    """theta + update over the floating entries (the uncalibrated first replayed round)."""
    return {
        name: (value.to(torch.float64) + update[name].to(torch.float64)).to(value.dtype) if name in update else value.clone()
        for name, value in theta.items()
    }


# ----- PGA (projected gradient ascent) ----------------------------------------------------------


@dataclass(frozen=True)
class PGASettings:
    """Client u's projected gradient ascent (defaults from the authors' code: SGD 0.01, momentum 0.9, 5 epochs, clip 5)."""

    lr: float = 0.01
    epochs: int = 5
    batch_size: int = 32
    momentum: float = 0.9
    clip_grad: float = 5.0
    radius: float = 0.0  # <= 0: the authors' rule, sqrt(radius_fraction * mean ||w_ref - w_random||^2)
    radius_fraction: float = 1 / 3
    random_models: int = 10
    # The authors' early stop (IBM federated_unlearning.ipynb, `distance_threshold = 2.2`): the ascent ends after the first
    # step at which the SQUARED L2 distance ||w - w_u||^2 of the (projected) model to client u's last local model w_u
    # exceeds it (their Utils.get_distance is the squared norm). A fixed number tuned for their MNIST FLNet; <= 0 disables.
    stop_distance: float = 2.2

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.epochs < 1 or self.batch_size < 1 or self.random_models < 1:
            raise ValueError(f"invalid PGASettings {self}: lr > 0, epochs >= 1, batch_size >= 1, random_models >= 1")


def pga_reference(global_vector: torch.Tensor, client_vector: torch.Tensor, client_share: float) -> torch.Tensor:
    """w_ref = (w - a * w_u) / (1 - a), a = client u's FedAvg weight; a = 1/N gives (N w - w_u) / (N - 1)."""
    if not 0.0 <= client_share < 1.0:
        raise ValueError(f"client_share={client_share}: must be in [0, 1) (1 would leave no other client to average)")
    return (global_vector.to(torch.float64) - client_share * client_vector.to(torch.float64)) / (1.0 - client_share)


def ball_radius_from_random(reference: torch.Tensor, random_vectors: list[torch.Tensor], fraction: float = 1 / 3) -> float:
    """The authors' radius: sqrt(fraction * mean squared L2 distance from w_ref to freshly initialised models)."""
    if not random_vectors:
        raise ValueError("ball_radius_from_random needs at least one random model")
    squared = [float((reference.to(torch.float64) - v.to(torch.float64)).pow(2).sum()) for v in random_vectors]
    return math.sqrt(fraction * sum(squared) / len(squared))


def project_to_ball(vector: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    """The closest point to `vector` in the L2 ball of `radius` around `center`."""
    offset = vector.to(torch.float64) - center.to(torch.float64)
    norm = float(offset.norm())
    if norm <= radius:
        return vector.clone()
    return (center.to(torch.float64) + offset * (radius / norm)).to(vector.dtype)


@dataclass
class PGAStats:
    """What a projected gradient ascent did: steps, projections, the largest distance to w_ref after any step.

    `stopped_early`: the authors' early stop ended it (after `steps` steps); `local_distance_sq`: ||w - w_u||^2 at the
    end (nan without w_u, when the early stop cannot apply).
    """

    steps: int = 0
    projections: int = 0
    max_distance: float = 0.0
    final_distance: float = 0.0
    radius: float = 0.0
    final_loss: float = float("nan")
    stopped_early: bool = False
    local_distance_sq: float = float("nan")


def projected_gradient_ascent(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    reference: torch.Tensor,
    radius: float,
    settings: PGASettings,
    generator: torch.Generator,
    local: torch.Tensor | None = None,
) -> PGAStats:
    """Start `model` at w_ref, maximise its CE on (x, y) with SGD, projecting onto the ball after every step (in place).

    With `local` (client u's last local model w_u, flat like `reference`) and `settings.stop_distance > 0`, the
    authors' early stop: the ascent ends after the first step whose projected model has ||w - w_u||^2 > stop_distance.
    """
    if radius <= 0:
        raise ValueError(f"radius={radius}: must be > 0")
    device = next(model.parameters()).device
    reference = reference.to(torch.float64)
    anchor = local.to(torch.float64) if local is not None and settings.stop_distance > 0 else None
    load_model_vector(model, reference)
    stats = PGAStats(radius=radius)
    if anchor is not None:
        stats.local_distance_sq = float((model_vector(model).to(torch.float64) - anchor).pow(2).sum())
    if len(x) == 0:
        return stats
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            (-loss).backward()  # ascent
            if settings.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.clip_grad)
            optimizer.step()
            stats.steps += 1
            stats.final_loss = float(loss.detach())
            current = model_vector(model).to(torch.float64)
            if float((current - reference).norm()) > radius:
                load_model_vector(model, project_to_ball(current, reference, radius))
                stats.projections += 1
            current = model_vector(model).to(torch.float64)
            distance = float((current - reference).norm())
            stats.max_distance = max(stats.max_distance, distance)
            stats.final_distance = distance
            if anchor is not None:
                stats.local_distance_sq = float((current - anchor).pow(2).sum())
                if stats.local_distance_sq > settings.stop_distance:  # the authors' `if distance_ref_party_0 > distance_threshold`
                    stats.stopped_early = True
                    return stats
    return stats


# ----- IMU-head ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IMUSettings:
    """Influence-weighted gradient ascent on the final layer (damping 0.01 and quantile 0.93 from the paper)."""

    lr: float = 0.0012
    epochs: int = 5
    batch_size: int = 32
    damping: float = 0.01
    clip_quantile: float = 0.93

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.epochs < 1 or self.batch_size < 1 or not self.damping > 0 or not 0 < self.clip_quantile <= 1:
            raise ValueError(f"invalid IMUSettings {self}: lr > 0, epochs >= 1, batch_size >= 1, damping > 0, clip_quantile in (0, 1]")


def head_module(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the final layer: the last module that owns parameters directly."""
    found: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            found = (name, module)
    if found is None:
        raise ValueError("the model has no parameters: there is no final layer to unlearn")
    return found


def head_parameter_names(model: nn.Module) -> list[str]:
    """State-dict names of the final layer's parameters (what IMU sends back)."""
    prefix, module = head_module(model)
    return [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters(recurse=False)]


def head_inputs(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The inputs of the final layer for `x` (the frozen body's features), eval mode, no gradients."""
    _, head = head_module(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start : start + batch_size].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured) if captured else torch.empty(0)


def per_example_head_gradients(head: nn.Module, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g_i: the gradient of CE(head(features_i), y_i) w.r.t. the head's parameters, one flat row per example."""
    params = {name: p.detach() for name, p in head.named_parameters(recurse=False)}

    def loss_of(p: dict[str, torch.Tensor], feature: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(head, p, (feature.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0))(params, features, y)
    return torch.cat([grads[name].reshape(len(features), -1) for name in params], dim=1)


def influence_scores(gradients: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """I_i = -sum_j g_ij * mean(g)_j / F_j with the diagonal Fisher F = mean(g_i^2) + damping."""
    g = gradients.to(torch.float64)
    fisher = g.pow(2).mean(dim=0) + damping
    return -(g * (g.mean(dim=0) / fisher)).sum(dim=1)


def imu_weights(gradients: torch.Tensor, damping: float = 0.01, clip_quantile: float = 0.93) -> torch.Tensor:
    """w_i = sqrt(|I_i|) for I_i < 0 (0 otherwise), clipped at the `clip_quantile` quantile of the kept weights."""
    scores = influence_scores(gradients, damping)
    keep = scores < 0
    weights = torch.zeros_like(scores)
    if not bool(keep.any()):
        return weights
    raw = scores[keep].abs().sqrt()
    cap = torch.quantile(raw, clip_quantile)  # linear interpolation, as numpy's default
    weights[keep] = torch.minimum(raw, cap)
    return weights


def weighted_ascent_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-sum_i w_i CE_i / sum_i w_i (minimising it is influence-weighted gradient ascent)."""
    total = weights.sum()
    if float(total) <= 0:
        return logits.sum() * 0.0
    return -(weights.to(logits.dtype) * F.cross_entropy(logits, y, reduction="none")).sum() / total.to(logits.dtype)


@dataclass
class IMUStats:
    """What the head ascent did: examples with negative influence kept, steps taken, forget loss before and after."""

    kept: int = 0
    steps: int = 0
    loss_before: float = float("nan")
    loss_after: float = float("nan")


def imu_head_ascent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: IMUSettings, generator: torch.Generator) -> IMUStats:
    """IMU-head on the forget set (x, y): influence weights at the current model, then SGD ascent on the final layer only (in place)."""
    stats = IMUStats()
    if len(x) == 0:
        return stats
    _, head = head_module(model)
    device = next(model.parameters()).device
    features = head_inputs(model, x)
    labels = y.to(device)
    weights = imu_weights(per_example_head_gradients(head, features, labels), settings.damping, settings.clip_quantile).to(device)
    stats.kept = int((weights > 0).sum())
    with torch.no_grad():
        stats.loss_before = float(F.cross_entropy(head(features), labels))
    if stats.kept == 0:
        stats.loss_after = stats.loss_before
        return stats
    params = [p for p in head.parameters(recurse=False)]
    optimizer = torch.optim.SGD(params, lr=settings.lr)
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            if float(weights[idx].sum()) <= 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            weighted_ascent_loss(head(features[idx]), labels[idx], weights[idx]).backward()
            optimizer.step()
            stats.steps += 1
    with torch.no_grad():
        stats.loss_after = float(F.cross_entropy(head(features), labels))
    return stats


# ----- storage ------------------------------------------------------------------------------------


@dataclass
class LastLocalModel:
    """A client's latest local model, the round it came from, and its FedAvg weight in that round."""

    server_round: int
    state: dict[str, torch.Tensor]
    share: float


class LastModelStore:
    """Server-side store of every client's latest local model (PGA's w_u); `nbytes` is what it holds."""

    def __init__(self) -> None:
        self._models: dict[int, LastLocalModel] = {}

    def record(self, server_round: int, partition: int, client_state: StateDict, share: float) -> None:
        """Replace `partition`'s stored model with the one it sent in `server_round` (FedAvg weight `share`)."""
        self._models[partition] = LastLocalModel(server_round, {n: t.detach().clone() for n, t in client_state.items()}, float(share))

    def get(self, partition: int) -> LastLocalModel | None:
        """The latest model of `partition`, or None if it never trained."""
        return self._models.get(partition)

    @property
    def latest_round(self) -> int | None:
        """The last round any stored model comes from (the round whose aggregate is the newest model), None if empty."""
        return max((m.server_round for m in self._models.values()), default=None)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for m in self._models.values() for t in m.state.values())
