"""Deletion requests: who asks to forget what, and when."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .data import FederatedData

FORGET_SAMPLES = ("all", "poisoned", "random", "listed")


@dataclass(frozen=True)
class DeletionRequest:
    """Client `client` asks to forget `samples` of its data ("all" = client-level withdrawal).

    `fraction` applies to `samples="random"`; `at_round` is the training round after which the
    request arrives (None = after training). `samples="listed"` forgets exactly `indices` (global train
    indices of the client's examples: what a membership-inference shadow run unlearns).
    """

    client: int
    samples: str = "all"
    fraction: float = 1.0
    at_round: int | None = None
    indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))  # a decoded ledger gives a list
        if (self.samples == "listed") != bool(self.indices):
            raise ValueError("indices are given exactly when samples='listed'")
        if self.samples not in FORGET_SAMPLES:
            raise ValueError(f"samples={self.samples!r}: must be one of {', '.join(FORGET_SAMPLES)}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction}: must be in (0, 1]")
        if self.client < 0:
            raise ValueError(f"client={self.client}: must be a partition id >= 0")

    @property
    def client_level(self) -> bool:
        """True when the whole client withdraws."""
        return self.samples == "all"


def encode_ledger(requests: list[DeletionRequest] | tuple[DeletionRequest, ...]) -> str:
    """Serialise requests for a Flower ConfigRecord (a short JSON string)."""
    return json.dumps([asdict(r) for r in requests], separators=(",", ":"))


def decode_ledger(text: str) -> list[DeletionRequest]:
    """Inverse of `encode_ledger`."""
    if not text:
        return []
    return [DeletionRequest(**item) for item in json.loads(text)]


def forget_indices(data: FederatedData, request: DeletionRequest) -> torch.Tensor:
    """Global indices of the examples a request asks to forget (all of the client's training data if client-level)."""
    from .data import select_forget_subset

    if request.client_level:
        return data.client_train[request.client].clone()
    if request.samples == "listed":
        return torch.tensor(sorted(request.indices), dtype=torch.int64)
    return select_forget_subset(data, request.client, request.samples, request.fraction, data.spec.seed)


def excluded_indices(data: FederatedData, client: int, requests: list[DeletionRequest] | tuple[DeletionRequest, ...]) -> torch.Tensor:
    """Sorted global indices of `client`'s training examples removed by the requests in force."""
    parts = [forget_indices(data, r) for r in requests if r.client == client]
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.unique(torch.cat(parts))


def kept_indices(data: FederatedData, client: int, requests: list[DeletionRequest] | tuple[DeletionRequest, ...]) -> torch.Tensor:
    """The client's training indices that remain after the requests in force."""
    train = data.client_train[client]
    excluded = excluded_indices(data, client, requests)
    if excluded.numel() == 0:
        return train
    return train[~torch.isin(train, excluded)]
