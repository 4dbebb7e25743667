"""What the server keeps from training for the baselines: FedEraser's stored updates, PGA's last local models."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ArrayRecord

from fedunlearn.baselines import LastModelStore, UpdateHistory

from .fedavg import UpdateRecorder


class TrainingRecorder:
    """An `update_recorder` for UnlearningFedAvg: feeds each round's client models into the baselines' stores."""

    def __init__(self, history: UpdateHistory | None = None, last_models: LastModelStore | None = None) -> None:
        self.history = history
        self.last_models = last_models

    def __call__(self, server_round: int, clients: dict[int, tuple[ArrayRecord, int]], global_before: ArrayRecord) -> None:
        """Record one training round: {partition: (client model, examples)} and the global model it started from."""
        wants_history = self.history is not None and self.history.wants(server_round)
        if not clients or not (wants_history or self.last_models is not None):
            return
        before = global_before.to_torch_state_dict()
        total = sum(n for _, n in clients.values())
        for partition, (arrays, num_examples) in clients.items():
            state = arrays.to_torch_state_dict()
            if wants_history:
                assert self.history is not None
                self.history.record(server_round, partition, state, before, num_examples)
            if self.last_models is not None:
                self.last_models.record(server_round, partition, state, num_examples / total if total else 0.0)


def fan_out(recorders: Sequence[UpdateRecorder]) -> UpdateRecorder:
    """One `update_recorder` feeding every given recorder (each selected method's own), in order."""

    def record(server_round: int, clients: dict[int, tuple[ArrayRecord, int]], global_before: ArrayRecord) -> None:
        for recorder in recorders:
            recorder(server_round, clients, global_before)

    return record
