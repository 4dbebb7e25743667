"""What the server keeps from training for the baselines: FedEraser's stored updates, PGA's last local models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord

from fedunlearn.baselines import LastModelStore, UpdateHistory

from .streaming import StreamingRecorder, UpdateRecorder, streaming_recorder


class TrainingRecorder:
    """An `update_recorder` for UnlearningFedAvg: feeds each client model into the baselines' stores as it arrives.

    A StreamingRecorder: the strategy calls `record_client` per accepted reply and `end_round` with the round's
    example total (PGA's FedAvg share n_k / n is only known then); calling it with a whole round also works.
    """

    def __init__(self, history: UpdateHistory | None = None, last_models: LastModelStore | None = None) -> None:
        self.history = history
        self.last_models = last_models
        self._before: tuple[int, int, dict[str, torch.Tensor]] | None = None  # (round, id of the global model, its tensors)
        self._counts: dict[int, int] = {}  # this round's recorded partitions and their example counts

    def _global_state(self, server_round: int, global_before: ArrayRecord) -> dict[str, torch.Tensor]:
        """The round's global model as tensors, converted once per round rather than once per client."""
        if self._before is None or self._before[:2] != (server_round, id(global_before)):
            self._before = (server_round, id(global_before), dict(global_before.to_torch_state_dict()))
        return self._before[2]

    def record_client(self, server_round: int, partition: int, arrays: ArrayRecord, num_examples: int, global_before: ArrayRecord) -> None:
        """Store one client's update (FedEraser, in the rounds it keeps) and its latest model (PGA; share set at `end_round`)."""
        wants_history = self.history is not None and self.history.wants(server_round)
        if not (wants_history or self.last_models is not None):
            return
        state = arrays.to_torch_state_dict()
        if wants_history:
            assert self.history is not None
            self.history.record(server_round, partition, state, self._global_state(server_round, global_before), num_examples)
        if self.last_models is not None:
            self.last_models.record(server_round, partition, state, 0.0)
            self._counts[partition] = num_examples

    def end_round(self, server_round: int, total_examples: int) -> None:
        """Give this round's stored last models their FedAvg share n_k / n."""
        if self.last_models is not None:
            for partition, count in self._counts.items():
                stored = self.last_models.get(partition)
                if stored is not None and stored.server_round == server_round:
                    stored.share = count / total_examples if total_examples else 0.0
        self._counts = {}
        self._before = None

    def __call__(self, server_round: int, clients: dict[int, tuple[ArrayRecord, int]], global_before: ArrayRecord) -> None:
        """Record one whole training round: {partition: (client model, examples)} and the global model it started from."""
        if not clients:
            return
        for partition, (arrays, num_examples) in clients.items():
            self.record_client(server_round, partition, arrays, num_examples, global_before)
        self.end_round(server_round, sum(n for _, n in clients.values()))


class FanOut:
    """One update recorder feeding every given recorder (each selected method's own), in order, one client at a time."""

    def __init__(self, recorders: Sequence[UpdateRecorder | StreamingRecorder]) -> None:
        self.recorders = [streaming_recorder(r) for r in recorders]

    def record_client(self, server_round: int, partition: int, arrays: ArrayRecord, num_examples: int, global_before: ArrayRecord) -> None:
        """Pass one client model to every recorder."""
        for recorder in self.recorders:
            recorder.record_client(server_round, partition, arrays, num_examples, global_before)

    def end_round(self, server_round: int, total_examples: int) -> None:
        """Close the round in every recorder."""
        for recorder in self.recorders:
            recorder.end_round(server_round, total_examples)


def fan_out(recorders: Sequence[UpdateRecorder | StreamingRecorder]) -> FanOut:
    """One `update_recorder` feeding every given recorder (each selected method's own), in order."""
    return FanOut(recorders)
