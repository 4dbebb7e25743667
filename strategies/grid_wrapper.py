"""The base of the Grids that stand between the strategies and Flower's Grid: it holds every pass-through.

Modelled on Flower's differential-privacy wrapper strategies, whose base passes untouched calls through to the
wrapped strategy: a subclass overrides only the calls it changes (MeteredGrid counts, CohortGrid packs) and
inherits the rest. `LocalGrid`, which wraps no grid and answers in-process, inherits the interface boilerplate.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class GridWrapper(Grid):
    """A Grid that passes every call through to `grid` (None: a grid of its own, which must override the four calls)."""

    def __init__(self, grid: Grid | None) -> None:
        self.grid = grid

    def _inner(self) -> Grid:
        if self.grid is None:
            raise NotImplementedError(f"{type(self).__name__} wraps no grid: it must override this call")
        return self.grid

    def set_run(self, run: Run) -> None:
        """Pass through (nothing to do without a wrapped grid)."""
        if self.grid is not None:
            self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """Pass through."""
        return self._inner().run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        """Build a Message (deprecated in Flower; kept for the interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Pass through."""
        return self._inner().get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Pass through."""
        return self._inner().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pass through."""
        return self._inner().pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Pass through."""
        return self._inner().send_and_receive(messages, timeout=timeout)
