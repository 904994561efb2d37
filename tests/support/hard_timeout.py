"""The hard limit of one test, setup to teardown: a pytest plugin (tests/conftest.py imports its hooks).

pytest-timeout (`timeout` in pyproject) is the soft limit: its SIGALRM fails a test where Python can be
interrupted. It has two holes, and either lets a hung test run until CI kills the job (a CI run hung in
an event loop's close for 90 minutes):
  - on uvloop the alarm's exception is raised inside a loop callback, and the loop logs and drops it:
    a test awaiting forever goes on (as does a `loop.close()` that waits for an executor thread);
  - pytest-timeout cancels its timer as soon as a test fails (its pytest_exception_interact hook, meant
    for --pdb), so the teardown after a failure (fixtures, the event loop's close) has no limit at all.
So, HARD_GRACE_S after the soft limit, whatever the test's outcome so far, this dumps every thread's
stack, every pending task's (an asyncio test waits in a task: the main thread shows only the loop),
the test's failure if it failed (its report is never printed otherwise), what it printed and a line
for each failure of the pass before it (pytest's summary is never printed either), SIGKILLs
the Kafka JVMs and every other process this process started (os._exit skips atexit and the fixtures
that would end them), and ends the process with os._exit(1).
scripts/test.sh then goes on with its next pass.

The same for the end of the run: Python joins every non-daemon thread before it exits (an executor's
worker among them) and runs atexit only after that, so a thread that never returns hung the process after
its summary. EXIT_GRACE_S after pytest is done, the stacks are dumped, the processes killed, and the process
ends with the run's exit status.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_timeout

#: seconds after the soft limit (TEST_HARD_TIMEOUT_GRACE overrides; its own tests use 1)
HARD_GRACE_S = float(os.environ.get("TEST_HARD_TIMEOUT_GRACE", "60"))
#: seconds the process may take to exit once pytest is done (TEST_EXIT_GRACE overrides)
EXIT_GRACE_S = float(os.environ.get("TEST_EXIT_GRACE", "60"))
#: the reports of the phases (setup, call) of the running test done so far
_reports: list[pytest.TestReport] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # pytest-timeout's own reading of the limit (its marker, --timeout, PYTEST_TIMEOUT, the ini value)
    soft = pytest_timeout._get_item_settings(item).timeout
    if not soft or soft <= 0:
        return (yield)
    limit = soft + HARD_GRACE_S
    timer = threading.Timer(limit, _expire, (item, limit))
    timer.name = f"hard timeout of {item.nodeid}"
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()
        _reports.clear()


#: every failure of this pass so far, a line each: pytest prints its summary only at the end, which a hard
#: timeout never reaches, so _expire prints these (a CI log then shows what failed before the hang too)
_failures: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _reports.append(report)
    if report.failed:
        _failures.append(f"{report.nodeid} ({report.when}): {_reason(report)}")


def _reason(report: pytest.TestReport) -> str:
    """The failure's own line ("E   ..." of the traceback), else the last line of its report, cut to 300."""
    lines = [line for line in report.longreprtext.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    return (errors[0][1:].strip() if errors else lines[-1].strip() if lines else "?")[:300]


_exit_status = 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    timer = threading.Timer(EXIT_GRACE_S, _exit_hung, (_exit_status,))
    timer.name = "hard timeout of the exit"
    timer.daemon = True   # not joined at exit: it is what ends a process that does not
    timer.start()


def _exit_hung(status: int) -> None:
    try:
        sys.stderr.write(f"\n+++ hard timeout: the test process did not exit {EXIT_GRACE_S:.0f} s after pytest was "
                         f"done; the threads it waits for:\n")
        for ident, frame in sys._current_frames().items():
            if ident != threading.get_ident():
                name = next((t.name for t in threading.enumerate() if t.ident == ident), "?")
                sys.stderr.write(f"--- thread {name} ({ident}):\n{''.join(traceback.format_stack(frame))}")
        sys.stderr.write(f"+++ hard timeout: every process it started is killed, exit status {status} (the run's)\n")
    finally:
        _kill_children_and_exit(status)


def _kill_children_and_exit(status: int) -> None:
    try:
        _kill_descendants()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _kill_descendants() -> None:
    """SIGKILL every process this one started and their own children (the Kafka JVMs, gateway
    subprocesses, Tansu, node, chromium), by PID: os._exit skips atexit and the fixtures that would end
    them, and left running they would hold their ports and a share of the CPU through the rest of the CI run."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue   # gone meanwhile
        children.setdefault(ppid, []).append(int(entry))
    todo = [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _expire(item: pytest.Item, limit: float) -> None:
    """What pytest-timeout's thread method does, plus the processes this one started."""
    terminal: Any = item.config.get_terminal_writer()
    try:
        capman = item.config.pluginmanager.getplugin("capturemanager")
        out = err = ""
        if capman is not None:
            capman.suspend_global_capture(in_=True)
            out, err = capman.read_global_capture()
        terminal.sep("+", f"hard timeout: {item.nodeid} still running {limit:.0f} s after its setup began")
        for report in list(_reports):
            if report.failed:
                terminal.sep("~", f"its {report.when} failed")
                terminal.write(f"{report.longrepr}\n")
            for title, content in report.sections:
                terminal.sep("~", title)
                terminal.write(content[-20_000:])
        for name, text in (("stdout", out), ("stderr", err)):
            if text:
                terminal.sep("~", f"captured {name} (last 20000 characters)")
                terminal.write(text[-20_000:])
        pytest_timeout.dump_stacks(terminal)
        _dump_tasks(terminal)
        terminal.sep("+", f"hard timeout: {len(_failures)} failure(s) in this pass before it (pytest's own "
                          f"summary will not be printed)")
        for line in _failures:
            terminal.write(f"FAILED {line}\n")
        terminal.sep("+", "hard timeout: every thread's stack is above; every process pytest started is killed, "
                          "pytest exits")
    except Exception:  # noqa: BLE001 - the exit below matters more than the report
        traceback.print_exc()
    finally:
        terminal.flush()
        _kill_children_and_exit(1)


def _dump_tasks(terminal: Any) -> None:
    """The stack of every pending task of every event loop not closed (read from this other thread: the
    process ends right after, and a list changed meanwhile only costs that loop's tasks)."""
    # type(), not isinstance(): gc also lists weak proxies, and isinstance() on a dead one raises ReferenceError
    for loop in [obj for obj in gc.get_objects() if issubclass(type(obj), asyncio.AbstractEventLoop)]:
        if loop.is_closed():
            continue
        try:
            tasks = list(asyncio.all_tasks(loop))
        except RuntimeError:
            continue
        for task in tasks:
            terminal.sep("~", f"Stack of task {task.get_name()} ({type(loop).__name__}), outermost first")
            terminal.write(_awaiting(task.get_coro()))


def _awaiting(coro: Any) -> str:
    """The frames of a coroutine and of what it awaits, down to the innermost (Task.print_stack shows only
    the outermost one), through async generators (a fixture's teardown awaits one's __anext__)."""
    frames = []
    seen = 0
    while coro is not None and seen < 100:
        seen += 1
        if type(coro).__name__ == "async_generator_asend":   # no attribute leads to its generator: gc does
            coro = next((r for r in gc.get_referents(coro) if inspect.isasyncgen(r)), None)
            continue
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append((frame, frame.f_lineno))
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
                or getattr(coro, "gi_yieldfrom", None))
    return "".join(traceback.StackSummary.extract(frames).format())
