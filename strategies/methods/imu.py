"""IMU-head (Fan et al., arXiv 2508.01620): the withdrawing client alone rewrites the final layer.

Server step: send the global model to client u (one round, through the reply pipeline); the head it sends back
replaces the global head. Client step (`query.imu`): influence-weighted gradient ascent on the final layer
(`fedunlearn.baselines.imu_head_ascent`). The simulator's clients keep no copy of the deployed model, so the model
goes down once; only the head comes back up.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedunlearn.baselines import IMUSettings, head_parameter_names, imu_head_ascent
from fedunlearn.config import ExperimentConfig
from fedunlearn.deletion import DeletionRequest, encode_ledger, forget_indices
from fedunlearn.errors import InvalidReplyError

from .. import app_config, keys
from ..directory import ClientDirectory
from ..rounds import RoundPolicy, ask_clients, require_reply
from ..runtime import ClientRuntime, incoming, own_request, real, reply, whole
from ..validation import metrics_of
from .base import MethodContext, MethodOutcome, WireSettings, register, storage

QUERY = keys.QUERY_IMU.removeprefix("query.")


@dataclass(frozen=True)
class IMUWireSettings(IMUSettings, WireSettings):
    """IMU-head's ascent settings as they travel to client u."""

    WIRE = {
        "lr": keys.LR,
        "epochs": keys.EPOCHS,
        "batch_size": keys.BATCH_SIZE,
        "damping": keys.IMU_DAMPING,
        "clip_quantile": keys.IMU_QUANTILE,
    }

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> IMUWireSettings:
        """From the experiment (Fisher damping 0.01 and weight quantile 0.93 as in the paper)."""
        return cls(lr=cfg.imu_lr, epochs=cfg.imu_epochs, batch_size=cfg.batch_size)


def imu_step(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """query.imu: this client alone ascends its influence-weighted loss on the final layer; only the head goes back."""
    served = incoming(msg, context)
    pid, config = served.partition, served.config
    request = own_request(config, pid)
    settings = IMUWireSettings.from_record(config)
    runtime.load(msg.content.array_records[keys.ARRAYS])
    forget = forget_indices(runtime.data, request)
    generator = torch.Generator().manual_seed(whole(config[keys.SEED]) * 1_000_003 + pid)
    stats = imu_head_ascent(runtime.model, *runtime.arrays_xy(forget), settings, generator)
    state = runtime.model.state_dict()
    head = ArrayRecord(OrderedDict((name, state[name].detach().cpu()) for name in head_parameter_names(runtime.model)))
    return reply(
        msg,
        {
            keys.NUM_EXAMPLES: len(forget),
            keys.IMU_KEPT: stats.kept,
            keys.STEPS: stats.steps,
            keys.LOSS_BEFORE: stats.loss_before,
            keys.LOSS_AFTER: stats.loss_after,
            keys.COMPUTE_S: served.elapsed(),
        },
        {keys.ARRAYS: head},
    )


class IMUHeadUnlearning:
    """Sends the global model to client u; it returns only its unlearned head, which replaces the global head."""

    def __init__(
        self,
        *,
        directory: ClientDirectory,
        settings: IMUWireSettings,
        seed: int,
        ledger: tuple[DeletionRequest, ...] = (),
        round_timeout: float = 600.0,
        policy: RoundPolicy | None = None,
    ) -> None:
        self.directory = directory
        self.settings = settings
        self.seed = seed
        self.ledger = ledger
        self.round_timeout = round_timeout
        self.policy = policy or RoundPolicy()

    def unlearn(self, grid: Grid, arrays: ArrayRecord, request: DeletionRequest) -> tuple[ArrayRecord, dict[str, Any]]:
        """One round with client u alone; the returned model is `arrays` with the head replaced."""
        config = ConfigRecord({keys.SEED: self.seed, keys.LEDGER: encode_ledger(self.ledger), keys.REQUEST: json.dumps(asdict(request))})
        config.update(self.settings.to_record())
        message = Message(
            RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config}),
            dst_node_id=self.directory.node_of[request.client],
            message_type=keys.QUERY_IMU,
        )
        state = arrays.to_torch_state_dict()

        def parse(partition: int, answer: Message) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            metrics = metrics_of(answer)
            head = answer.content.array_records[keys.ARRAYS] if keys.ARRAYS in answer.content.array_records else None
            if head is None or not len(head) or any(name not in state for name in head):
                raise InvalidReplyError(
                    f"IMU reply from client {partition} must hold head parameters named as in the model, "
                    f"got {sorted(head) if head is not None else None}"
                )
            new_head = head.to_torch_state_dict()
            for name, value in new_head.items():
                if tuple(value.shape) != tuple(state[name].shape):
                    raise InvalidReplyError(
                        f"IMU reply: head tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(state[name].shape)}"
                    )
            details = {
                "head": sorted(new_head),
                "kept_examples": whole(metrics[keys.IMU_KEPT]),
                "steps": whole(metrics[keys.STEPS]),
                "forget_loss_before": real(metrics[keys.LOSS_BEFORE]),
                "forget_loss_after": real(metrics[keys.LOSS_AFTER]),
            }
            return new_head, details

        outcome = ask_clients(
            grid, [message], directory=self.directory, phase="unlearn", parse=parse, retries=self.policy.retries, timeout=self.round_timeout
        )
        new_head, details = require_reply(outcome, request.client, "IMU")
        for name, value in new_head.items():
            state[name] = value.to(state[name].dtype)
        return ArrayRecord(OrderedDict(state)), {**details, **outcome.to_dict()}


@register(
    "imu",
    "IMU-head: the withdrawing client alone ascends its influence-weighted loss on the final layer; only the head comes back",
    handlers={QUERY: imu_step},
)
def imu(ctx: MethodContext) -> MethodOutcome:
    """Influence-weighted gradient ascent on the final layer by client u; the other layers stay as they are."""
    cfg = ctx.cfg
    step = IMUHeadUnlearning(
        directory=ctx.strategy.directory,
        settings=IMUWireSettings.of(cfg),
        seed=cfg.seed,
        ledger=ctx.strategy.ledger,
        round_timeout=cfg.round_timeout,
        policy=app_config.round_policy_for(cfg),
    )
    arrays, report = step.unlearn(ctx.grid, ctx.arrays, ctx.request)
    return MethodOutcome(arrays, details={"unlearning": report, "storage": storage()})
