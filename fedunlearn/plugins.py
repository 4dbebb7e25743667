"""Objects named `PKG.MODULE:NAME` on the command line: a user's model factory or dataset loader.

The value stays a string everywhere it travels (ExperimentConfig, DataSpec, ClientSpec), so every
process, Ray workers included, resolves it the same way: by importing PKG.MODULE from its own
sys.path. A module that imports in the driver but not in the workers fails there; put its folder
on PYTHONPATH (Ray's workers inherit it) or install its package.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable
from typing import Any

from .errors import ConfigError

__all__ = ["SEPARATOR", "is_plugin_path", "load_callable"]

SEPARATOR = ":"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_plugin_path(value: object) -> bool:
    """Whether value is written as `PKG.MODULE:NAME` (its syntax only; nothing is imported)."""
    if not isinstance(value, str) or value.count(SEPARATOR) != 1:
        return False
    module, name = value.split(SEPARATOR)
    return bool(_DOTTED.match(module)) and bool(_DOTTED.match(name))


def _one_line(err: BaseException) -> str:
    """An exception as `Type: message` on one line (the CLI prints one line per error)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_callable(key: str, value: str, contract: str) -> Callable[..., Any]:
    """Import `PKG.MODULE:NAME` and return NAME, checked to be callable.

    `key` is the option's name (`model`, `dataset`) and `contract` the signature NAME must have;
    both go into the ConfigError raised when the module does not import, NAME is missing or is
    not callable, so the one line the user sees names the key, the value and the fix.
    """
    if not is_plugin_path(value):
        raise ConfigError(f"{key}={value!r}: not of the form PKG.MODULE:NAME (e.g. mypkg.models:make_net), where NAME is {contract}")
    module_name, attr_path = value.split(SEPARATOR)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise ConfigError(
                f"{key}={value!r}: module {module_name!r} not found; put the folder that holds it on PYTHONPATH "
                "(Ray's workers inherit it) or pip install its package"
            ) from None
        raise ConfigError(f"{key}={value!r}: importing module {module_name!r} failed ({_one_line(err)}); install what it imports") from None
    except Exception as err:  # any error of the user's module at import time, reported on one line
        raise ConfigError(f"{key}={value!r}: importing module {module_name!r} raised {_one_line(err)}; fix the module") from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={value!r}: {module_name!r} has no attribute {attr_path!r}{hint}; name {contract}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}={value!r}: {attr_path!r} is of type {type(obj).__name__}, not callable; name {contract}")
    return obj
