"""Our Python client against the real gateway over real sockets: recovery after a dropped connection,
URL cycling, and a slow consumer closed with 4000 that recovers everything."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest

from conftest import SCALE, ws_url
from gateway.client import Client
from support.ports import free_port
from support.waits import wait_until
from support.ws import client_frame, connected, raw_upgrade, recv, recv_until, send

pytestmark = pytest.mark.both_loops


async def test_publish_subscribe_with_acks(gateway_factory):
    gw = await gateway_factory()
    async with Client([ws_url(gw)]) as c:
        sub = await c.subscribe("/c/1")
        ack = await c.publish("/c/1", "hello")
        assert ack is not None and ack.seq == 1
        msg = await sub.get(timeout=5 * SCALE)
        assert (msg.content, msg.seq, msg.prev, msg.snapshot) == ("hello", 1, 0, False)
        ack = await c.publish("/c/1", b"\xff\x00")
        msg = await sub.get(timeout=5 * SCALE)
        assert msg.data == b"\xff\x00" and msg.content is None and msg.seq == ack.seq == 2
        assert await c.ping() >= 0


def _kick(gw, predicate=lambda s: True) -> int:
    """Drop client connections server-side, abruptly (like a network failure)."""
    n = 0
    for session in list(gw.sessions):
        if predicate(session):
            session.transport.abort()
            n += 1
    return n


async def test_recovery_after_dropped_connections_no_loss_no_dup_in_order(gateway_factory):
    gw = await gateway_factory(history=10000)
    subjects = [f"/rec/s{i}" for i in range(5)]
    got: dict[str, list[int]] = {s: [] for s in subjects}
    async with Client([ws_url(gw)], backoff_initial=0.01, backoff_max=0.05) as c:
        for s in subjects:
            await c.subscribe(s, lambda m, s=s: got[s].append(int(m.content)))
        pub = await connected(ws_url(gw))
        my_session = next(iter(x for x in gw.sessions if x.subjects))
        total = 600
        for i in range(total):
            s = subjects[i % len(subjects)]
            await send(pub, {"op": "publish", "subject": s, "content": str(i)})
            if i in (150, 300, 450):
                # the subscriber is back (reconnected, resubscribed) before its connection is cut again
                await wait_until(lambda: any(len(x.subjects) == len(subjects) for x in gw.sessions),
                                 "the subscriber's connection with its subscriptions")
                assert _kick(gw, lambda x: x.subjects) == 1  # the subscriber's connection only
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        await send(pub, {"op": "ping", "id": "done"})
        await recv_until(pub, "pong")
        # a sentinel (-1) last in each subject: once every subject has it, nothing more is on its way
        for s in subjects:
            await send(pub, {"op": "publish", "subject": s, "content": "-1"})
        await wait_until(lambda: all(v and v[-1] == -1 for v in got.values()), "the sentinel in every subject",
                         10 * SCALE)
        for s in subjects:
            assert got[s].pop() == -1
        for k, s in enumerate(subjects):
            assert got[s] == list(range(k, total, len(subjects))), s  # every message once, in order
        assert c.stats["reconnects"] >= 3
        assert my_session not in gw.sessions


async def test_client_cycles_urls_and_resubscribes_with_positions(gateway_factory):
    gw = await gateway_factory(heartbeat_ms=200)
    dead_port = free_port()   # nothing listens there (outside the ephemeral range: a retry never connects to itself)
    async with Client([f"ws://127.0.0.1:{dead_port}/ws", ws_url(gw)], backoff_initial=0.01) as c:
        assert c.url == ws_url(gw)
        sub = await c.subscribe("/cy/1")
        await c.publish("/cy/1", "a")
        assert (await sub.get(timeout=5 * SCALE)).content == "a"
        assert c.positions["/cy/1"][1] == 1


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    buf = bytearray()
    try:
        while chunk := sock.recv(1 << 20):
            buf += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return bytes(buf)


def _frames(buf: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i + 2 <= len(buf):
        op, n = buf[i] & 0x0F, buf[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = int.from_bytes(buf[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(buf[i:i + 8], "big"), i + 8
        if i + n > len(buf):
            break
        out.append((op, buf[i:i + n]))
        i += n
    return out


async def test_stalled_reader_closed_4000_others_unaffected_then_recovers(gateway_factory):
    gw = await gateway_factory(max_pending_bytes=256 * 1024, max_message_bytes=128 * 1024, history=5000,
                               history_bytes=64 << 20)
    # the stalled reader: a raw socket with a tiny receive buffer that stops reading after subscribing
    stalled = await asyncio.to_thread(raw_upgrade, gw.port, "/ws", 4096)
    stalled.sendall(client_frame(0x1, b'{"op":"connect"}'))
    stalled.sendall(client_frame(0x1, b'{"op":"subscribe","subjects":[{"subject":"/slow/1"}]}'))
    healthy = await connected(ws_url(gw), max_queue=None)  # reads as fast as the gateway writes
    await send(healthy, {"op": "subscribe", "subjects": [{"subject": "/slow/1"}]})
    first = await recv(healthy)
    epoch = first["epoch"]
    pub = await connected(ws_url(gw))
    payload = "x" * 20000
    total = 400  # 8 MB: far over the 256 KiB limit plus what loopback TCP buffers hold

    async def read_healthy() -> list[int]:
        return [(await recv_until(healthy, "msg", timeout=10 * SCALE))["seq"] for _ in range(total)]

    # The close frame reaches a stalled reader only if it reads again before the gateway's grace runs
    # out; this test is about what it then reads, so it gets a grace no loaded machine exceeds.
    gw.close_grace = 30 * SCALE
    reader = asyncio.create_task(read_healthy())
    drain: asyncio.Future[bytes] | None = None
    for i in range(1, total + 1):
        await send(pub, {"op": "publish", "subject": "/slow/1", "content": f"{i}:{payload}"})
        await asyncio.sleep(0.001)  # a paced publisher: the healthy reader keeps up, the stalled one cannot
        if drain is None and gw.writer.overflows:
            # overflowed and closed: from now on the stalled reader reads everything it was sent
            drain = asyncio.ensure_future(asyncio.to_thread(_read_all, stalled, 3 * SCALE))
    assert await reader == list(range(1, total + 1))  # the healthy subscriber gets all, in order
    await wait_until(lambda: gw.writer.overflows >= 1, "the stalled reader's overflow")
    if drain is None:
        drain = asyncio.ensure_future(asyncio.to_thread(_read_all, stalled, 3 * SCALE))
    # the stalled one: whole frames in order, then a 4000 close
    frames = _frames(await drain)
    stalled.close()
    texts = [json.loads(p) for op, p in frames if op == 0x1]
    closes = [p for op, p in frames if op == 0x8]
    assert closes and struct.unpack("!H", closes[0][:2])[0] == 4000
    msgs = [m for m in texts if m["op"] == "msg"]
    got = [m["seq"] for m in msgs]
    assert got == list(range(1, len(got) + 1)) and len(got) < total
    assert gw.writer.overflows >= 1
    # it reconnects with its last position and recovers the rest, exactly once, in order
    again = await connected(ws_url(gw))
    last = got[-1] if got else 0
    await send(again, {"op": "subscribe", "subjects": [{"subject": "/slow/1", "epoch": epoch, "seq": last}]})
    s = await recv(again)
    assert s["recovered"] is True and s["seq"] == total
    rest = [(await recv_until(again, "msg"))["seq"] for _ in range(total - last)]
    assert rest == list(range(last + 1, total + 1))


# ---- 1.1: the token provider against a real gateway ---------------------------------------------------

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def _token(sub: str = "reader", lifetime: float = 2.0) -> str:
    import time

    import jwt

    return jwt.encode({"sub": sub, "exp": int(time.time() + lifetime), "sub_allow": ["/>"],
                       "pub_allow": ["/>"]}, SECRET, algorithm="HS256")


async def _publish_while(gw, subject: str, until, start: int = 0) -> int:  # type: ignore[no-untyped-def]
    """Publish start+1, start+2, ... (each acknowledged) until `until(last)`; returns the last number."""
    pub = await connected(ws_url(gw), token=_token("writer", 600))
    n = start
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30 * SCALE
    while not until(n):
        assert loop.time() < deadline, "the condition never came"
        n += 1
        await send(pub, {"op": "publish", "subject": subject, "content": str(n), "id": n})
        assert (await recv_until(pub, "ack", skip=("hb",)))["id"] == n
        await asyncio.sleep(0.02)
    await pub.close()
    return n


async def test_token_provider_refreshes_before_exp_and_the_session_lives_on(gateway_factory):
    gw = await gateway_factory(jwt_secret=SECRET, jwt_leeway_ms=0, heartbeat_ms=500)
    got: list[int] = []
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        return _token(lifetime=2.0)

    async with Client([ws_url(gw)], token=provider) as c:
        await c.subscribe("/tok/a", lambda m: got.append(int(m.content)))
        # three token lifetimes: without refreshes the gateway would have closed it (4001) twice
        n = await _publish_while(gw, "/tok/a", lambda _: c.stats["refreshes"] >= 3)
        await wait_until(lambda: len(got) >= n, "every published message delivered")
        assert got == list(range(1, n + 1))
        assert c.stats["reconnects"] == 0 and c.stats["expired"] == 0 and calls >= 4


async def test_close_4001_then_fresh_token_reconnect_and_recover_with_no_message_lost(gateway_factory):
    """Refreshes are refused (the provider hands out a token for another `sub`), so the token runs out:
    close 4001; the client gets a fresh token, reconnects and recovers every message published
    meanwhile, in order."""
    gw = await gateway_factory(jwt_secret=SECRET, jwt_leeway_ms=0, heartbeat_ms=500, history=10000)
    got: list[int] = []
    client: Client | None = None
    connects = 0

    def provider() -> str:
        nonlocal connects
        if client is not None and client.connected:  # asked to refresh: a token the gateway refuses
            return _token(sub="someone-else", lifetime=600)
        connects += 1
        return _token(lifetime=2.0 if connects == 1 else 600)

    events: list[str] = []
    client = Client([ws_url(gw)], token=provider, backoff_initial=0.01, backoff_max=0.05,
                    on_event=lambda name, info: events.append(name))
    try:
        await client.connect()
        await client.subscribe("/tok/b", lambda m: got.append(int(m.content)))
        n = await _publish_while(gw, "/tok/b", lambda _: client.stats["expired"] >= 1 and client.connected)
        later = n + 20  # and some more on the new connection
        n = await _publish_while(gw, "/tok/b", lambda last: last >= later, start=n)
        await wait_until(lambda: len(got) >= n, "every published message delivered")
        assert got == list(range(1, n + 1)), "nothing lost, nothing twice, in order"
        assert "refresh_failed" in events and "token_expired" in events and "fatal" not in events
        assert client.stats["reconnects"] == 1 and connects == 2
    finally:
        await client.close()


# ---- the application's own callbacks calling back into the client ----------------------------------


async def test_an_async_callback_may_unsubscribe_its_own_subscription(gateway_factory):
    """A coroutine callback that awaits `unsubscribe` of its own subject (stop at a message): it
    must not wait for its own callback task to end, i.e. for itself (it hung for `timeout`, then
    was cancelled)."""
    gw = await gateway_factory()
    marks: list[str] = []
    seen: list[str] = []
    async with Client([ws_url(gw)]) as c:
        async def callback(m) -> None:  # type: ignore[no-untyped-def]
            seen.append(m.content)
            if m.content == "stop":
                try:
                    await c.unsubscribe("/cb/a")
                except asyncio.CancelledError:
                    marks.append("cancelled")
                    raise
                marks.append("unsubscribed")

        sub = await c.subscribe("/cb/a", callback)
        await c.publish("/cb/a", "stop")
        await wait_until(lambda: marks, "the callback's unsubscribe to return", 30 * SCALE)
        assert marks == ["unsubscribed"] and sub.closed
        # nothing after it reaches the callback: a sentinel on another subject proves the later
        # publish to /cb/a has been through the gateway
        other = await c.subscribe("/cb/b")
        await c.publish("/cb/a", "after")
        await c.publish("/cb/b", "sentinel")
        assert (await other.get(timeout=5 * SCALE)).content == "sentinel"
        assert seen == ["stop"]


async def test_an_async_callback_may_close_the_client(gateway_factory):
    """`close()` awaited inside a coroutine callback returns (it "never raises"), and the callback
    goes on after it, instead of being cancelled by close() itself."""
    gw = await gateway_factory()
    marks: list[str] = []
    c = Client([ws_url(gw)])
    await c.connect()
    try:
        async def callback(m) -> None:  # type: ignore[no-untyped-def]
            try:
                await c.close()
            except BaseException as exc:
                marks.append(type(exc).__name__)
                raise
            marks.append("closed")

        await c.subscribe("/cb/c", callback)
        await c.publish("/cb/c", "bye")
        await wait_until(lambda: marks, "the callback's close to return", 30 * SCALE)
        assert marks == ["closed"] and not c.connected
    finally:
        await c.close()


async def test_connect_after_close_does_not_resubscribe_the_ended_subscriptions(gateway_factory):
    """close() ends every subscription (their iterators stop): a later connect() of the same Client
    must not subscribe to them again behind the application's back (they took subscription slots,
    --max-subscriptions, and their messages were read and thrown away)."""
    gw = await gateway_factory()
    c = Client([ws_url(gw)])
    await c.connect()
    try:
        old = await c.subscribe("/re/1")
        await c.close()
        assert old.closed
        await c.connect()
        new = await c.subscribe("/re/2")
        # (the first connection's session may still be on its way out: only the new one counts)
        assert [set(s.subjects) for s in gw.sessions if "/re/2" in s.subjects] == [{"/re/2"}]
        await c.publish("/re/2", "x")
        assert (await new.get(timeout=5 * SCALE)).content == "x"
    finally:
        await c.close()


async def test_a_publish_lost_with_its_connection_mid_send_leaves_no_unretrieved_future(gateway_factory, caplog):
    """A publish over --max-message-bytes: the gateway closes 1009 from the frame's header while the
    client is still sending it. The publish fails with ConnectionClosedError (1009), and that is all:
    its ack future, failed meanwhile by the connection's end, must not be left unretrieved (asyncio
    then logged "Future exception was never retrieved" at ERROR when it was collected)."""
    import gc
    import logging

    from gateway.client import ConnectionClosedError

    gw = await gateway_factory()  # --max-message-bytes 1 MiB
    code = None
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        async with Client([ws_url(gw)], backoff_initial=0.01, backoff_max=0.05) as c:
            try:
                await c.publish("/big/1", "x" * (16 << 20))  # more than loopback buffers take at once
            except ConnectionClosedError as exc:
                code = exc.close_code
            gc.collect()
    assert code == 1009
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text
