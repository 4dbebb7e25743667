"""Cost accounting per phase: wall seconds, client compute seconds, rounds, participations, bytes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

COST_KEYS = ("wall_s", "client_compute_s", "rounds", "participations", "bytes_down", "bytes_up")


@dataclass
class PhaseCost:
    """What one phase (training, caching, an unlearning method) cost."""

    wall_s: float = 0.0
    client_compute_s: float = 0.0
    rounds: int = 0
    participations: int = 0
    bytes_down: int = 0
    bytes_up: int = 0

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict with the contract's keys."""
        return asdict(self)

    def __add__(self, other: PhaseCost) -> PhaseCost:
        return PhaseCost(*(getattr(self, k) + getattr(other, k) for k in COST_KEYS))

    @property
    def total_bytes(self) -> int:
        """Bytes down plus bytes up."""
        return self.bytes_down + self.bytes_up


def _ratio(numerator: float, denominator: float) -> float | None:
    if denominator <= 0:
        return None if numerator <= 0 else float("inf")
    return numerator / denominator


def speedup(reference: PhaseCost, method: PhaseCost) -> dict[str, float | None]:
    """cost(retrain) / cost(method) in seconds, rounds and bytes (inf when the method used none)."""
    return {
        "wall": _ratio(reference.wall_s, method.wall_s),
        "rounds": _ratio(reference.rounds, method.rounds),
        "bytes": _ratio(reference.total_bytes, method.total_bytes),
    }


@dataclass
class CostMeter:
    """Accumulates costs into named phases; the current phase receives every recorded message."""

    phases: dict[str, PhaseCost] = field(default_factory=dict)
    current: str = "setup"

    @contextmanager
    def phase(self, name: str) -> Iterator[PhaseCost]:
        """Attribute everything recorded inside the block (and its wall time) to `name`."""
        previous = self.current
        self.current = name
        cost = self.phases.setdefault(name, PhaseCost())
        start = time.perf_counter()
        try:
            yield cost
        finally:
            cost.wall_s += time.perf_counter() - start
            self.current = previous

    def _cost(self) -> PhaseCost:
        return self.phases.setdefault(self.current, PhaseCost())

    def record_round(self, messages_sent: int, bytes_down: int) -> None:
        """A round: one batch of messages pushed to clients."""
        cost = self._cost()
        cost.rounds += 1
        cost.bytes_down += bytes_down

    def record_reply(self, bytes_up: int, compute_s: float, ok: bool) -> None:
        """One client reply (a participation when it carries content)."""
        cost = self._cost()
        cost.bytes_up += bytes_up
        cost.client_compute_s += compute_s
        if ok:
            cost.participations += 1

    def get(self, name: str) -> PhaseCost:
        """The cost of a phase (zero if it never ran)."""
        return self.phases.get(name, PhaseCost())

    def exclude_wall(self, seconds: float) -> None:
        """Take `seconds` of simulator bookkeeping (e.g. progress evaluation) out of the current phase's wall time."""
        self._cost().wall_s -= seconds

    @contextmanager
    def untimed(self) -> Iterator[None]:
        """The block's seconds are the simulator's own measurement, not the current phase's: taken out of its wall time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.exclude_wall(time.perf_counter() - start)
