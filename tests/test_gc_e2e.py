"""The cyclic garbage collector and the gateway's connections, over real sockets.

fanout untracks the lists of frames that pile up in a connection's queue between flushes (they hold
only bytes; _writer.pxd "Queues and the cyclic GC"), so that bursts and coalescing no longer promote
thousands of them into the old generation. These tests show that nothing is lost by that: connections
that had such queues are freed after they close, cycles included, round after round.
"""

from __future__ import annotations

import asyncio
import gc

import pytest

from conftest import ws_url
from gateway.session import Session
from support.metrics import metric
from support.waits import wait_until
from support.ws import connected, recv_until, send

pytestmark = pytest.mark.both_loops

CLIENTS = 150
MESSAGES = 40
ROUNDS = 3


def live_sessions() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Session)


def gc_collections(port: int, generation: int) -> float:
    return metric(port, "python_gc_collections_total", f'{{generation="{generation}"}}')


async def test_connections_with_piled_up_queues_are_freed_after_close(gateway_factory):
    # Coalescing holds every flush after one that wrote to >= 2 connections for 20 ms, so the publishes
    # below pile up in the subscribers' queues (lists of frames) and leave in shared writes.
    gw = await gateway_factory(coalesce_us=20_000, coalesce_min_conns=2, coalesce_busy_pct=0)
    assert live_sessions() == 0
    for rnd in range(ROUNDS):
        subs = [await connected(ws_url(gw)) for _ in range(CLIENTS)]
        for ws in subs:
            await send(ws, {"op": "subscribe", "subjects": [{"subject": f"/gc/{rnd}"}]})
            await recv_until(ws, "subscribed")
        pub = await connected(ws_url(gw))
        frames0, syscalls0 = gw.writer.frames_out, gw.writer.syscalls
        for i in range(1, MESSAGES + 1):
            await send(pub, {"op": "publish", "subject": f"/gc/{rnd}", "content": f"m{i}", "id": i})
        for _ in range(MESSAGES):
            await recv_until(pub, "ack")

        async def read_all(ws) -> list[int]:
            return [(await recv_until(ws, "msg"))["seq"] for _ in range(MESSAGES)]

        want = list(range(1, MESSAGES + 1))
        for got in await asyncio.gather(*(read_all(ws) for ws in subs)):
            assert got == want
        # Several frames per write: the queues were lists (the path whose lists fanout untracks).
        assert gw.writer.frames_out - frames0 > gw.writer.syscalls - syscalls0
        assert live_sessions() == CLIENTS + 1
        await asyncio.gather(*(ws.close() for ws in [*subs, pub]))
        await wait_until(lambda: not gw.sessions and not gw._unconnected, "the gateway to see every close")
        # Each closed connection's objects are gone: freed by reference counting or by the collector.
        await wait_until(lambda: live_sessions() == 0, lambda: f"{live_sessions()} sessions still alive")


async def test_metrics_count_gc_collections(gateway_factory):
    gw = await gateway_factory()
    before = await asyncio.to_thread(gc_collections, gw.port, 2)
    gc.collect()
    assert await asyncio.to_thread(gc_collections, gw.port, 2) >= before + 1
