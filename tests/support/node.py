"""Node.js for client.js's tests: the `node` binary and client.js as an ES module node can import."""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import pytest


def node() -> str:
    """The path of `node`; fails the test (never skips it) when there is none."""
    path = shutil.which("node")
    if path is None:
        pytest.fail("no `node` on PATH: client.js's tests need Node.js (scripts/test.sh installs Debian's "
                    "nodejs; by hand: apt-get install nodejs)", pytrace=False)
    return path


def client_module(directory: Path) -> Path:
    """client.js as served (from the installed package), written to `directory` as client.mjs (so node
    loads it as an ES module)."""
    dest = directory / "client.mjs"
    dest.write_bytes(importlib.resources.files("gateway").joinpath("static", "client.js").read_bytes())
    return dest
