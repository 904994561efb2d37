"""What the suite imports: the installed package (scripts/test.sh installs the built wheel into a venv outside
the checkout), with fanout's compiled modules in the first pass and its pure-Python twins in the second
(FANOUT_NO_EXTENSIONS=1); never the checkout's sources, which have no compiled modules."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import json
import os
import sysconfig
from pathlib import Path

import pytest

import fanout
import gateway

ROOT = Path(__file__).resolve().parent.parent
COMPILED_MODULES = ("_frame", "_ring", "_writer", "_ws", "_msgs")
INSTALLED = os.environ.get("GATEWAY_TEST_INSTALLED") == "1"


def _is_extension(name: str) -> bool:
    mod = importlib.import_module(f"fanout.{name}")
    return isinstance(getattr(mod, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def test_fanout_runs_the_implementation_asked_for() -> None:
    if os.environ.get("FANOUT_NO_EXTENSIONS") == "1":
        assert not fanout.COMPILED
        assert fanout.Writer.__module__ == fanout.Ring.__module__ == fanout.WSConn.__module__ == "fanout._reference"
    else:
        assert fanout.COMPILED
        assert all(_is_extension(name) for name in COMPILED_MODULES)
        # what the package exports is the compiled classes, not only importable next to them
        assert (fanout.Writer.__module__, fanout.Ring.__module__, fanout.WSConn.__module__,
                fanout.encode_text.__module__, fanout.publish_run.__module__) == (
            "fanout._writer", "fanout._ring", "fanout._ws", "fanout._frame", "fanout._msgs")


@pytest.mark.skipif(not INSTALLED, reason="scripts/test.sh sets GATEWAY_TEST_INSTALLED=1 (a venv with the wheel)")
def test_the_installed_package_is_imported_not_the_checkout() -> None:
    site = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    for mod in (fanout, gateway):
        assert mod.__file__ is not None
        path = Path(mod.__file__).resolve()
        assert any(path.is_relative_to(s) for s in site), f"{mod.__name__} from {path}, not from {site}"
        assert path.parent != ROOT / mod.__name__, f"{mod.__name__} imported from the checkout"
    dist = importlib.metadata.distribution("kafka-ws-gateway")
    assert dist.version == gateway.__version__
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    assert not direct_url.get("dir_info", {}).get("editable"), "an editable install runs the checkout"
    # the compiled modules ship in every pass (pass 2 only chooses not to use them), and no generated C
    files = {str(f) for f in dist.files or []}
    for name in COMPILED_MODULES:
        assert any(f.startswith(f"fanout/{name}.") and f.endswith(".so") for f in files), (name, sorted(files))
        assert _is_extension(name)
    assert not [f for f in files if f.endswith(".c")]
