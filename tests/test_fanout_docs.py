"""The docstrings of fanout's public API are written once in the .pyi stubs (what editors and type
checkers read) and carried by the compiled modules (what help() reads); this keeps the two equal."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from support import fanout_impls

STUBS = ("_frame", "_ring", "_writer", "_ws", "_msgs")
#: `cdef readonly`/`public` attributes declared in _writer.pxd: Cython gives them no docstring (the .pyi has it)
C_ATTRIBUTES = {"Writer.frames_out", "Writer.bytes_out", "Writer.syscalls", "Writer.overflows", "Writer.write_errors",
                "Writer.held_flushes", "Writer.coalesce_window", "Writer.coalesce_min_conns", "Writer.coalesce_busy",
                "Writer.busy_share", "Writer.probes"}


def stub_docs(module: str) -> dict[str, str]:
    """'Class', 'Class.method' and 'function' -> docstring, from the installed package's .pyi."""
    spec = importlib.util.find_spec(f"fanout.{module}")
    assert spec is not None and spec.origin is not None
    tree = ast.parse((Path(spec.origin).parent / f"{module}.pyi").read_text())
    docs: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs[node.name] = ast.get_docstring(node) or ""
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    docs[f"{node.name}.{item.name}"] = ast.get_docstring(item) or ""
        elif isinstance(node, ast.FunctionDef):
            docs[node.name] = ast.get_docstring(node) or ""
    return docs


@pytest.mark.parametrize("module", STUBS)
def test_every_public_stub_has_a_docstring(module: str) -> None:
    missing = [name for name, doc in stub_docs(module).items() if not doc]
    assert missing == []


@pytest.mark.skipif(fanout_impls.NO_EXTENSIONS, reason="FANOUT_NO_EXTENSIONS=1")
@pytest.mark.parametrize("module", STUBS)
def test_compiled_docstrings_are_the_stubs(module: str) -> None:
    compiled = importlib.import_module(f"fanout.{module}")
    differ = []
    for name, doc in stub_docs(module).items():
        if name in C_ATTRIBUTES:
            continue
        owner, _, attr = name.rpartition(".")
        cls = getattr(compiled, owner or name)
        if attr in ("__init__", "__new__") and "__init__" not in vars(cls):
            # a cdef class built by __cinit__ (its stub declares __new__): the constructor's docstring is
            # in the class docstring
            got = inspect.cleandoc(cls.__doc__ or "")
        else:
            obj = getattr(cls, attr) if owner else cls
            got = inspect.cleandoc(getattr(obj, "__doc__", None) or "")
        if doc not in got:  # (embedsignature puts the signature line first)
            differ.append(name)
    assert differ == []
