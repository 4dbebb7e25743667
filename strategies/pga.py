"""PGA (Halimi et al., arXiv 2207.05521), server side: w_ref from the stored last local model, client u's ascent."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedunlearn.baselines import LastLocalModel, PGASettings, pga_reference
from fedunlearn.deletion import DeletionRequest, encode_ledger
from fedunlearn.errors import InvalidReplyError, MissingRepliesError

from . import keys
from .fedavg import ClientDirectory


def reference_state(global_arrays: ArrayRecord, last: LastLocalModel | None, request_round: int) -> tuple[dict[str, torch.Tensor], bool]:
    """w_ref over the floating entries; (w, False) when client u did not train in the last round (nothing to take out)."""
    state = dict(global_arrays.to_torch_state_dict())
    if last is None or last.server_round != request_round:
        return state, False
    out = {}
    for name, value in state.items():
        if torch.is_floating_point(value):
            out[name] = pga_reference(value.reshape(-1), last.state[name].reshape(-1), last.share).reshape(value.shape).to(value.dtype)
        else:
            out[name] = value.clone()
    return out, True


class PGAUnlearning:
    """Sends w_ref to the withdrawing client, which runs projected gradient ascent on its forget set and returns the model.

    The few FedAvg rounds among the remaining clients that follow are the caller's (any UnlearningFedAvg).
    """

    def __init__(self, *, directory: ClientDirectory, settings: PGASettings, seed: int, ledger: tuple[DeletionRequest, ...] = (),
                 round_timeout: float = 600.0) -> None:
        self.directory = directory
        self.settings = settings
        self.seed = seed
        self.ledger = ledger
        self.round_timeout = round_timeout

    def ascend(self, grid: Grid, global_arrays: ArrayRecord, request: DeletionRequest, last: LastLocalModel | None,
               request_round: int) -> tuple[ArrayRecord, dict[str, Any]]:
        """Client u's projected gradient ascent around w_ref; returns the model it sent back and what it reported."""
        reference, subtracted = reference_state(global_arrays, last, request_round)
        s = self.settings
        config = ConfigRecord({
            keys.SEED: self.seed, keys.LEDGER: encode_ledger(self.ledger), keys.REQUEST: json.dumps(asdict(request)),
            keys.LR: s.lr, keys.EPOCHS: s.epochs, keys.BATCH_SIZE: s.batch_size, keys.MOMENTUM: s.momentum,
            keys.CLIP_GRAD: s.clip_grad, keys.PGA_RADIUS: s.radius, keys.PGA_RADIUS_FRACTION: s.radius_fraction,
            keys.PGA_RANDOM_MODELS: s.random_models,
        })
        content = RecordDict({keys.ARRAYS: ArrayRecord(OrderedDict(reference)), keys.CONFIG: config})
        message = Message(content, dst_node_id=self.directory.node_of[request.client], message_type=keys.QUERY_PGA)
        replies = [r for r in grid.send_and_receive([message], timeout=self.round_timeout) if not r.has_error()]
        if not replies:
            raise MissingRepliesError(f"client {request.client} did not answer the PGA round; the model is left unchanged")
        reply = replies[0]
        if keys.ARRAYS not in reply.content.array_records:
            raise InvalidReplyError(f"PGA reply from client {request.client} holds no '{keys.ARRAYS}' ArrayRecord")
        metrics = reply.content[keys.METRICS]
        details = {"reference": "w_ref = (w - a w_u) / (1 - a)" if subtracted else "w (client u did not train in the last round)",
                   "client_share": last.share if subtracted and last is not None else 0.0,
                   **{k: float(metrics[key]) for k, key in (("radius", keys.PGA_RADIUS), ("final_distance", keys.PGA_DISTANCE),
                                                              ("max_distance", keys.PGA_MAX_DISTANCE), ("projections", keys.PGA_PROJECTIONS),
                                                              ("steps", keys.STEPS), ("final_forget_loss", keys.LOSS_AFTER))}}
        return reply.content[keys.ARRAYS], details
