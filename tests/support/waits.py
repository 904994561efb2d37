"""Bounded waiting for tests: poll a condition, fail with what was awaited (no timing assertions)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

SCALE = float(os.environ.get("TEST_TIMEOUT_SCALE", "1"))
WAIT = 10.0 * SCALE


async def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
