"""Bounded waiting for tests: poll a condition, fail with what was awaited (no timing assertions).

The one polling helper of the suite (support.fanout_net waits on an asyncio.Event where something
signals; everything else polls here): `wait_until` in an event loop, `wait_until_sync` outside one (the
Kafka cluster helper, which runs in threads of its own and as a script).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable

SCALE = float(os.environ.get("TEST_TIMEOUT_SCALE", "1"))
WAIT = 10.0 * SCALE


async def wait_until(cond: Callable[[], bool | Awaitable[bool]], what: str | Callable[[], str],
                     timeout: float = WAIT, interval: float = 0.01) -> None:
    """Return once `cond()` (a function or a coroutine function) is true; test it every `interval` s.

    Raises:
        AssertionError: `cond()` was still false after `timeout` seconds ("timed out waiting for `what`";
            a callable `what` is called then, so the message can tell the state at the timeout).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ok = cond()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(interval)


def wait_until_sync(cond: Callable[[], bool], what: str | Callable[[], str], timeout: float = WAIT,
                    interval: float = 0.01) -> None:
    """`wait_until` for code that runs outside an event loop (it blocks its thread while it waits).

    Raises:
        AssertionError: as `wait_until`; what `cond()` raises goes to the caller at once.
    """
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(interval)
