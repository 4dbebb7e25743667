"""IAU-Fed, both protocols: the server steps `iau` (fresh) and `iau-cached`, and the client's gradient and step-length queries.

The correction's messaging is `strategies.iau_fed.IAUFed.unlearn`; the math is `fedunlearn.iau`. The client steps
here answer `query.gradient` (a remaining client's pre-scaled cache, the withdrawing client's contribution, or G_S
alone) and `query.calibrate` (client u's own choice of the step length).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message

from fedunlearn.cache import exclusion_digest
from fedunlearn.data import DatasetStore
from fedunlearn.deletion import excluded_indices, forget_indices, kept_indices
from fedunlearn.gradients import gradient_sum, load_model_vector, model_vector
from fedunlearn.iau import choose_radius, remaining_contribution, withdrawing_contribution
from fedunlearn.models import build_model

from .. import app_config, keys
from ..iau_fed import GradientQuery, UnlearningReport
from ..runtime import ClientRuntime, incoming, reply, request_of
from ..secagg import HANDLERS as SECAGG_HANDLERS
from .base import MethodContext, MethodOutcome, register, storage


# ----- client side ------------------------------------------------------------------------------------------------
def calibrate_radius(
    runtime: ClientRuntime, arrays: ArrayRecord, direction: ArrayRecord, forget: torch.Tensor, heldout: torch.Tensor
) -> tuple[float, list[dict[str, float]]]:
    """`choose_radius` on this client's forget set and held-out data, stepping its resident model along -d."""
    runtime.load(arrays)
    theta = model_vector(runtime.model).to(torch.float64)
    d = runtime.layout.flatten(direction.to_torch_state_dict()).to(torch.float64)
    unit = d / d.norm().clamp_min(1e-300)
    x_forget, y_forget = runtime.arrays_xy(forget)
    x_held, y_held = runtime.arrays_xy(heldout)

    def losses(radius: float) -> tuple[float, float]:
        load_model_vector(runtime.model, theta - radius * float(theta.norm()) * unit)
        runtime.model.eval()
        with torch.no_grad():
            return (float(F.cross_entropy(runtime.model(x_forget), y_forget)), float(F.cross_entropy(runtime.model(x_held), y_held)))

    try:
        return choose_radius(losses)
    finally:
        runtime.load(arrays)


def calibrate(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """query.calibrate: client u tries normalised steps along -d on ITS data only (S and its held-out examples)."""
    served = incoming(msg, context)
    pid, config = served.partition, served.config
    request = request_of(config)
    ledger = served.ledger
    before = excluded_indices(runtime.data, pid, ledger)
    forget = forget_indices(runtime.data, request)
    forget = forget[~torch.isin(forget, before)] if before.numel() else forget
    radius, trail = calibrate_radius(
        runtime, msg.content.array_records[keys.ARRAYS], msg.content.array_records[keys.DIRECTION], forget, runtime.data.client_heldout[pid]
    )
    metrics = {keys.RADIUS: radius, keys.FORGET_SIZE: len(forget), keys.COMPUTE_S: served.elapsed()}
    answer = reply(msg, metrics, version=str(config[keys.MODEL_VERSION]))
    answer.content.config_records[keys.CONFIG][keys.CALIBRATION_TRAIL] = json.dumps(trail)
    return answer


def gradient(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """query.gradient: this client's share of the direction d, by the role the server gives it."""
    served = incoming(msg, context)
    pid, config = served.partition, served.config
    runtime.load(msg.content.array_records[keys.ARRAYS])
    query = GradientQuery.from_record(config)
    version, role, wire = query.model_version, query.role, query.gradient_dtype
    ledger = served.ledger
    request = query.deletion_request
    remaining_count = query.remaining_count
    before = excluded_indices(runtime.data, pid, ledger)
    before_scope = exclusion_digest(before)
    metrics: dict[str, float | int]
    computed_at = version
    if role == keys.ROLE_REMAINING:
        kept = kept_indices(runtime.data, pid, ledger)
        cache, fresh_hit, stale = runtime.cached_gradient(pid, kept, version, before_scope, query.allow_stale)
        vector = remaining_contribution(cache.gradient_sum, remaining_count, query.correction_weight)
        metrics = {keys.NUM_EXAMPLES: cache.num_examples, keys.CACHE_HIT: int(fresh_hit), keys.CACHE_STALE: int(stale)}
        computed_at = cache.version  # a remaining client may answer from a stale cache (when allowed): its version
    else:
        forget = forget_indices(runtime.data, request)
        forget = forget[~torch.isin(forget, before)] if before.numel() else forget
        after = torch.unique(torch.cat([before, forget]))
        after_scope = exclusion_digest(after)
        stored = runtime.store.get(pid)
        hit = 0
        if request.client_level and stored is not None and stored.is_at(version, before_scope):
            forget_sum, hit = stored.gradient_sum, 1  # S is all that remains of the client: G_S is the cache itself
        else:
            forget_sum, _, _ = gradient_sum(runtime.model, *runtime.arrays_xy(forget))
        metrics = {keys.FORGET_SIZE: len(forget), keys.CACHE_HIT: hit, keys.CACHE_STALE: 0}
        if role == keys.ROLE_FORGET_ONLY:
            vector = forget_sum
            metrics[keys.NUM_EXAMPLES] = len(forget)
        else:
            kept_sum = None
            if not request.client_level:
                if stored is not None and stored.is_at(version, before_scope):
                    kept_cache = stored.without(forget_sum, len(forget), after_scope)
                    hit = 1
                else:
                    kept = kept_indices(runtime.data, pid, [*ledger, request])
                    kept_cache, kept_hit, _ = runtime.cached_gradient(pid, kept, version, after_scope, False)
                    hit = int(kept_hit)
                runtime.store.put(pid, kept_cache)  # the client keeps a cache consistent with what it still holds
                kept_sum = kept_cache.gradient_sum
                metrics[keys.CACHE_HIT] = int(hit)
            vector = withdrawing_contribution(kept_sum, forget_sum, remaining_count, len(forget), query.correction, query.correction_weight)
            metrics[keys.NUM_EXAMPLES] = len(forget)
    metrics[keys.COMPUTE_S] = served.elapsed()
    return reply(msg, metrics, {keys.GRADIENT: runtime.gradient_record(vector, wire)}, version=computed_at)


# The two registered IAU-Fed methods by protocol (apps that run IAU-Fed without the runner look them up here).
METHOD_OF = {"fresh": "iau", "cached": "iau-cached"}
PROTOCOL_OF = {name: protocol for protocol, name in METHOD_OF.items()}

# Every IAU-based method (gradient ascent too) answers through these two queries.
# The SecAgg+ stage steps wrap them when --secure-aggregation is on (strategies/secagg.py).
HANDLERS = {keys.QUERY_GRADIENT.removeprefix("query."): gradient, keys.QUERY_CALIBRATE.removeprefix("query."): calibrate, **SECAGG_HANDLERS}


# ----- server side ------------------------------------------------------------------------------------------------
def stale_drift(ctx: MethodContext, report: UnlearningReport) -> list[float]:
    """Cached protocol, K > 1: how far the cache's g_r is from the remaining data's g_r at each later step's model.

    A measurement of the simulator (the driver holds every client's data), not part of the protocol:
    ||g_r(cache) - g_r(theta_j)|| / ||g_r(theta_j)|| for every step j > 1.
    """
    total = ctx.strategy.gradient_total
    if total is None or len(report.step_arrays) < 2:
        return []
    data = DatasetStore.get(app_config.data_spec_for(ctx.cfg))
    ledger = (*ctx.strategy.ledger, ctx.request)
    withdrawn = {r.client for r in ledger if r.client_level}
    remaining = torch.cat([kept_indices(data, p, list(ledger)) for p in range(data.num_clients) if p not in withdrawn])
    cached = total / ctx.strategy.gradient_total_count
    model = build_model(app_config.model_name_for(ctx.cfg), data.input_shape, data.num_classes)
    drift = []
    for arrays in report.step_arrays[1:]:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        fresh, _, _ = gradient_sum(model, data.x_train[remaining], data.y_train[remaining])
        fresh = fresh.to(torch.float64) / len(remaining)
        drift.append(float((cached - fresh).norm() / fresh.norm().clamp_min(1e-300)))
    return drift


def run_iau(ctx: MethodContext, protocol: str, name: str, repair_rounds: int | None = None) -> MethodOutcome:
    """The IAU correction with `protocol`, then `repair_rounds` (default --iau-repair-rounds) FedAvg rounds."""
    strategy = ctx.strategy
    arrays, report = strategy.unlearn(ctx.grid, ctx.arrays, ctx.request, ctx.forget_count, protocol=protocol, method=name)
    if protocol == "cached" and report.steps > 1 and not strategy.iau.refresh_every:
        report.stale_drift = stale_drift(ctx, report)
    repair = ctx.cfg.iau_repair_rounds if repair_rounds is None else repair_rounds
    if ctx.cfg.withdraw_round is not None:
        repair = 0  # a mid-training request: FedAvg without the data continues right after anyway
    if repair > 0:  # FedAvg among the remaining clients from the corrected model: what PGA does after its ascent
        fedavg = ctx.fedavg(ledger=strategy.ledger, round_offset=ctx.request_round, label=name)
        arrays = fedavg.start(grid=ctx.grid, initial_arrays=arrays, num_rounds=repair, timeout=ctx.cfg.round_timeout).arrays
    # Every client keeps its gradient cache (any of them may withdraw); the cached protocol also keeps G_tot on the server.
    total = ctx.strategy.gradient_total if protocol == "cached" else None
    server = total.numel() * total.element_size() if total is not None else 0
    # Each client's upload, when the server keeps them for an offline withdrawing client (--withdrawing-offline).
    server += sum(vector.numel() * vector.element_size() for vector, _, _ in ctx.strategy.client_uploads.values())
    return MethodOutcome(
        arrays,
        details={
            "unlearning": {**report.to_dict(), "repair_rounds": repair},
            "storage": storage(server, sum(ctx.strategy.client_cache_bytes.values())),
        },
    )


@register(
    METHOD_OF["fresh"],
    "IAU-Fed, fresh protocol: a round per step, every remaining client sends its (cached) gradient, then --iau-repair-rounds FedAvg rounds",
    handlers=HANDLERS,
)
def iau_fresh(ctx: MethodContext) -> MethodOutcome:
    """IAU correction with the fresh protocol."""
    return run_iau(ctx, "fresh", METHOD_OF["fresh"])


@register(
    METHOD_OF["cached"],
    "IAU-Fed, cached protocol: only the withdrawing client sends G_S; the server holds G_tot",
    uploads_caches=True,
    handlers=HANDLERS,
)
def iau_cached(ctx: MethodContext) -> MethodOutcome:
    """IAU correction with the cached protocol."""
    return run_iau(ctx, "cached", METHOD_OF["cached"], repair_rounds=0)  # the cached protocol contacts client u alone
