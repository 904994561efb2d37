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
