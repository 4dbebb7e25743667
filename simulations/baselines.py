"""The baselines of ALGORITHMS.md section 5 as registered methods: finetune, gradient-ascent, federaser, pga, imu.

Each runs on the same trained model and request as `iau`; every message goes through the
metered grid, so its communication is charged to it; `details["storage"]` holds the bytes the
server and the clients must keep for it.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

from flwr.app import ArrayRecord

from fedunlearn.baselines import LastModelStore
from strategies import app_config
from strategies.federaser import FedEraser
from strategies.iau_fed import IAUFed
from strategies.imu import IMUHeadUnlearning
from strategies.pga import PGAMemory, PGAUnlearning, reference_source
from strategies.update_recorder import TrainingRecorder

from .methods import MethodContext, MethodOutcome, arrays_nbytes, register, storage


def _remaining_fedavg_rounds(ctx: MethodContext, rounds: int, label: str,
                             recorder: TrainingRecorder | None = None) -> tuple[ArrayRecord, int]:
    """FedAvg for `rounds` rounds among the remaining clients from ctx.arrays (round numbers continue after the request).

    `recorder`, if given, sees every round's client models (PGA keeps the last local models for the next request).
    """
    if rounds == 0:
        return ctx.arrays, 0
    strategy = ctx.fedavg(ledger=(*ctx.strategy.ledger, ctx.request), round_offset=ctx.request_round, label=label)
    strategy.update_recorder = recorder
    return strategy.start(grid=ctx.grid, initial_arrays=ctx.arrays, num_rounds=rounds, timeout=ctx.cfg.round_timeout).arrays, rounds


# PGA's memory between the requests of a stream, one per method branch (the branch lives as long as the experiment).
_PGA_MEMORY: "weakref.WeakKeyDictionary[IAUFed, PGAMemory]" = weakref.WeakKeyDictionary()


def pga_memory(branch: IAUFed) -> PGAMemory:
    """The PGAMemory of one method branch (created empty on its first request)."""
    memory = _PGA_MEMORY.get(branch)
    if memory is None:
        memory = _PGA_MEMORY[branch] = PGAMemory()
    return memory


@register("finetune", "continue FedAvg for --finetune-rounds rounds on the remaining clients")
def finetune(ctx: MethodContext) -> MethodOutcome:
    """k FedAvg rounds without the forgotten data, from the trained model (k = 0 returns it unchanged)."""
    arrays, rounds = _remaining_fedavg_rounds(ctx, ctx.cfg.finetune_rounds, "finetune")
    return MethodOutcome(arrays, details={"unlearning": {"rounds": rounds}, "storage": storage()})


@register("gradient-ascent", "IAU's ascent step on the forget set without the correction (ablation): only the withdrawing client is asked")
def gradient_ascent(ctx: MethodContext) -> MethodOutcome:
    """theta + eta * g_f through IAUFed.unlearn with correction=False (same eta, steps and step rule as iau)."""
    strategy = ctx.strategy
    strategy.iau = app_config.iau_settings_for(ctx.cfg, correction=False)
    arrays, report = strategy.unlearn(ctx.grid, ctx.arrays, ctx.request, ctx.forget_count, protocol="fresh", method="gradient-ascent")
    # Needs nothing stored: client u can compute G_S in one pass over S (it answers from its cache when that is current).
    return MethodOutcome(arrays, details={"unlearning": report.to_dict(), "storage": storage()})


@register("federaser", "FedEraser: replay the updates stored every --federaser-interval rounds, calibrated by the remaining clients")
def federaser(ctx: MethodContext) -> MethodOutcome:
    """Rebuild the model from the initial weights with the stored updates, calibrated and rescaled per layer."""
    if ctx.update_history is None:
        raise RuntimeError("federaser needs the client updates stored during training: the runner records them when "
                           "'federaser' is among --methods before training starts")
    cfg = ctx.cfg
    strategy = FedEraser(history=ctx.update_history, calibration_ratio=cfg.federaser_calibration_ratio, round_timeout=cfg.round_timeout,
                         directory=ctx.strategy.directory, train=app_config.train_settings_for(cfg), seed=cfg.seed,
                         fraction_train=cfg.fraction_fit, ledger=(*ctx.strategy.ledger, ctx.request),
                         on_round_end=ctx.round_hook("federaser") if ctx.round_hook is not None else None)
    arrays, report = strategy.unlearn(ctx.grid, ctx.initial_arrays)
    history = ctx.update_history  # the server also keeps the initial weights it replays from
    return MethodOutcome(arrays, details={"unlearning": report, "storage": storage(
        server_bytes=history.nbytes + arrays_nbytes(ctx.initial_arrays), stored_updates=history.num_updates, interval=history.settings.interval)})


@register("pga", "PGA: the withdrawing client's projected gradient ascent around w_ref, then --pga-rounds FedAvg rounds")
def pga(ctx: MethodContext) -> MethodOutcome:
    """Client u ascends its loss inside the ball around w_ref; the remaining clients then train --pga-rounds rounds.

    w_u comes from the models the current model was aggregated from: the original training's last round on the first
    request, PGA's own last FedAvg round on the next ones of a stream (recorded here, kept per branch).
    """
    if ctx.last_models is None:
        raise RuntimeError("pga needs every client's last local model: the runner records them when 'pga' is among --methods "
                           "before training starts")
    cfg = ctx.cfg
    memory = pga_memory(ctx.strategy)
    source = reference_source(memory, ctx.last_models, ctx.arrays, ctx.request_round)
    held = source.store.nbytes if source.store is not None else memory.nbytes  # what the server kept for this request
    step = PGAUnlearning(directory=ctx.strategy.directory, settings=app_config.pga_settings_for(cfg), seed=cfg.seed,
                         ledger=ctx.strategy.ledger, round_timeout=cfg.round_timeout)
    ascended, report = step.ascend(ctx.grid, ctx.arrays, ctx.request, source.last(ctx.request.client), source.model_round,
                                   source=source.label, missing=source.missing)
    recorded = LastModelStore()  # the next request's w_u: every remaining client's model in PGA's own rounds
    arrays, rounds = _remaining_fedavg_rounds(replace(ctx, arrays=ascended), cfg.pga_rounds, "pga", TrainingRecorder(last_models=recorded))
    memory.remember(recorded if rounds > 0 else None, arrays)  # only once the request is served (a failure keeps the old)
    report["fedavg_rounds"] = rounds
    # The store read for w_ref can be dropped once w_ref is built, before the new rounds are recorded: the server
    # holds at most the larger of the two at any time.
    return MethodOutcome(arrays, details={"unlearning": report, "storage": storage(
        server_bytes=max(held, memory.nbytes), last_models_held_bytes=held, last_models_recorded_bytes=memory.nbytes)})


@register("imu", "IMU-head: the withdrawing client alone ascends its influence-weighted loss on the final layer; only the head comes back")
def imu(ctx: MethodContext) -> MethodOutcome:
    """Influence-weighted gradient ascent on the final layer by client u; the other layers stay as they are."""
    cfg = ctx.cfg
    step = IMUHeadUnlearning(directory=ctx.strategy.directory, settings=app_config.imu_settings_for(cfg), seed=cfg.seed,
                             ledger=ctx.strategy.ledger, round_timeout=cfg.round_timeout)
    arrays, report = step.unlearn(ctx.grid, ctx.arrays, ctx.request)
    return MethodOutcome(arrays, details={"unlearning": report, "storage": storage()})
