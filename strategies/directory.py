"""Which Flower node serves which partition: the data type server strategies, validation and rounds share.

Its own module so that no strategy file has to import another one for it (fedavg <-> validation was a circle).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClientDirectory:
    """Which Flower node serves which partition, and how many examples each holds."""

    node_of: dict[int, int] = field(default_factory=dict)
    num_train: dict[int, int] = field(default_factory=dict)
    num_heldout: dict[int, int] = field(default_factory=dict)

    @property
    def partitions(self) -> list[int]:
        """Partition ids, sorted."""
        return sorted(self.node_of)
