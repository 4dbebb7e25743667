"""PGA (Halimi et al., arXiv 2207.05521): w_ref from the stored last local model, client u's projected gradient ascent.

Server step: build w_ref = (w - a w_u) / (1 - a) from client u's last local model, send it to u (one round, through
the reply pipeline), then --pga-rounds FedAvg rounds among the remaining clients. Client step (`query.pga`):
`fedunlearn.baselines.projected_gradient_ascent` inside the ball around w_ref. Recorder: every client's last local
model during training. Where w_u comes from: on the first request the models recorded during the original training;
on every later request of a stream the ones recorded during PGA's own FedAvg rounds of the previous request (its
model is their aggregate), kept per method branch in a `PGAMemory`.
"""

from __future__ import annotations

import json
import math
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedunlearn.baselines import (
    LastLocalModel,
    LastModelStore,
    PGASettings,
    ball_radius_from_random,
    pga_reference,
    projected_gradient_ascent,
)
from fedunlearn.config import ExperimentConfig
from fedunlearn.deletion import DeletionRequest, encode_ledger, forget_indices
from fedunlearn.errors import InvalidReplyError
from fedunlearn.gradients import model_vector

from .. import app_config, keys
from ..directory import ClientDirectory
from ..fedavg import model_version
from ..iau_fed import IAUFed
from ..rounds import RoundPolicy, ask_clients, require_reply
from ..runtime import ClientRuntime, incoming, own_request, real, reply, whole
from ..update_recorder import TrainingRecorder
from ..validation import metrics_of
from .base import MethodContext, MethodOutcome, WireSettings, register, storage
from .finetune import remaining_fedavg_rounds

QUERY = keys.QUERY_PGA.removeprefix("query.")


@dataclass(frozen=True)
class PGAWireSettings(PGASettings, WireSettings):
    """PGA's ascent settings as they travel to client u."""

    WIRE = {
        "lr": keys.LR,
        "epochs": keys.EPOCHS,
        "batch_size": keys.BATCH_SIZE,
        "momentum": keys.MOMENTUM,
        "clip_grad": keys.CLIP_GRAD,
        "radius": keys.PGA_RADIUS,
        "radius_fraction": keys.PGA_RADIUS_FRACTION,
        "random_models": keys.PGA_RANDOM_MODELS,
        "stop_distance": keys.PGA_STOP_DISTANCE,
    }

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> PGAWireSettings:
        """From the experiment (momentum, clipping and the radius rule as in the authors' code)."""
        return cls(
            lr=cfg.pga_lr, epochs=cfg.pga_epochs, batch_size=cfg.batch_size, radius=cfg.pga_radius, stop_distance=cfg.pga_stop_distance
        )


# ----- client side ------------------------------------------------------------------------------------------------
def pga_step(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """query.pga: this client, the one withdrawing, ascends its loss on S inside a ball around w_ref (sent)."""
    served = incoming(msg, context)
    pid, config = served.partition, served.config
    request = own_request(config, pid)
    settings = PGAWireSettings.from_record(config)
    local = None  # w_u, sent when the server holds it from the round that produced w: the early stop's anchor
    if keys.PGA_LOCAL_MODEL in msg.content.array_records:
        runtime.load(msg.content.array_records[keys.PGA_LOCAL_MODEL])
        local = model_vector(runtime.model).to(torch.float64)
    runtime.load(msg.content.array_records[keys.ARRAYS])
    reference = model_vector(runtime.model).to(torch.float64)
    radius = settings.radius
    if radius <= 0:  # the authors' rule, over freshly initialised models drawn from a seeded generator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(whole(config[keys.SEED]))
            randoms = [model_vector(runtime.model_factory()) for _ in range(settings.random_models)]
        radius = ball_radius_from_random(reference, randoms, settings.radius_fraction)
    forget = forget_indices(runtime.data, request)
    generator = torch.Generator().manual_seed(whole(config[keys.SEED]) * 1_000_003 + pid)
    stats = projected_gradient_ascent(runtime.model, *runtime.arrays_xy(forget), reference, radius, settings, generator, local=local)
    state = OrderedDict((k, v.detach().cpu()) for k, v in runtime.model.state_dict().items())
    return reply(
        msg,
        {
            keys.NUM_EXAMPLES: len(forget),
            keys.PGA_RADIUS: radius,
            keys.PGA_DISTANCE: stats.final_distance,
            keys.PGA_MAX_DISTANCE: stats.max_distance,
            keys.PGA_PROJECTIONS: stats.projections,
            keys.STEPS: stats.steps,
            keys.PGA_STOPPED_EARLY: int(stats.stopped_early),
            keys.PGA_LOCAL_DISTANCE: stats.local_distance_sq,
            keys.LOSS_AFTER: stats.final_loss,
            keys.COMPUTE_S: served.elapsed(),
        },
        {keys.ARRAYS: ArrayRecord(state)},
    )


# ----- server side ------------------------------------------------------------------------------------------------
ORIGINAL = "original training"
OWN = "pga's own fedavg"


def reference_state(global_arrays: ArrayRecord, last: LastLocalModel | None, model_round: int) -> tuple[dict[str, torch.Tensor], bool]:
    """w_ref over the floating entries; (w, False) when client u did not train in `model_round`, the round whose
    aggregate is w (then there is nothing of u's to take out)."""
    state = dict(global_arrays.to_torch_state_dict())
    if last is None or last.server_round != model_round:
        return state, False
    out = {}
    for name, value in state.items():
        if torch.is_floating_point(value):
            out[name] = pga_reference(value.reshape(-1), last.state[name].reshape(-1), last.share).reshape(value.shape).to(value.dtype)
        else:
            out[name] = value.clone()
    return out, True


@dataclass
class PGAMemory:
    """What one PGA branch keeps between the requests of a stream.

    `store` holds the last local models of PGA's own FedAvg rounds in its latest request (None when it ran none),
    `model_round` the round their aggregate came from and `version` that aggregate's digest: the store is used only
    while PGA's current model is still that aggregate. `served`: a request has been served, so the original
    training's models no longer describe the current model.
    """

    store: LastModelStore | None = None
    model_round: int = 0
    version: str = ""
    served: bool = False

    def remember(self, store: LastModelStore | None, arrays: ArrayRecord) -> None:
        """After a request: the models recorded in the FedAvg rounds that produced `arrays` (PGA's new model)."""
        latest = store.latest_round if store is not None else None
        self.store = store if latest is not None else None
        self.model_round = latest if latest is not None else 0
        self.version = model_version(arrays) if latest is not None else ""
        self.served = True

    @property
    def nbytes(self) -> int:
        """Bytes of the local models kept for the next request."""
        return self.store.nbytes if self.store is not None else 0


@dataclass
class ReferenceSource:
    """Where w_u is taken from: a store and the round that produced the current model, or why there is none."""

    store: LastModelStore | None
    model_round: int
    label: str  # ORIGINAL or OWN
    missing: str = ""  # non-empty: no store describes the current model (w_ref = w), and why

    def last(self, client: int) -> LastLocalModel | None:
        """Client `client`'s stored model, or None."""
        return self.store.get(client) if self.store is not None else None


def reference_source(memory: PGAMemory, original: LastModelStore | None, arrays: ArrayRecord, request_round: int) -> ReferenceSource:
    """The store whose models were aggregated into `arrays` (PGA's current model), with that round's number."""
    if not memory.served:  # the first request: the model training ended with, in round `request_round`
        return ReferenceSource(original, request_round, ORIGINAL)
    if memory.store is None:
        return ReferenceSource(
            None,
            0,
            OWN,
            "no FedAvg round of pga produced its current model (--pga-rounds 0, or none "
            "of its rounds was aggregated): it is the previous request's ascent",
        )
    if model_version(arrays) != memory.version:
        return ReferenceSource(
            None,
            memory.model_round,
            OWN,
            f"the current model is not the aggregate of pga's own fedavg round {memory.model_round} (training went on after it)",
        )
    return ReferenceSource(memory.store, memory.model_round, OWN)


class PGAUnlearning:
    """Sends w_ref to the withdrawing client, which runs projected gradient ascent on its forget set and returns the model.

    The few FedAvg rounds among the remaining clients that follow are the caller's (any UnlearningFedAvg).
    """

    def __init__(
        self,
        *,
        directory: ClientDirectory,
        settings: PGAWireSettings,
        seed: int,
        ledger: tuple[DeletionRequest, ...] = (),
        round_timeout: float = 600.0,
        policy: RoundPolicy | None = None,
    ) -> None:
        self.policy = policy or RoundPolicy()
        self.directory = directory
        self.settings = settings
        self.seed = seed
        self.ledger = ledger
        self.round_timeout = round_timeout

    def ascend(
        self,
        grid: Grid,
        global_arrays: ArrayRecord,
        request: DeletionRequest,
        last: LastLocalModel | None,
        model_round: int,
        source: str = ORIGINAL,
        missing: str = "",
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """Client u's projected gradient ascent around w_ref; returns the model it sent back and what it reported.

        `last`: u's stored model, used when it comes from `model_round`, the round whose aggregate `global_arrays` is
        (`source` names where that round ran); `missing`: why no store describes the current model (w_ref = w).
        With w_u, the client also gets it for the authors' early stop (||w - w_u||^2 > settings.stop_distance).
        """
        reference, subtracted = reference_state(global_arrays, last, model_round)
        s = self.settings
        config = ConfigRecord({keys.SEED: self.seed, keys.LEDGER: encode_ledger(self.ledger), keys.REQUEST: json.dumps(asdict(request))})
        config.update(s.to_record())
        content = RecordDict({keys.ARRAYS: ArrayRecord(OrderedDict(reference)), keys.CONFIG: config})
        early_stop = subtracted and last is not None and s.stop_distance > 0
        if early_stop:
            assert last is not None
            content[keys.PGA_LOCAL_MODEL] = ArrayRecord(OrderedDict(last.state))
        message = Message(content, dst_node_id=self.directory.node_of[request.client], message_type=keys.QUERY_PGA)

        def parse(partition: int, answer: Message) -> Message:
            metrics_of(answer)
            if keys.ARRAYS not in answer.content.array_records:
                raise InvalidReplyError(f"PGA reply from client {partition} holds no '{keys.ARRAYS}' ArrayRecord")
            return answer

        outcome = ask_clients(
            grid, [message], directory=self.directory, phase="unlearn", parse=parse, retries=self.policy.retries, timeout=self.round_timeout
        )
        answer = require_reply(outcome, request.client, "PGA")
        metrics = answer.content.metric_records[keys.METRICS]
        if subtracted:
            where = f"{source} round {model_round}"
        elif missing:
            where = f"none, w_ref = w: {missing}"
        else:
            where = f"none, w_ref = w: client {request.client} did not train in {source} round {model_round}"
        local_distance = real(metrics[keys.PGA_LOCAL_DISTANCE]) if keys.PGA_LOCAL_DISTANCE in metrics else math.nan
        details = {
            "reference": "w_ref = (w - a w_u) / (1 - a)" if subtracted else "w (no local model of client u from the round that produced w)",
            "reference_source": where,
            "client_share": last.share if subtracted and last is not None else 0.0,
            **{
                k: real(metrics[key])
                for k, key in (
                    ("radius", keys.PGA_RADIUS),
                    ("final_distance", keys.PGA_DISTANCE),
                    ("max_distance", keys.PGA_MAX_DISTANCE),
                    ("projections", keys.PGA_PROJECTIONS),
                    ("steps", keys.STEPS),
                    ("final_forget_loss", keys.LOSS_AFTER),
                )
            },
            # The authors' early stop needs w_u of the round that produced w: off in the w_ref = w fallback.
            "early_stop_threshold": s.stop_distance if early_stop else None,
            "stopped_early": bool(whole(metrics[keys.PGA_STOPPED_EARLY])) if keys.PGA_STOPPED_EARLY in metrics else False,
            "final_local_distance_sq": local_distance if math.isfinite(local_distance) else None,
            **outcome.to_dict(),
        }
        return answer.content.array_records[keys.ARRAYS], details


# PGA's memory between the requests of a stream, one per method branch (the branch lives as long as the experiment).
_PGA_MEMORY: weakref.WeakKeyDictionary[IAUFed, PGAMemory] = weakref.WeakKeyDictionary()


def pga_memory(branch: IAUFed) -> PGAMemory:
    """The PGAMemory of one method branch (created empty on its first request)."""
    memory = _PGA_MEMORY.get(branch)
    if memory is None:
        memory = _PGA_MEMORY[branch] = PGAMemory()
    return memory


def last_model_recorder(cfg: ExperimentConfig) -> TrainingRecorder:
    """What PGA keeps from training: every client's latest local model (its storage is reported with the method)."""
    return TrainingRecorder(last_models=LastModelStore())


@register(
    "pga",
    "PGA: the withdrawing client's projected gradient ascent around w_ref, then --pga-rounds FedAvg rounds",
    handlers={QUERY: pga_step},
    recorder=last_model_recorder,
)
def pga(ctx: MethodContext) -> MethodOutcome:
    """Client u ascends its loss inside the ball around w_ref; the remaining clients then train --pga-rounds rounds.

    w_u comes from the models the current model was aggregated from: the original training's last round on the first
    request, PGA's own last FedAvg round on the next ones of a stream (recorded here, kept per branch).
    """
    if not isinstance(ctx.recorded, TrainingRecorder) or ctx.recorded.last_models is None:
        raise RuntimeError(
            "pga needs every client's last local model: the runner installs its recorder when 'pga' is among "
            "--methods before training starts"
        )
    cfg = ctx.cfg
    memory = pga_memory(ctx.strategy)
    source = reference_source(memory, ctx.recorded.last_models, ctx.arrays, ctx.request_round)
    held = source.store.nbytes if source.store is not None else memory.nbytes  # what the server kept for this request
    step = PGAUnlearning(
        directory=ctx.strategy.directory,
        settings=PGAWireSettings.of(cfg),
        seed=cfg.seed,
        ledger=ctx.strategy.ledger,
        round_timeout=cfg.round_timeout,
        policy=app_config.round_policy_for(cfg),
    )
    ascended, report = step.ascend(
        ctx.grid, ctx.arrays, ctx.request, source.last(ctx.request.client), source.model_round, source=source.label, missing=source.missing
    )
    recorded = LastModelStore()  # the next request's w_u: every remaining client's model in PGA's own rounds
    arrays, rounds = remaining_fedavg_rounds(ctx, cfg.pga_rounds, "pga", TrainingRecorder(last_models=recorded), arrays=ascended)
    memory.remember(recorded if rounds > 0 else None, arrays)  # only once the request is served (a failure keeps the old)
    report["fedavg_rounds"] = rounds
    # The store read for w_ref can be dropped once w_ref is built, before the new rounds are recorded: the server
    # holds at most the larger of the two at any time.
    return MethodOutcome(
        arrays,
        details={
            "unlearning": report,
            "storage": storage(
                server_bytes=max(held, memory.nbytes), last_models_held_bytes=held, last_models_recorded_bytes=memory.nbytes
            ),
        },
    )
