"""Progress display: a rich progress bar per phase on a terminal, plain lines in logs and CI."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Progress:
    """Phases with a known number of steps; each step may carry a point (round, acc_test, backdoor_asr)."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self._bar: RichProgress | None = None
        self._task: Any = None
        self._name = ""
        self._total = 0
        self._done = 0

    def __enter__(self) -> Progress:
        if self.live:
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, error, tb)
            self._bar = None

    def start_phase(self, name: str, total: int) -> None:
        """Begin a phase of `total` steps."""
        self._name, self._total, self._done = name, max(total, 1), 0
        if not self.enabled:
            return
        if self._bar is not None:
            self._task = self._bar.add_task(name, total=self._total, status="")
        else:
            self.console.print(f"[fedunlearn] {name} ({total} step{'s' if total != 1 else ''})", highlight=False, markup=False)

    def advance(self, point: dict[str, float] | None = None) -> None:
        """One step done; `point` holds the latest curve values to show."""
        self._done += 1
        if not self.enabled:
            return
        status = ""
        if point:
            status = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items())
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=1, status=status)
        elif point and (self._done == self._total or self._done % max(1, self._total // 5) == 0):
            self.console.print(f"[fedunlearn]   {self._name} {self._done}/{self._total}: {status}", highlight=False, markup=False)

    def note(self, name: str, entry: dict[str, Any]) -> None:
        """A method finished: one summary line."""
        if not self.enabled:
            return
        keys = ("acc_test", "backdoor_asr", "mia_auc")
        text = "  ".join(f"{k} {entry[k]:.3f}" for k in keys if isinstance(entry.get(k), float))
        line = f"[fedunlearn] {name} done: {text}  ({entry['cost']['wall_s']:.2f} s, {entry['cost']['rounds']} rounds)"
        if self._bar is not None:
            self._bar.console.print(line, highlight=False, markup=False)
        else:
            self.console.print(line, highlight=False, markup=False)
