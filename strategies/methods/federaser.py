"""FedEraser (Liu et al., arXiv 2012.13891): replay the stored rounds, calibrate with the remaining clients, rescale.

Server step: `FedEraser.unlearn`, whose calibration rounds go through the reply pipeline. Recorder: the client
updates of every --federaser-interval-th training round. No client step of its own: the calibration is an ordinary
train round (the core `train` handler).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedunlearn.baselines import FedEraserSettings, UpdateHistory, apply_update, federaser_step, state_difference, weighted_mean
from fedunlearn.config import ExperimentConfig
from fedunlearn.errors import MissingRepliesError

from .. import app_config, keys
from ..fedavg import UnlearningFedAvg
from ..rounds import RoundPolicy, ask_clients
from ..update_recorder import TrainingRecorder
from ..validation import check_train_reply
from .base import MethodContext, MethodOutcome, arrays_nbytes, register, storage


def _arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((name, tensor.detach().clone()) for name, tensor in state.items()))


class FedEraser(UnlearningFedAvg):
    """UnlearningFedAvg whose `unlearn` rebuilds the model from the updates stored during training.

    Give it the ledger with the request in force (the forgotten client is then never asked and
    sample-level deletions travel in the calibration config) and the training settings; the
    calibration trains ceil(r * E) local epochs. Round t of the replay samples the same cohort
    as round t of training.
    """

    def __init__(
        self,
        *,
        history: UpdateHistory,
        calibration_ratio: float = 0.5,
        round_timeout: float = 600.0,
        policy: RoundPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.history = history
        self.settings = FedEraserSettings(interval=history.settings.interval, calibration_ratio=calibration_ratio)
        self.round_timeout = round_timeout
        self.policy = policy or RoundPolicy()
        self.train_settings = replace(self.train_settings, epochs=self.settings.calibration_epochs(self.train_settings.epochs))

    def unlearn(self, grid: Grid, initial_arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, Any]]:
        """Replay every stored round from `initial_arrays`; returns the unlearned model and what the replay did."""
        if not self.history.rounds:
            raise RuntimeError("FedEraser has no stored updates: install its recorder on the training strategy before training")
        partition_of = {nid: p for p, nid in self.directory.node_of.items()}
        # The first stored round starts from the same initial model: with only client-level deletions the remaining
        # clients' stored updates are exactly what they would send again, so no calibration is needed (as in the paper).
        exact_first = all(r.client_level for r in self.ledger)
        theta: dict[str, torch.Tensor] = dict(initial_arrays.to_torch_state_dict())
        report: dict[str, Any] = {
            "stored_rounds": self.history.rounds,
            "calibration_epochs": self.train_settings.epochs,
            "calibration_rounds": 0,
            "skipped_rounds": [],
            "retries": 0,
            "failures": [],
            "rejected": [],
        }
        for index, server_round in enumerate(self.history.rounds):
            remaining = [p for p in self.history.partitions(server_round) if p not in self.withdrawn]
            old_update = self.history.mean_update(server_round, remaining)
            if old_update is None:  # only the forgotten client trained in that round: nothing to replay
                report["skipped_rounds"].append(server_round)
                continue
            if index == 0 and server_round == 1 and exact_first:
                theta = apply_update(theta, old_update)
            else:
                arrays = _arrays(theta)
                messages = [
                    m
                    for m in self.configure_train(server_round, arrays, ConfigRecord(), grid)
                    if partition_of[m.metadata.dst_node_id] in remaining
                ]

                def parse(
                    partition: int, reply: Message, template: ArrayRecord = arrays, start: dict[str, torch.Tensor] = theta
                ) -> tuple[dict[str, torch.Tensor], float]:
                    count = check_train_reply(reply, template, self.arrayrecord_key)
                    return state_difference(reply.content.array_records[keys.ARRAYS].to_torch_state_dict(), start), float(count)

                outcome = ask_clients(
                    grid,
                    messages,
                    directory=self.directory,
                    phase="unlearn",
                    parse=parse,
                    retries=self.policy.retries,
                    timeout=self.round_timeout,
                    rejected_log=self.rejected,
                    failures_log=self.failures,
                )
                report["retries"] += outcome.retries
                report["failures"].extend(outcome.failures)
                report["rejected"].extend(outcome.rejected)
                if not outcome.accepted:
                    raise MissingRepliesError(
                        f"no client answered FedEraser's calibration of round {server_round} "
                        f"(asked {sorted(remaining)}); the model is left unchanged"
                    )
                if outcome.missing:  # like FedAvg, go on with those who answered; the stored step length still covers everyone
                    report.setdefault("missing", {})[server_round] = outcome.missing
                answers = [outcome.accepted[p] for p in sorted(outcome.accepted)]  # partition order: float sums depend on it
                calibration = weighted_mean([difference for difference, _ in answers], [count for _, count in answers])
                theta = federaser_step(theta, old_update, calibration)
                report["calibration_rounds"] += 1
            if self.on_round_end is not None:
                self.on_round_end(server_round, _arrays(theta), None)
        return _arrays(theta), report


def update_recorder(cfg: ExperimentConfig) -> TrainingRecorder:
    """What FedEraser keeps from training: the client updates of every --federaser-interval-th round."""
    return TrainingRecorder(history=UpdateHistory(cfg.federaser_interval))


@register(
    "federaser",
    "FedEraser: replay the updates stored every --federaser-interval rounds, calibrated by the remaining clients",
    recorder=update_recorder,
)
def federaser(ctx: MethodContext) -> MethodOutcome:
    """Rebuild the model from the initial weights with the stored updates, calibrated and rescaled per layer."""
    if not isinstance(ctx.recorded, TrainingRecorder) or ctx.recorded.history is None:
        raise RuntimeError(
            "federaser needs the client updates stored during training: the runner installs its recorder when "
            "'federaser' is among --methods before training starts"
        )
    cfg = ctx.cfg
    history = ctx.recorded.history
    strategy = FedEraser(
        history=history,
        calibration_ratio=cfg.federaser_calibration_ratio,
        round_timeout=cfg.round_timeout,
        policy=app_config.round_policy_for(cfg),
        directory=ctx.strategy.directory,
        train=app_config.train_settings_for(cfg),
        seed=cfg.seed,
        fraction_train=cfg.fraction_fit,
        ledger=(*ctx.strategy.ledger, ctx.request),
        on_round_end=ctx.round_hook("federaser") if ctx.round_hook is not None else None,
    )
    arrays, report = strategy.unlearn(ctx.grid, ctx.initial_arrays)
    # The server also keeps the initial weights it replays from.
    return MethodOutcome(
        arrays,
        details={
            "unlearning": report,
            "storage": storage(
                server_bytes=history.nbytes + arrays_nbytes(ctx.initial_arrays),
                stored_updates=history.num_updates,
                interval=history.settings.interval,
            ),
        },
    )
