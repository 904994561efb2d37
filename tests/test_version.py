"""What a new user meets first: --version, the program's name, errors that name the setting's source,
the help text, running inside the checkout, which fanout runs, and what the wheel installs."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import fanout
import gateway
from conftest import SCALE
from gateway import cli, config

DIST = "kafka-ws-gateway"
SCRIPT = Path(sys.executable).parent / "kafka-ws-gateway"  # the console script pip put next to python
SOURCE_TREE = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict[str, str] | None = None, cwd: str | Path = "/") -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=60 * SCALE,
                          env={**os.environ, **(env or {})} if env is not None else None)


def test_the_version_has_one_source():
    """pyproject.toml reads gateway.__version__: the installed distribution says the same."""
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", gateway.__version__)
    assert importlib.metadata.version(DIST) == gateway.__version__


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"kafka-ws-gateway {gateway.__version__}"


@pytest.mark.parametrize("command,name", [
    ([str(SCRIPT)], "kafka-ws-gateway"),
    ([sys.executable, "-m", "gateway"], "python -m gateway"),
])
def test_version_and_help_call_the_program_by_its_name(command, name):
    version = _run([*command, "--version"])
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"{name} {gateway.__version__}"
    help_ = _run([*command, "serve", "--help"])
    assert help_.returncode == 0, help_.stderr
    assert help_.stdout.startswith(f"usage: {name} serve ")
    bad = _run([*command, "serve", "--port", "nope"])
    assert bad.returncode == 2
    assert bad.stderr.strip() == (f"{name}: error: --port: bad value 'nope': "
                                  "invalid literal for int() with base 10: 'nope'")


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(config.ConfigError, match=r"^GATEWAY_PORT: bad value 'abc': "):
        config.load({}, env={"GATEWAY_PORT": "abc"})
    with pytest.raises(config.ConfigError, match=r"^GATEWAY_PUBLISH_RATE: bad value '-1': must be >= 0"):
        config.load({}, env={"GATEWAY_PUBLISH_RATE": "-1"})
    with pytest.raises(config.ConfigError, match=r"^GATEWAY_JWT_SECRET is empty"):
        config.load({}, env={"GATEWAY_JWT_SECRET": " "})
    # the flag wins over the environment, and then the error names the flag
    with pytest.raises(config.ConfigError, match=r"^--port: bad value 'x'"):
        config.load({"port": "x"}, env={"GATEWAY_PORT": "8000"})
    assert config.load({"port": "9000"}, env={"GATEWAY_PORT": "abc"}).port == 9000


def test_a_bad_file_value_names_the_file_and_key(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text('port = "abc"\n')
    with pytest.raises(config.ConfigError, match=rf"^--config {re.escape(str(f))}: key 'port': bad value 'abc'"):
        config.load({}, env={}, file=str(f))
    f.write_text('max-subscriptions = 0\n')
    with pytest.raises(config.ConfigError, match=r"key 'max-subscriptions': bad value 0: must be > 0"):
        config.load({}, env={}, file=str(f))


def test_the_command_line_reports_the_variable():
    proc = _run([str(SCRIPT), "serve"], env={"GATEWAY_PORT": "abc"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("kafka-ws-gateway: error: GATEWAY_PORT: bad value 'abc': ")
    assert len(proc.stderr.splitlines()) == 1


def _help_blocks(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    blocks = re.split(r"\n  (?=--)", out.split("options:", 1)[1])
    return {b.split()[0]: " ".join(b.split()) for b in blocks if b.startswith("--")}


def test_help_gives_each_flag_one_default_at_most(capsys):
    blocks = _help_blocks(capsys)
    assert set(blocks) >= {"--" + name.replace("_", "-") for name in config.FIELDS}
    for _flag, text in blocks.items():
        assert text.count("default") <= 1, text
    assert "(default: host-pid; env GATEWAY_NODE_ID)" in blocks["--node-id"]
    assert "(default: 8800; env GATEWAY_PORT)" in blocks["--port"]
    assert "None" not in blocks["--kafka"]  # no default: the help says only where else it may come from


def test_serve_inside_an_uncompiled_source_tree_says_what_to_do(tmp_path):
    """`python -m gateway` puts the current directory first on sys.path: inside the checkout it imports
    the source tree, whose .pyx were never compiled (a copy of it here: the checkout may hold an
    in-place build)."""
    for package in ("gateway", "fanout"):
        shutil.copytree(SOURCE_TREE / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "FANOUT_NO_EXTENSIONS"}
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0"], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=60 * SCALE)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("python -m gateway: error: the compiled fanout extension (fanout._")
    assert str(tmp_path / "fanout") in line and "pip install ." in line and "scripts/serve.sh" in line


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5 * SCALE) as resp:
        return bytes(resp.read())


@pytest.mark.parametrize("twins", [False, True], ids=["compiled", "pure-python"])
async def test_start_up_line_healthz_and_metrics_say_which_fanout_runs(twins):
    env = {k: v for k, v in os.environ.items() if k != "FANOUT_NO_EXTENSIONS"}
    if twins:
        env["FANOUT_NO_EXTENSIONS"] = "1"
    kind = "pure-Python" if twins else "compiled"
    proc = subprocess.Popen([str(SCRIPT), "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/", env=env)
    try:
        line = await asyncio.to_thread(proc.stdout.readline)  # type: ignore[union-attr]
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        assert line.startswith(f"gateway {gateway.__version__} ")
        assert f"fanout {kind}" in line
        base = f"http://127.0.0.1:{m.group(1)}"
        health = json.loads(await asyncio.to_thread(_get, base + "/healthz"))
        assert (health["version"], health["fanout"]) == (gateway.__version__, kind)
        metrics = (await asyncio.to_thread(_get, base + "/metrics")).decode()
        assert re.search(rf"^gateway_fanout_compiled {0.0 if twins else 1.0}$", metrics, re.M), metrics
        assert f'gateway_build_info{{fanout="{kind}",version="{gateway.__version__}"}} 1.0' in metrics
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10 * SCALE)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_this_process_runs_the_fanout_it_was_asked_for():
    """The suite's two passes: the compiled modules, then the twins (FANOUT_NO_EXTENSIONS=1)."""
    from gateway.server import FANOUT_KIND

    twins = os.environ.get("FANOUT_NO_EXTENSIONS") == "1"
    assert fanout.COMPILED is (not twins)
    assert ("pure-Python" if twins else "compiled") == FANOUT_KIND
    assert fanout.Writer.__module__ == ("fanout._reference" if twins else "fanout._writer")


def test_the_installed_wheel_has_compiled_modules_and_sources_but_no_generated_c():
    """pip installs what the wheel holds, and its RECORD lists every file of it."""
    files = [str(f) for f in importlib.metadata.files(DIST) or []]
    fanout_files = {f.split("/", 1)[1] for f in files if f.startswith("fanout/")}
    assert not [f for f in fanout_files if f.endswith((".c", ".html"))], fanout_files
    for module in ("_frame", "_ring", "_writer", "_ws"):
        assert any(re.fullmatch(rf"{module}\.cpython-.*\.so", f) for f in fanout_files), (module, fanout_files)
        assert {f"{module}.pyx", f"{module}.pxd", f"{module}.pyi"} <= fanout_files
