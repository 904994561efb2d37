"""The two implementations of `fanout`, as interchangeable namespaces, for parity tests."""

from __future__ import annotations

import importlib
import os
from types import ModuleType, SimpleNamespace

import pytest

NO_EXTENSIONS = os.environ.get("FANOUT_NO_EXTENSIONS") == "1"
COMPILED_MODULES = ("fanout._frame", "fanout._ring", "fanout._writer", "fanout._ws")

#: ``@pytest.fixture(params=IMPL_PARAMS)``; the compiled one is skipped under FANOUT_NO_EXTENSIONS=1
IMPL_PARAMS = [
    pytest.param("compiled", marks=pytest.mark.skipif(NO_EXTENSIONS, reason="FANOUT_NO_EXTENSIONS=1")),
    pytest.param("reference"),
]


def load(name: str) -> SimpleNamespace:
    """Every public name of one implementation, plus ``name`` and ``modules``."""
    if name == "compiled":
        modules: tuple[ModuleType, ...] = tuple(importlib.import_module(m) for m in COMPILED_MODULES)
    elif name == "reference":
        modules = (importlib.import_module("fanout._reference"),)
    else:
        raise ValueError(name)
    ns = SimpleNamespace(name=name, modules=modules)
    for module in modules:
        for attr in module.__all__:
            setattr(ns, attr, getattr(module, attr))
    return ns
