"""Settings that travel in a message: one `to_record` / `from_record` pair for both ends of the wire.

Its own module (below the strategies and the methods) so that a strategy and a method's client step share one
definition of what a message carries instead of encoding it by hand on one side and decoding it on the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, ClassVar, TypeVar

from flwr.app import ConfigRecord

__all__ = ["WireSettings"]

_CASTS: dict[str, Callable[[Any], Any]] = {"float": float, "int": int, "bool": bool, "str": str}
S = TypeVar("S", bound="WireSettings")


class WireSettings:
    """Mixin for a method's frozen settings dataclass: one `to_record` / `from_record` pair for both ends of the wire.

    `WIRE` maps each field to its config key (`strategies.keys`); a key missing from a record leaves the field's
    default, so a newer server can add a setting without breaking older clients.
    """

    WIRE: ClassVar[Mapping[str, str]] = {}

    def to_record(self) -> ConfigRecord:
        """The settings as config entries of a message."""
        return ConfigRecord({key: getattr(self, name) for name, key in self.WIRE.items()})

    @classmethod
    def from_record(cls: type[S], record: ConfigRecord) -> S:
        """The settings a message carries (cast to the fields' types)."""
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            key = cls.WIRE.get(f.name)
            if key is not None and key in record:
                type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
                values[f.name] = _CASTS[type_name](record[key])
        return cls(**values)
