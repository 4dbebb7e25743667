"""Flower strategies and the ClientApp of fedunlearn; `strategies.add_unlearning` adds unlearning to your own ClientApp."""

from __future__ import annotations

from typing import Any

__all__ = ["add_unlearning", "unlearning_strategy"]


def __getattr__(name: str) -> Any:
    # Lazy: `import strategies.keys` must not import Flower's client stack and every method.
    if name in __all__:
        from . import library

        return getattr(library, name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
