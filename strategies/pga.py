"""PGA (Halimi et al., arXiv 2207.05521), server side: w_ref from the stored last local model, client u's ascent.

Where w_u comes from: on the first request the last local models the runner recorded during the original training;
on every later request of a stream the ones recorded during PGA's own FedAvg rounds of the previous request (its
model is their aggregate), kept per method branch in a `PGAMemory`.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedunlearn.baselines import LastLocalModel, LastModelStore, PGASettings, pga_reference
from fedunlearn.deletion import DeletionRequest, encode_ledger
from fedunlearn.errors import InvalidReplyError, MissingRepliesError

from . import keys
from .fedavg import ClientDirectory, model_version

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
    label: str                 # ORIGINAL or OWN
    missing: str = ""          # non-empty: no store describes the current model (w_ref = w), and why

    def last(self, client: int) -> LastLocalModel | None:
        """Client `client`'s stored model, or None."""
        return self.store.get(client) if self.store is not None else None


def reference_source(memory: PGAMemory, original: LastModelStore | None, arrays: ArrayRecord, request_round: int) -> ReferenceSource:
    """The store whose models were aggregated into `arrays` (PGA's current model), with that round's number."""
    if not memory.served:  # the first request: the model training ended with, in round `request_round`
        return ReferenceSource(original, request_round, ORIGINAL)
    if memory.store is None:
        return ReferenceSource(None, 0, OWN, "no FedAvg round of pga produced its current model (--pga-rounds 0, or none "
                                             "of its rounds was aggregated): it is the previous request's ascent")
    if model_version(arrays) != memory.version:
        return ReferenceSource(None, memory.model_round, OWN, f"the current model is not the aggregate of pga's own fedavg "
                                                              f"round {memory.model_round} (training went on after it)")
    return ReferenceSource(memory.store, memory.model_round, OWN)


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
               model_round: int, source: str = ORIGINAL, missing: str = "") -> tuple[ArrayRecord, dict[str, Any]]:
        """Client u's projected gradient ascent around w_ref; returns the model it sent back and what it reported.

        `last`: u's stored model, used when it comes from `model_round`, the round whose aggregate `global_arrays` is
        (`source` names where that round ran); `missing`: why no store describes the current model (w_ref = w).
        With w_u, the client also gets it for the authors' early stop (||w - w_u||^2 > settings.stop_distance).
        """
        reference, subtracted = reference_state(global_arrays, last, model_round)
        s = self.settings
        config = ConfigRecord({
            keys.SEED: self.seed, keys.LEDGER: encode_ledger(self.ledger), keys.REQUEST: json.dumps(asdict(request)),
            keys.LR: s.lr, keys.EPOCHS: s.epochs, keys.BATCH_SIZE: s.batch_size, keys.MOMENTUM: s.momentum,
            keys.CLIP_GRAD: s.clip_grad, keys.PGA_RADIUS: s.radius, keys.PGA_RADIUS_FRACTION: s.radius_fraction,
            keys.PGA_RANDOM_MODELS: s.random_models, keys.PGA_STOP_DISTANCE: s.stop_distance,
        })
        content = RecordDict({keys.ARRAYS: ArrayRecord(OrderedDict(reference)), keys.CONFIG: config})
        early_stop = subtracted and last is not None and s.stop_distance > 0
        if early_stop:
            assert last is not None
            content[keys.PGA_LOCAL_MODEL] = ArrayRecord(OrderedDict(last.state))
        message = Message(content, dst_node_id=self.directory.node_of[request.client], message_type=keys.QUERY_PGA)
        replies = [r for r in grid.send_and_receive([message], timeout=self.round_timeout) if not r.has_error()]
        if not replies:
            raise MissingRepliesError(f"client {request.client} did not answer the PGA round; the model is left unchanged")
        reply = replies[0]
        if keys.ARRAYS not in reply.content.array_records:
            raise InvalidReplyError(f"PGA reply from client {request.client} holds no '{keys.ARRAYS}' ArrayRecord")
        metrics = reply.content[keys.METRICS]
        if subtracted:
            where = f"{source} round {model_round}"
        elif missing:
            where = f"none, w_ref = w: {missing}"
        else:
            where = f"none, w_ref = w: client {request.client} did not train in {source} round {model_round}"
        local_distance = float(metrics[keys.PGA_LOCAL_DISTANCE]) if keys.PGA_LOCAL_DISTANCE in metrics else math.nan
        details = {"reference": "w_ref = (w - a w_u) / (1 - a)" if subtracted else "w (no local model of client u from the round that produced w)",
                   "reference_source": where,
                   "client_share": last.share if subtracted and last is not None else 0.0,
                   **{k: float(metrics[key]) for k, key in (("radius", keys.PGA_RADIUS), ("final_distance", keys.PGA_DISTANCE),
                                                              ("max_distance", keys.PGA_MAX_DISTANCE), ("projections", keys.PGA_PROJECTIONS),
                                                              ("steps", keys.STEPS), ("final_forget_loss", keys.LOSS_AFTER))},
                   # The authors' early stop needs w_u of the round that produced w: off in the w_ref = w fallback.
                   "early_stop_threshold": s.stop_distance if early_stop else None,
                   "stopped_early": bool(int(metrics[keys.PGA_STOPPED_EARLY])) if keys.PGA_STOPPED_EARLY in metrics else False,
                   "final_local_distance_sq": local_distance if math.isfinite(local_distance) else None}
        return reply.content[keys.ARRAYS], details
