"""Settings that travel in a message: one `to_record` / `from_record` pair for both ends of the wire.

Its own module (below the strategies and the methods) so that a strategy and a method's client step share one
definition of what a message carries instead of encoding it by hand on one side and decoding it on the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, ClassVar, TypeVar

from flwr.app import ConfigRecord

__all__ = ["WireSettings", "as_float", "as_int", "as_ints"]

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


def as_int(value: object) -> int:
    """int() of a record entry that must be one number: records type their values as unions that include lists (and
    arrays), so this narrows for the type checker; anything int() would reject is a TypeError, as int() itself raises."""
    if isinstance(value, int | float | str):
        return int(value)
    raise TypeError(f"expected one number, got {type(value).__name__} {value!r:.80}")


def as_float(value: object) -> float:
    """float() of a record entry that must be one number (see `as_int`)."""
    if isinstance(value, int | float | str):
        return float(value)
    raise TypeError(f"expected one number, got {type(value).__name__} {value!r:.80}")


def as_ints(value: object) -> list[int]:
    """A record entry that must be a list of integers, as a list of int."""
    if isinstance(value, list):
        return [as_int(v) for v in value]
    raise TypeError(f"expected a list of integers, got {type(value).__name__} {value!r:.80}")
