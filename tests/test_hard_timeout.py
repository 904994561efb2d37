"""The hard limits of support/hard_timeout.py, on test runs of their own (pytest in a child process, on
uvloop like the suite): a test that hangs where pytest-timeout cannot end it (awaiting forever on uvloop;
in its teardown after it failed) ends the run with the stacks of its threads and tasks, its failure and
output, and without leaving the Kafka JVMs it started; a thread that never ends does not hang the exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SCALE
from support.kafka_cluster import START_TIMEOUT_S, is_kafka_jvm
from support.waits import wait_until_sync

TESTS = Path(__file__).resolve().parent

CHILD_CONFTEST = """
import os
import uvloop

def pytest_sessionstart(session):
    if os.environ.get("HUNG_RUN_KAFKA"):   # a 1-node cluster for the whole run, its JVM's pid in a file
        from support.kafka_cluster import KafkaCluster
        cluster = KafkaCluster(1).start()
        with open("pid", "w") as f:
            f.write(str(cluster.nodes[0].pid))

def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}
"""
CHILD_TESTS = """
import asyncio
import threading
import pytest

def test_fails_plainly():
    assert 1 + 1 == 3, "arithmetic"

async def test_hangs_in_its_call():
    print("about to hang", flush=True)
    await asyncio.Event().wait()

@pytest.fixture
async def teardown_that_hangs():
    yield
    await asyncio.get_running_loop().run_in_executor(None, threading.Event().wait)

async def test_fails_then_its_teardown_hangs(teardown_that_hangs):
    print("about to fail", flush=True)
    assert False

async def test_starts_processes_then_hangs():
    import os, subprocess, sys
    # a child that starts a grandchild; both PIDs in files, then the test hangs
    sleeper = "import time; time.sleep(600)"
    code = (f"import os, subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', {sleeper!r}]); "
            "open('pids.tmp', 'w').write(str(g.pid)); os.rename('pids.tmp', 'pids'); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code])
    open("child", "w").write(str(child.pid))
    while not os.path.exists("pids"):   # the soft limit (1 s) does not stop this on uvloop; the hard one does
        await asyncio.sleep(0.01)
    await asyncio.Event().wait()

def test_passes_and_leaves_a_thread_that_never_ends():
    threading.Thread(target=threading.Event().wait, name="never-ends").start()
"""


def run_child(tmp_path: Path, *tests: str, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest on CHILD_TESTS::`tests` (in that order) with the hard limits 1 s after a soft timeout of 1 s."""
    (tmp_path / "conftest.py").write_text(CHILD_CONFTEST)
    (tmp_path / "test_child.py").write_text(CHILD_TESTS)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "support.hard_timeout", "-p", "no:cacheprovider",
         "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function", "-o", "timeout=1",
         *(f"test_child.py::{test}" for test in tests)],
        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=2 * START_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(TESTS), "TEST_HARD_TIMEOUT_GRACE": "1", "TEST_EXIT_GRACE": "1", **env})


@pytest.mark.parametrize("test", ["test_hangs_in_its_call", "test_fails_then_its_teardown_hangs"])
def test_a_hung_test_ends_the_run_with_its_stacks_failure_and_output(test: str, tmp_path: Path) -> None:
    run = run_child(tmp_path, test)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert f"hard timeout: test_child.py::{test} still running" in out, out
    dump = out.split("hard timeout:", 1)[1]
    assert "about to " in dump   # what the test printed, its failure if it failed
    assert ("assert False" in dump) == (test == "test_fails_then_its_teardown_hangs")
    assert "Stack of MainThread" in dump   # every thread's stack, and where the waiting task waits:
    assert "Stack of task" in dump and ("await asyncio.Event().wait()" if test == "test_hangs_in_its_call"
                                        else "run_in_executor(None, threading.Event().wait)") in dump, dump


def test_a_hung_test_lists_the_failures_of_the_pass_before_it(tmp_path: Path) -> None:
    """pytest's own summary is never printed after a hard timeout: the dump ends with a line per failure."""
    run = run_child(tmp_path, "test_fails_plainly", "test_hangs_in_its_call")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    listed = out.split("hard timeout: 1 failure(s) in this pass before it", 1)[1]
    assert "FAILED test_child.py::test_fails_plainly (call): AssertionError: arithmetic" in listed, out


def test_a_thread_that_never_ends_does_not_hang_the_exit(tmp_path: Path) -> None:
    run = run_child(tmp_path, "test_passes_and_leaves_a_thread_that_never_ends")
    assert run.returncode == 0, run.stdout + run.stderr   # the run's own status: it passed
    assert "1 passed" in run.stdout
    assert "the test process did not exit" in run.stderr and "--- thread never-ends" in run.stderr, run.stderr


def test_a_hung_run_leaves_none_of_its_processes(tmp_path: Path) -> None:
    """os._exit skips the fixtures that would end a test's subprocesses: the hard timeout kills every
    process the run started, their children too, by PID."""
    pids: list[int] = []
    try:
        run = run_child(tmp_path, "test_starts_processes_then_hangs", TEST_HARD_TIMEOUT_GRACE="3")   # to start both
        pids = [int((tmp_path / name).read_text()) for name in ("child", "pids") if (tmp_path / name).exists()]
        assert run.returncode == 1 and len(pids) == 2, run.stdout + run.stderr
        wait_until_sync(lambda: not any(_alive(pid) for pid in pids), f"processes {pids} gone", 10 * SCALE)
    finally:
        for pid in pids:   # whatever the outcome, nothing of this test stays behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.kafka
def test_a_hung_run_leaves_no_kafka_jvm(tmp_path: Path) -> None:
    pid = 0
    try:
        run = run_child(tmp_path, "test_hangs_in_its_call", HUNG_RUN_KAFKA="1")
    finally:
        if (tmp_path / "pid").exists():
            pid = int((tmp_path / "pid").read_text())
    try:
        assert pid and run.returncode == 1, run.stdout + run.stderr
        wait_until_sync(lambda: not is_kafka_jvm(pid), "the JVM gone (SIGKILLed by the hard timeout)", 10 * SCALE)
    finally:
        if pid and is_kafka_jvm(pid):   # whatever the outcome, nothing of this test stays behind
            os.kill(pid, signal.SIGKILL)
