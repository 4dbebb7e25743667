"""FedEraser (Liu et al., arXiv 2012.13891): replay the stored rounds, calibrate with the remaining clients, rescale."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedunlearn.baselines import FedEraserSettings, UpdateHistory, apply_update, federaser_step, state_difference, weighted_mean
from fedunlearn.errors import MissingRepliesError

from . import keys
from .fedavg import UnlearningFedAvg


def _arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((name, tensor.detach().clone()) for name, tensor in state.items()))


class FedEraser(UnlearningFedAvg):
    """UnlearningFedAvg whose `unlearn` rebuilds the model from the updates stored during training.

    Give it the ledger with the request in force (the forgotten client is then never asked and
    sample-level deletions travel in the calibration config) and the training settings; the
    calibration trains ceil(r * E) local epochs. Round t of the replay samples the same cohort
    as round t of training.
    """

    def __init__(self, *, history: UpdateHistory, calibration_ratio: float = 0.5, round_timeout: float = 600.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history = history
        self.settings = FedEraserSettings(interval=history.settings.interval, calibration_ratio=calibration_ratio)
        self.round_timeout = round_timeout
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
        report: dict[str, Any] = {"stored_rounds": self.history.rounds, "calibration_epochs": self.train_settings.epochs,
                                  "calibration_rounds": 0, "skipped_rounds": []}
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
                messages = [m for m in self.configure_train(server_round, arrays, ConfigRecord(), grid)
                            if partition_of[m.metadata.dst_node_id] in remaining]
                replies = self.valid_train_replies(server_round, grid.send_and_receive(messages, timeout=self.round_timeout))
                good = [r for r in self.in_partition_order(replies) if not r.has_error()]
                answered = {partition_of[r.metadata.src_node_id] for r in good}
                missing = sorted({partition_of[m.metadata.dst_node_id] for m in messages} - answered)
                if not good:
                    raise MissingRepliesError(f"no client answered FedEraser's calibration of round {server_round} "
                                              f"(asked {sorted(remaining)}); the model is left unchanged")
                if missing:  # like FedAvg, go on with those who answered; the stored step length still covers everyone
                    report.setdefault("missing", {})[server_round] = missing
                calibration = weighted_mean(
                    [state_difference(r.content[keys.ARRAYS].to_torch_state_dict(), theta) for r in good],
                    [float(r.content[keys.METRICS][keys.NUM_EXAMPLES]) for r in good],
                )
                theta = federaser_step(theta, old_update, calibration)
                report["calibration_rounds"] += 1
            if self.on_round_end is not None:
                self.on_round_end(server_round, _arrays(theta), None)
        return _arrays(theta), report
