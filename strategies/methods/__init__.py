"""Unlearning methods, one file each, registered once (see `base`): importing this package registers all of them.

The built-in methods are imported in a fixed order (`--help` lists them so); any other module in this folder is
imported after them, so a new method is its own file here and nothing else (docs/adding-a-method.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    REGISTRY,
    Method,
    MethodContext,
    MethodOutcome,
    WireSettings,
    arrays_nbytes,
    check_methods,
    client_handlers,
    get_method,
    register,
    registry_scope,
    storage,
)

BUILT_IN = ("retrain", "iau", "finetune", "gradient_ascent", "federaser", "pga", "imu")

for _name in (*BUILT_IN, *sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in (*BUILT_IN, "base"))):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = [
    "REGISTRY",
    "Method",
    "MethodContext",
    "MethodOutcome",
    "WireSettings",
    "arrays_nbytes",
    "check_methods",
    "client_handlers",
    "get_method",
    "register",
    "registry_scope",
    "storage",
]
