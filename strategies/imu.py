"""IMU-head (Fan et al., arXiv 2508.01620), server side: the withdrawing client alone rewrites the final layer."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedunlearn.baselines import IMUSettings
from fedunlearn.deletion import DeletionRequest, encode_ledger
from fedunlearn.errors import InvalidReplyError, MissingRepliesError

from . import keys
from .fedavg import ClientDirectory


class IMUHeadUnlearning:
    """Sends the global model to client u; it returns only its unlearned head, which replaces the global head.

    The simulator's clients keep no copy of the deployed model, so the model goes down once;
    only the head (the final layer's parameters) comes back up.
    """

    def __init__(self, *, directory: ClientDirectory, settings: IMUSettings, seed: int, ledger: tuple[DeletionRequest, ...] = (),
                 round_timeout: float = 600.0) -> None:
        self.directory = directory
        self.settings = settings
        self.seed = seed
        self.ledger = ledger
        self.round_timeout = round_timeout

    def unlearn(self, grid: Grid, arrays: ArrayRecord, request: DeletionRequest) -> tuple[ArrayRecord, dict[str, Any]]:
        """One round with client u alone; the returned model is `arrays` with the head replaced."""
        s = self.settings
        config = ConfigRecord({
            keys.SEED: self.seed, keys.LEDGER: encode_ledger(self.ledger), keys.REQUEST: json.dumps(asdict(request)),
            keys.LR: s.lr, keys.EPOCHS: s.epochs, keys.BATCH_SIZE: s.batch_size, keys.IMU_DAMPING: s.damping,
            keys.IMU_QUANTILE: s.clip_quantile,
        })
        message = Message(RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config}), dst_node_id=self.directory.node_of[request.client],
                          message_type=keys.QUERY_IMU)
        replies = [r for r in grid.send_and_receive([message], timeout=self.round_timeout) if not r.has_error()]
        if not replies:
            raise MissingRepliesError(f"client {request.client} did not answer the IMU round; the model is left unchanged")
        reply = replies[0]
        head = reply.content[keys.ARRAYS] if keys.ARRAYS in reply.content.array_records else None
        state = arrays.to_torch_state_dict()
        if head is None or not len(head) or any(name not in state for name in head):
            raise InvalidReplyError(f"IMU reply from client {request.client} must hold head parameters named as in the model, "
                                    f"got {sorted(head) if head is not None else None}")
        new_head = head.to_torch_state_dict()
        for name, value in new_head.items():
            if tuple(value.shape) != tuple(state[name].shape):
                raise InvalidReplyError(f"IMU reply: head tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(state[name].shape)}")
            state[name] = value.to(state[name].dtype)
        metrics = reply.content[keys.METRICS]
        details = {"head": sorted(new_head), "kept_examples": int(metrics[keys.IMU_KEPT]), "steps": int(metrics[keys.STEPS]),
                   "forget_loss_before": float(metrics[keys.LOSS_BEFORE]), "forget_loss_after": float(metrics[keys.LOSS_AFTER])}
        return ArrayRecord(OrderedDict(state)), details
