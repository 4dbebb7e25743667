"""Errors raised inside ClientApps, shown once with the client's own message first.

Flower's simulation engine logs every failed message three times at ERROR (a notice, the Ray task
error with the worker's whole traceback, then the driver's traceback), and a strategy that retries
asks again: a data folder every client failed to read printed 664 lines before the run ended. Ray's
own worker logs are already off (`log_to_driver=False` unless --verbose). `ClientErrors` is a logging
filter on the `flwr` logger for the length of a run: it keeps the first failure's message and
traceback, counts the rest, and lets Flower's other messages through. The runner then prints one
line and keeps the first traceback in results.json (`client_errors`).
"""

from __future__ import annotations

import logging
import re
from types import TracebackType
from typing import Any

from fedunlearn.errors import FedUnlearnError

_CAUSE_MARK = "The above exception was the direct cause of the following exception:"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ENGINE_NOTICES = ("An exception was raised when processing a message by", "An exception occured!!", "An exception occurred !!")


class ClientFailure(FedUnlearnError):
    """The run ended because clients failed; the message leads with the first client's own error."""

    def __init__(self, summary: str, error: BaseException | None) -> None:
        super().__init__(summary if error is None else f"{summary}; the run then stopped: {type(error).__name__}: {_short(error)}")


def _short(error: BaseException) -> str:
    """The start of an error's message: the ones that quote a client's reply repeat the client's traceback."""
    text = " ".join(_ANSI.sub("", str(error)).split())
    return text if len(text) <= 160 else text[:160] + "..."


def client_message(error: BaseException) -> str:
    """'Type: message' of the exception a ClientApp raised, from the error the engine got back (one line)."""
    traceback_str = getattr(error, "traceback_str", None)  # ray.exceptions.RayTaskError: the worker's formatted traceback
    if not (isinstance(traceback_str, str) and _CAUSE_MARK in traceback_str):
        traceback_str = str(error)  # RayTaskError's text holds the whole chain of causes
    if _CAUSE_MARK in traceback_str:
        # Flower's actor re-raises the client's exception as ClientAppException(str(ex)) "from ex": the original is above.
        # The last cause before that is the client's own exception (earlier ones are what it wrapped).
        before = _ANSI.sub("", traceback_str.rsplit(_CAUSE_MARK, 1)[0]).rstrip().splitlines()
        tail: list[str] = []
        for line in reversed(before):  # the exception line(s) follow the last indented frame line
            if line.startswith(" ") or line.startswith("Traceback"):
                break
            tail.insert(0, line.strip())
        if tail:
            return " ".join(t for t in tail if t)[:500]
    cause = getattr(error, "cause", None) or error
    text = str(getattr(cause, "message", None) or cause).strip()
    if "Message: " in text:
        text = text.split("Message: ", 1)[1]
    return " ".join(text.split())[:500] or type(cause).__name__


class ClientErrors(logging.Filter):
    """Collects the ClientApp failures Flower logs during a run; shows none of them itself (enabled=False: all pass)."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self.count = 0
        self.first: str | None = None
        self.first_traceback: str | None = None
        self._logger = logging.getLogger("flwr")

    def __enter__(self) -> ClientErrors:
        if self.enabled:
            self._logger.addFilter(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._logger.removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        """False (not shown) for the engine's per-message error records; the first one's content is kept."""
        if record.levelno < logging.ERROR:
            return True
        msg = record.msg
        if isinstance(msg, BaseException):
            self.count += 1
            if self.first is None:
                self.first = client_message(msg)
                detail = getattr(msg, "traceback_str", None)
                self.first_traceback = detail if isinstance(detail, str) else str(msg)
            return False
        if isinstance(msg, str) and (msg.startswith("Traceback (most recent call last)") or msg.startswith(_ENGINE_NOTICES)):
            if self.first_traceback is None and msg.startswith("Traceback"):
                self.first_traceback = msg
            return False
        return True

    def summary(self) -> str:
        """One line: the first client error, then how many failed messages there were."""
        others = f" ({self.count} failed client messages in all; the first one's traceback is in results.json: client_errors)"
        return f"a client failed: {self.first}{others if self.count > 1 else ' (its traceback is in results.json: client_errors)'}"

    def to_dict(self) -> dict[str, Any]:
        """What results.json keeps of them."""
        return {"count": self.count, "first": self.first, "first_traceback": self.first_traceback}
