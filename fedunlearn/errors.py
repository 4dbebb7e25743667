"""Exceptions raised by fedunlearn; each message names the bad value and the fix."""

from __future__ import annotations


class FedUnlearnError(Exception):
    """Base class of every error fedunlearn raises on purpose."""


class ConfigError(FedUnlearnError, ValueError):
    """A configuration value is out of range, of the wrong type, or unknown."""


class UnknownMethodError(ConfigError):
    """An unlearning method name that is not registered."""


class InvalidReplyError(FedUnlearnError):
    """A client reply that cannot be used (wrong keys, shapes, dtypes, non-finite values, stale version)."""


class MissingRepliesError(FedUnlearnError):
    """Clients that were asked to take part in a round did not answer."""


class WithdrawalRequestError(FedUnlearnError, ValueError):
    """A withdrawal request that cannot be served: unknown client, wrong requester, client already gone."""


class UnlearningAbortedError(FedUnlearnError):
    """An unlearning request that ended without changing the model (the policy said abort); `report` says why."""

    def __init__(self, message: str, report: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.report: dict[str, object] = dict(report or {})
