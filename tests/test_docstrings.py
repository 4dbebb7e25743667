"""Every public module, function, class and method of fedunlearn, strategies and simulations has a docstring."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import sys
import types

PACKAGES = ("fedunlearn", "strategies", "simulations")


def own_docstring(obj: object) -> str:
    """The docstring written on `obj` itself: not inherited, and not the signature dataclasses generate."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not doc:
        return ""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""  # @dataclass fills an empty docstring with the class signature
    return doc.strip()


def undocumented(module: types.ModuleType) -> list[str]:
    """Qualified names of the public callables defined in `module` that lack a docstring (and the module's own)."""
    is_package = hasattr(module, "__path__")  # an empty package __init__ needs no docstring
    missing = [] if own_docstring(module) or is_package else [f"{module.__name__} (module)"]
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:  # imported, documented where it is defined
            continue
        if not own_docstring(obj):
            missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(obj):
            for attr_name, attr in vars(obj).items():
                if attr_name.startswith("_"):
                    continue
                function = attr.fget if isinstance(attr, property) else getattr(attr, "__func__", attr)
                if inspect.isfunction(function) and not own_docstring(function):
                    missing.append(f"{module.__name__}.{name}.{attr_name}")
    return missing


def modules() -> list[types.ModuleType]:
    """Every module of the three packages."""
    found = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        found.append(package)
        found += [importlib.import_module(info.name) for info in pkgutil.walk_packages(package.__path__, f"{package_name}.")]
    return found


def test_public_callables_have_docstrings():
    walked = modules()
    assert {"fedunlearn.iau", "strategies.iau_fed", "simulations.runner"} <= {m.__name__ for m in walked}
    missing = [name for m in walked for name in undocumented(m)]
    assert not missing, "public callables without a docstring (add a one-line docstring saying what, not how):\n" + "\n".join(missing)


def test_the_walker_finds_what_is_missing(monkeypatch):
    """A module with one gap of each kind is reported exactly, so the test above can fail."""
    module = types.ModuleType("fake", "A module.")
    monkeypatch.setitem(sys.modules, "fake", module)  # @dataclass looks its module up
    exec(
        "from dataclasses import dataclass\n"
        "from math import sqrt\n"
        "def documented():\n    'Yes.'\n"
        "def bare():\n    pass\n"
        "def _private():\n    pass\n"
        "@dataclass\nclass Plain:\n    x: int = 0\n"
        "class Documented:\n    'Yes.'\n"
        "    def method(self):\n        pass\n"
        "    @property\n    def prop(self):\n        return 1\n"
        "    @classmethod\n    def make(cls):\n        'Yes.'\n",
        module.__dict__,
    )
    assert undocumented(module) == ["fake.bare", "fake.Plain", "fake.Documented.method", "fake.Documented.prop"]
    assert undocumented(types.ModuleType("bare_module")) == ["bare_module (module)"]
