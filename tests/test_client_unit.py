"""gateway.client against a scripted fake gateway (tests/support/client_fakegw.py).

Waits are bounded by one timeout unit T (scaled by TEST_TIMEOUT_SCALE); no timing is asserted.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.client import (
    Ack,
    Client,
    ConnectionClosedError,
    GatewayError,
    Message,
    Subscription,
    backoff_delay,
    classify,
    content_fields,
    decode_message,
)
from support.client_fakegw import FakeConn, FakeGateway, T
from support.ports import free_port

S1 = "/matches/football/5"
S2 = "/matches/football/6"


# --------------------------------------------------------------------------- helpers


class Events:
    """on_event recorder with a waiter per event name."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._cond = asyncio.Condition()

    def __call__(self, name: str, info: dict[str, Any]) -> None:
        self.seen.append((name, info))
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    def names(self) -> list[str]:
        return [n for n, _ in self.seen]

    async def wait(self, name: str, count: int = 1) -> dict[str, Any]:
        async with asyncio.timeout(T), self._cond:
            await self._cond.wait_for(lambda: self.names().count(name) >= count)
        return [i for n, i in self.seen if n == name][count - 1]


@asynccontextmanager
async def client_for(*urls: str, **kwargs: Any) -> AsyncIterator[Client]:
    kwargs.setdefault("backoff_initial", 0.01)
    kwargs.setdefault("backoff_max", 0.05)
    kwargs.setdefault("rng", random.Random(1))
    client = Client(list(urls), **kwargs)
    try:
        yield client
    finally:
        await client.close()


async def connect(client: Client, gw: FakeGateway, **handshake: Any) -> tuple[FakeConn, dict[str, Any]]:
    task = asyncio.create_task(client.connect(timeout=T))
    conn = await gw.accept()
    hello = await conn.handshake(**handshake)
    async with asyncio.timeout(T):
        await task
    return conn, hello


async def subscribe(
    client: Client,
    conn: FakeConn,
    subject: str,
    callback: Callable[[Message], Any] | None = None,
    **subscribed: Any,
) -> tuple[Subscription, dict[str, Any]]:
    task = asyncio.create_task(client.subscribe(subject, callback))
    frame = await conn.expect("subscribe")
    await conn.subscribed(subject, **subscribed)
    async with asyncio.timeout(T):
        return await task, frame


async def take(sub: Subscription, n: int) -> list[Message]:
    return [await sub.get(timeout=T) for _ in range(n)]


def unused_port() -> int:
    """A port nothing listens on, outside the ephemeral range (a client retrying it never connects to itself)."""
    return free_port()


# --------------------------------------------------------------------------- sans-I/O parts


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    initial, maximum = 0.05, 5.0
    caps = [min(maximum, initial * 2**i) for i in range(12)]
    assert caps[:4] == [0.05, 0.1, 0.2, 0.4] and caps[-1] == maximum
    # One seeded rng across attempts: each delay is one uniform draw over [0, cap(attempt)].
    rng, reference = random.Random(42), random.Random(42)
    got = [backoff_delay(i, initial, maximum, rng) for i in range(12)]
    assert got == [reference.uniform(0, c) for c in caps]
    # Same draw u in [0, 1) on every attempt: the delay doubles until the cap (grows).
    fixed = [backoff_delay(i, initial, maximum, random.Random(7)) for i in range(12)]
    u = random.Random(7).random()
    assert fixed == pytest.approx([u * c for c in caps])
    # Jittered: different seeds, different delays for the same attempt.
    assert len({backoff_delay(5, initial, maximum, random.Random(s)) for s in range(20)}) > 1
    assert backoff_delay(10_000, initial, maximum, random.Random(0)) <= maximum


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=500), st.integers(min_value=0, max_value=2**32))
def test_backoff_bounds(attempt: int, seed: int) -> None:
    delay = backoff_delay(attempt, 0.05, 5.0, random.Random(seed))
    assert 0.0 <= delay <= min(5.0, 0.05 * 2.0 ** min(attempt, 64))


def test_classify() -> None:
    assert classify(None, "e", 7, 6) == "deliver"
    assert classify(("e", 3), "e", 4, 3) == "deliver"
    assert classify(("e", 3), "e", 4, None) == "deliver"
    assert classify(("e", 3), "e", 3, 2) == "duplicate"
    assert classify(("e", 3), "e", 1, 0) == "duplicate"
    assert classify(("e", 3), "e", 5, 4) == "gap"
    assert classify(("e", 3), "e", 9, 8, snapshot=True) == "deliver"
    assert classify(("e", 3), "e", 9, 8, skip_prev=True) == "deliver"
    assert classify(("e", 3), "e", 2, 1, snapshot=True) == "duplicate"
    assert classify(("old", 30), "e", 1, 0) == "deliver"


@settings(deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=60))
def test_classify_reorders_nothing(arrivals: list[int]) -> None:
    """Feeding any arrival order of one epoch (prev = seq - 1): what is delivered is strictly
    increasing and contiguous; everything else is a duplicate or a gap."""
    last: tuple[str, int] | None = None
    delivered: list[int] = []
    for seq in arrivals:
        verdict = classify(last, "e", seq, seq - 1)
        if verdict == "deliver":
            delivered.append(seq)
            last = ("e", seq)
    assert all(b == a + 1 for a, b in zip(delivered, delivered[1:]))


@settings(deadline=None)
@given(st.binary(max_size=64))
def test_content_fields_roundtrip(raw: bytes) -> None:
    fields = content_fields(raw)
    frame = {"subject": S1, "epoch": "e", "seq": 1, **fields}
    msg = decode_message(frame)
    assert msg is not None and msg.data == raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        assert set(fields) == {"content_b64"} and msg.content is None
    else:
        assert fields == {"content": text} and msg.content == text


def test_decode_message_rejects_malformed() -> None:
    assert decode_message({"subject": S1, "epoch": "e", "seq": "1", "content": ""}) is None
    assert decode_message({"subject": S1, "seq": 1, "content": ""}) is None
    assert decode_message({"subject": S1, "epoch": "e", "seq": 1, "content_b64": "%%"}) is None
    msg = decode_message({"subject": S1, "epoch": "e", "seq": 2, "prev": 1, "ts": 5,
                          "content": "é", "snapshot": True, "future_field": 1})
    assert msg == Message(S1, "é", "é".encode(), "e", 2, 1, 5, True)


def test_bad_url_is_refused_early() -> None:
    with pytest.raises(ValueError):
        Client("http://127.0.0.1:1/ws")
    with pytest.raises(ValueError):
        Client([])


# --------------------------------------------------------------------------- session


async def test_connect_handshake() -> None:
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, token="tok", name="t/1", on_event=events) as client:
        conn, hello = await connect(client, gw, heartbeat_ms=15000, session="abc", server="n1")
        assert hello == {"op": "connect", "client": "t/1", "token": "tok"}
        assert (client.session, client.server, client.heartbeat_ms) == ("abc", "n1", 15000)
        assert client.connected and client.url == gw.url
        assert events.names() == ["connected"]


async def test_ping_pong() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        task = asyncio.create_task(client.ping(timeout=T))
        frame = await conn.expect("ping")
        await conn.send({"op": "hb"})
        await conn.send({"op": "pong", "id": frame["id"]})
        assert await task >= 0.0


async def test_connect_cycles_past_an_unreachable_url() -> None:
    events = Events()
    dead = f"ws://127.0.0.1:{unused_port()}/ws"
    async with FakeGateway() as gw, client_for(dead, gw.url, on_event=events) as client:
        await connect(client, gw)
        assert client.url == gw.url
        assert events.names()[:2] == ["connect_failed", "reconnecting"]


async def test_connect_gives_up_after_max_attempts_with_growing_jittered_backoff() -> None:
    events = Events()
    dead = f"ws://127.0.0.1:{unused_port()}/ws"
    async with client_for(dead, max_reconnect_attempts=4, on_event=events, rng=random.Random(9),
                          backoff_initial=0.001, backoff_max=1.0) as client:
        with pytest.raises(ConnectionClosedError):
            await client.connect(timeout=T)
        assert not client.connected
        waits = [i for n, i in events.seen if n == "reconnecting"]
        assert [w["attempt"] for w in waits] == [0, 1, 2]  # no wait after the last failure
        reference = random.Random(9)
        assert [w["delay"] for w in waits] == [reference.uniform(0, 0.001 * 2**i) for i in range(3)]
        assert events.names().count("connect_failed") == 4 and events.names()[-1] == "fatal"


# --------------------------------------------------------------------------- subscribing


async def test_subscribe_and_deliver_in_order() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        sub, frame = await subscribe(client, conn, S1, seq=7, recovered=False)
        assert frame == {"op": "subscribe", "subjects": [{"subject": S1}]}
        assert (sub.subject, sub.epoch, sub.seq, sub.recovered) == (S1, "e1", 7, False)
        await conn.msg(S1, 7, 6, "snap", snapshot=True)
        await conn.msg(S1, 8, 7, "live")
        snap, live = await take(sub, 2)
        assert snap.snapshot and snap.content == "snap" and snap.data == b"snap"
        assert (live.seq, live.prev, live.snapshot, live.ts) == (8, 7, False, 1_700_000_000_000)
        assert client.positions[S1] == ("e1", 8)


async def test_subscribe_same_subject_returns_same_subscription_with_position() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        sub, _ = await subscribe(client, conn, S1)
        await conn.msg(S1, 3, 2)
        await take(sub, 1)
        again, frame = await subscribe(client, conn, S1, seq=3, recovered=True)
        assert again is sub
        assert frame["subjects"] == [{"subject": S1, "epoch": "e1", "seq": 3}]


async def test_subscribe_with_explicit_position() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        task = asyncio.create_task(client.subscribe(S1, position=("e9", 41)))
        frame = await conn.expect("subscribe")
        assert frame["subjects"] == [{"subject": S1, "epoch": "e9", "seq": 41}]
        await conn.subscribed(S1, epoch="e9", seq=42, recovered=True)
        sub = await task
        await conn.msg(S1, 41, 40, epoch="e9")  # duplicate of the position
        await conn.msg(S1, 42, 41, "new", epoch="e9")
        assert (await sub.get(timeout=T)).seq == 42
        assert client.stats["duplicates_dropped"] == 1


async def test_subscribe_many_sends_one_frame() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        got: list[Message] = []
        task = asyncio.create_task(client.subscribe_many([S1, S2], got.append))
        frame = await conn.expect("subscribe")
        assert frame["subjects"] == [{"subject": S1}, {"subject": S2}]
        await conn.subscribed(S1)
        await conn.subscribed(S2)
        subs = await task
        assert [s.subject for s in subs] == [S1, S2]


@pytest.mark.parametrize("code", ["forbidden", "unknown_topic", "invalid_subject"])
async def test_subscribe_error_raises(code: str) -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        task = asyncio.create_task(client.subscribe(S1))
        await conn.expect("subscribe")
        await conn.send({"op": "error", "code": code, "subject": S1, "message": "no"})
        with pytest.raises(GatewayError) as info:
            async with asyncio.timeout(T):
                await task
        assert (info.value.code, info.value.subject) == (code, S1)
        # Not resubscribed later: the client forgot it.
        sub2, frame = await subscribe(client, conn, S2)
        assert frame["subjects"] == [{"subject": S2}]


async def test_invalid_subject_is_refused_locally() -> None:
    async with client_for("ws://127.0.0.1:1/ws") as client:
        with pytest.raises(GatewayError) as info:
            await client.subscribe("no-slash")
        assert info.value.code == "invalid_subject"


async def test_unsubscribe_ends_iterator_and_drops_later_messages() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        sub, _ = await subscribe(client, conn, S1)
        task = asyncio.create_task(client.unsubscribe(S1))
        frame = await conn.expect("unsubscribe")
        assert frame["subjects"] == [S1]
        await conn.msg(S1, 1, 0)  # in flight before the server processed it
        await conn.send({"op": "unsubscribed", "subject": S1})
        async with asyncio.timeout(T):
            await task
        assert [m async for m in sub] == []
        assert S1 not in client.positions


# --------------------------------------------------------------------------- delivery rules


async def test_duplicates_are_dropped_and_counted() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        sub, _ = await subscribe(client, conn, S1)
        for seq in (1, 2, 2, 1, 3):
            await conn.msg(S1, seq, seq - 1)
        assert [m.seq for m in await take(sub, 3)] == [1, 2, 3]
        assert client.stats["duplicates_dropped"] == 2


async def test_new_epoch_is_accepted() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        sub, _ = await subscribe(client, conn, S1)
        await conn.msg(S1, 5, 4, epoch="a")
        await conn.msg(S1, 1, 0, epoch="b")
        got = await take(sub, 2)
        assert [(m.epoch, m.seq) for m in got] == [("a", 5), ("b", 1)]
        assert client.positions[S1] == ("b", 1)


async def test_prev_gap_resubscribes_on_same_connection_then_delivers_in_order() -> None:
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, on_event=events) as client:
        conn, _ = await connect(client, gw)
        sub, _ = await subscribe(client, conn, S1)
        await conn.msg(S1, 1, 0)
        await conn.msg(S1, 2, 1)
        await conn.msg(S1, 4, 3)  # seq 3 is missing
        await conn.msg(S1, 5, 4)  # held back, not a second gap
        frame = await conn.expect("subscribe")
        assert frame["subjects"] == [{"subject": S1, "epoch": "e1", "seq": 2}]
        await conn.subscribed(S1, seq=5, recovered=True)
        for seq in (3, 4, 5):
            await conn.msg(S1, seq, seq - 1)
        await conn.msg(S1, 6, 5)
        assert [m.seq for m in await take(sub, 6)] == [1, 2, 3, 4, 5, 6]
        assert client.stats["gaps_detected"] == 1
        assert gw.accepted == 1 and client.stats["reconnects"] == 0
        assert (await events.wait("gap"))["seq"] == 2


async def test_recovery_failure_snapshot_is_not_a_gap() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        sub, _ = await subscribe(client, conn, S1)
        await conn.msg(S1, 2, 1)
        await conn.msg(S1, 9, 8)  # gap
        frame = await conn.expect("subscribe")
        assert frame["subjects"] == [{"subject": S1, "epoch": "e1", "seq": 2}]
        await conn.subscribed(S1, seq=20, recovered=False)  # too old: snapshot instead
        await conn.msg(S1, 20, 19, "snap", snapshot=True)
        await conn.msg(S1, 21, 20)
        got = await take(sub, 3)
        assert [(m.seq, m.snapshot) for m in got] == [(2, False), (20, True), (21, False)]
        assert sub.recovered is False and client.stats["gaps_detected"] == 1


async def test_callback_exception_is_logged_and_delivery_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[int] = []
    done = asyncio.Event()

    def callback(msg: Message) -> None:
        seen.append(msg.seq)
        if msg.seq == 1:
            raise RuntimeError("boom")
        if msg.seq == 2:
            done.set()

    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        await subscribe(client, conn, S1, callback)
        with caplog.at_level(logging.ERROR, logger="gateway.client"):
            await conn.msg(S1, 1, 0)
            await conn.msg(S1, 2, 1)
            async with asyncio.timeout(T):
                await done.wait()
        assert seen == [1, 2] and client.connected
        assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)


async def test_async_callback_runs_in_order() -> None:
    seen: list[int] = []
    done = asyncio.Event()

    async def callback(msg: Message) -> None:
        await asyncio.sleep(0.001 * (5 - msg.seq))  # earlier ones take longer
        seen.append(msg.seq)
        if msg.seq == 4:
            done.set()

    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        await subscribe(client, conn, S1, callback)
        for seq in range(1, 5):
            await conn.msg(S1, seq, seq - 1)
        async with asyncio.timeout(T):
            await done.wait()
        assert seen == [1, 2, 3, 4]


# --------------------------------------------------------------------------- liveness, reconnects


async def test_heartbeat_silence_reconnects_to_next_url_and_resubscribes_with_positions() -> None:
    events = Events()
    async with FakeGateway() as gw1, FakeGateway() as gw2, client_for(gw1.url, gw2.url, on_event=events) as client:
        conn1, _ = await connect(client, gw1, heartbeat_ms=200, session="one")
        conn1.start_keepalive(0.01)
        sub1, _ = await subscribe(client, conn1, S1)
        task = asyncio.create_task(client.subscribe(S2))
        await conn1.expect("subscribe")
        await conn1.subscribed(S2)
        sub2 = await task
        await conn1.msg(S1, 3, 2, epoch="k")
        assert (await sub1.get(timeout=T)).seq == 3
        # gw1 now goes silent (no hb): the client declares it dead after 2 x 200 ms.
        await conn1.stop_keepalive()
        conn2 = await gw2.accept()
        await conn2.handshake(heartbeat_ms=60_000, session="two")
        frame = await conn2.expect("subscribe")
        assert frame["subjects"] == [{"subject": S1, "epoch": "k", "seq": 3}, {"subject": S2}]
        await conn2.subscribed(S1, epoch="k", seq=4, recovered=True)
        await conn2.subscribed(S2)
        await conn2.msg(S1, 3, 2, epoch="k")  # duplicate across the reconnect
        await conn2.msg(S1, 4, 3, epoch="k")
        await conn2.msg(S2, 1, 0)
        assert (await sub1.get(timeout=T)).seq == 4
        assert (await sub2.get(timeout=T)).seq == 1
        await events.wait("connected", 2)
        assert client.url == gw2.url and client.session == "two"
        assert "heartbeat_timeout" in events.names()
        assert client.stats["reconnects"] == 1 and client.stats["resubscribes"] == 2
        assert client.stats["duplicates_dropped"] == 1
        await conn1.wait_closed()


async def test_hb_frames_keep_the_connection_alive() -> None:
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, on_event=events) as client:
        conn, _ = await connect(client, gw, heartbeat_ms=100)
        conn.start_keepalive(0.01)
        await asyncio.sleep(0.5)  # longer than 2 x heartbeat, with hb flowing
        await conn.stop_keepalive()
        task = asyncio.create_task(client.ping(timeout=T))
        frame = await conn.expect("ping")  # same connection still alive
        await conn.send({"op": "pong", "id": frame["id"]})
        await task
        assert "heartbeat_timeout" not in events.names() and gw.accepted == 1


async def test_a_stalled_process_is_not_a_dead_connection() -> None:
    """The client's own loop blocked for longer than 2 x heartbeat while the gateway's frames sat in
    its socket: once it runs again it reads them, and keeps the connection."""
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, on_event=events) as client:
        conn, _ = await connect(client, gw, heartbeat_ms=100)
        await conn.send({"op": "hb"})
        time.sleep(0.5)  # noqa: ASYNC251 - the stall under test: the whole loop stops (2.5 x 2 x heartbeat)
        await conn.send({"op": "hb"})
        task = asyncio.create_task(client.ping(timeout=T))
        frame = await conn.expect("ping")  # same connection still alive
        await conn.send({"op": "pong", "id": frame["id"]})
        await task
        assert "heartbeat_timeout" not in events.names() and gw.accepted == 1


@pytest.mark.parametrize("code", [1001, 4000, 1011])
async def test_close_codes_reconnect_and_pending_ack_fails_without_resend(code: int) -> None:
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, on_event=events) as client:
        conn, _ = await connect(client, gw)
        task = asyncio.create_task(client.publish(S1, "goal"))
        frame = await conn.expect("publish")
        assert frame["id"] is not None
        await conn.close(code)
        with pytest.raises(ConnectionClosedError) as info:
            async with asyncio.timeout(T):
                await task
        assert info.value.close_code == code  # the app can tell a slow-consumer close from a shutdown
        conn2 = await gw.accept()
        await conn2.handshake()
        assert (await events.wait("disconnected"))["code"] == code
        await events.wait("connected", 2)
        ping_task = asyncio.create_task(client.ping(timeout=T))
        ping = await conn2.expect("ping")
        assert [f["op"] for f in conn2.received] == ["connect", "ping"]  # no publish resent
        await conn2.send({"op": "pong", "id": ping["id"]})
        await ping_task
        assert client.stats["reconnects"] == 1


async def test_publish_while_disconnected_raises() -> None:
    async with client_for("ws://127.0.0.1:1/ws") as client:
        with pytest.raises(ConnectionClosedError):
            await client.publish(S1, "x")


# --------------------------------------------------------------------------- publishing


async def test_publish_ack_and_error() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        task = asyncio.create_task(client.publish(S1, "1-0"))
        frame = await conn.expect("publish")
        assert frame["subject"] == S1 and frame["content"] == "1-0"
        await conn.send({"op": "ack", "id": frame["id"], "subject": S1, "epoch": "e", "seq": 12})
        assert await task == Ack(S1, "e", 12, frame["id"])

        task2 = asyncio.create_task(client.publish(S1, "2-0"))
        frame2 = await conn.expect("publish")
        assert frame2["id"] != frame["id"]
        await conn.send({"op": "error", "id": frame2["id"], "code": "unavailable",
                         "message": "kafka down"})
        with pytest.raises(GatewayError) as info:
            async with asyncio.timeout(T):
                await task2
        assert (info.value.code, info.value.id) == ("unavailable", frame2["id"])
        assert not isinstance(info.value, ConnectionClosedError)


async def test_publish_fire_and_forget_and_unsolicited_error_event() -> None:
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, on_event=events) as client:
        conn, _ = await connect(client, gw)
        assert await client.publish(S1, "x", ack=False) is None
        frame = await conn.expect("publish")
        assert "id" not in frame
        await conn.send({"op": "error", "code": "forbidden", "subject": S1, "message": "no"})
        info = await events.wait("error")
        assert info["code"] == "forbidden" and client.connected


async def test_content_b64_both_ways() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        conn, _ = await connect(client, gw)
        binary = b"\xff\x00\xfe"
        await client.publish(S1, binary, ack=False)
        await client.publish(S1, "é".encode(), ack=False)
        f1, f2 = await conn.expect("publish"), await conn.expect("publish")
        assert f1["content_b64"] == base64.b64encode(binary).decode() and "content" not in f1
        assert f2["content"] == "é" and "content_b64" not in f2

        sub, _ = await subscribe(client, conn, S1)
        await conn.send({"op": "msg", "subject": S1, "epoch": "e1", "seq": 1, "prev": 0,
                         "content_b64": base64.b64encode(binary).decode()})
        msg = await sub.get(timeout=T)
        assert msg.data == binary and msg.content is None


# --------------------------------------------------------------------------- authorization


async def test_unauthorized_on_connect_raises_and_stops() -> None:
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, gw.url, token="bad", on_event=events) as client:
        task = asyncio.create_task(client.connect(timeout=T))
        conn = await gw.accept()
        await conn.expect("connect")
        await conn.send({"op": "error", "code": "unauthorized", "message": "expired"})
        await conn.close(1008)
        with pytest.raises(GatewayError) as info:
            async with asyncio.timeout(T):
                await task
        assert info.value.code == "unauthorized"
        assert client._runner is not None and client._runner.done()  # no reconnect loop left
        assert gw.accepted == 1 and not client.connected
        assert (await events.wait("fatal"))["code"] == "unauthorized"
        with pytest.raises(GatewayError):
            await client.publish(S1, "x")


async def test_close_1008_without_error_frame_is_fatal() -> None:
    async with FakeGateway() as gw, client_for(gw.url) as client:
        task = asyncio.create_task(client.connect(timeout=T))
        conn = await gw.accept()
        await conn.expect("connect")
        await conn.close(1008, "policy")
        with pytest.raises(GatewayError) as info:
            async with asyncio.timeout(T):
                await task
        assert info.value.code == "unauthorized" and client._runner is not None
        assert client._runner.done()


async def test_close_1008_mid_session_ends_subscriptions_and_stops() -> None:
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, on_event=events) as client:
        conn, _ = await connect(client, gw)
        sub, _ = await subscribe(client, conn, S1)
        pending = asyncio.create_task(client.publish(S1, "x"))
        await conn.expect("publish")
        await conn.send({"op": "error", "code": "unauthorized", "message": "token expired"})
        await conn.close(1008)
        with pytest.raises(GatewayError) as info:
            async with asyncio.timeout(T):
                await anext(aiter(sub))
        assert info.value.code == "unauthorized"
        with pytest.raises(GatewayError):
            async with asyncio.timeout(T):
                await pending
        await events.wait("fatal")
        assert client._runner is not None and client._runner.done() and gw.accepted == 1


async def test_close_is_idempotent_and_ends_iterators() -> None:
    async with FakeGateway() as gw:
        client = Client(gw.url)
        conn, _ = await connect(client, gw)
        sub, _ = await subscribe(client, conn, S1)
        await client.close()
        await client.close()
        assert [m async for m in sub] == []
        await conn.wait_closed()
        assert conn.ws.close_code == 1000


# --------------------------------------------------------------------------- 1.1: tokens, `request`

import json as _json  # noqa: E402
import time as _time  # noqa: E402

from gateway.client import error_kind, refresh_delay, token_exp  # noqa: E402


def jwt_like(exp: object) -> str:
    """A token shaped like a JWT (the client reads `exp` without verifying: the gateway verifies)."""
    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(_json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{b64({'alg': 'HS256'})}.{b64({'sub': 'a', 'exp': exp})}.sig"


def test_token_exp_reads_the_claim_without_verifying() -> None:
    assert token_exp(jwt_like(1_800_000_000)) == 1_800_000_000.0
    assert token_exp(jwt_like(1.5)) == 1.5
    for bad in ("", "abc", "a.b", "a.!!!.c", jwt_like("soon"), jwt_like(True), jwt_like(None),
                "x." + base64.urlsafe_b64encode(b"[1]").decode() + ".y"):
        assert token_exp(bad) is None, bad


def test_refresh_delay_is_lead_before_exp_but_at_most_halfway() -> None:
    assert refresh_delay(1000.0, 0.0, 30.0) == 970.0       # long token: 30 s ahead
    assert refresh_delay(10.0, 0.0, 30.0) == 5.0           # short token: halfway
    assert refresh_delay(10.0, 20.0, 30.0) == 0.0          # already past: now
    assert refresh_delay(100.0, 40.0, 10.0) == 50.0


def test_error_kind_uses_request() -> None:
    assert error_kind({"op": "error", "code": "forbidden", "request": "publish"}) == "publish"
    assert error_kind({"op": "error", "code": "forbidden", "request": "subscribe"}) == "subscribe"
    assert error_kind({"op": "error", "code": "unauthorized", "request": "refresh"}) == "refresh"
    assert error_kind({"op": "error", "code": "bad_request", "request": "ping"}) == "other"
    assert error_kind({"op": "error", "code": "forbidden"}) == "unknown"
    assert error_kind({"op": "error", "code": "forbidden", "request": 3}) == "unknown"


async def test_failed_fire_and_forget_publish_does_not_fail_a_pending_subscribe() -> None:
    """1.1 `request`: a `forbidden` for a publish to S while a subscribe of S is unanswered is the
    publish's (a 1.0 client had to guess, and guessed the subscribe)."""
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, on_event=events) as client:
        conn, _ = await connect(client, gw)
        task = asyncio.create_task(client.subscribe(S1))
        await conn.expect("subscribe")
        await conn.send({"op": "error", "code": "forbidden", "subject": S1, "message": "no",
                         "request": "publish"})
        await conn.subscribed(S1)
        async with asyncio.timeout(T):
            sub = await task
        assert not sub.closed
        assert (await events.wait("publish_failed"))["subject"] == S1
        # and a refused subscribe is still one
        task2 = asyncio.create_task(client.subscribe(S2))
        await conn.expect("subscribe")
        await conn.send({"op": "error", "code": "forbidden", "subject": S2, "message": "no",
                         "request": "subscribe"})
        with pytest.raises(GatewayError) as info:
            async with asyncio.timeout(T):
                await task2
        assert (info.value.code, info.value.request) == ("forbidden", "subscribe")


async def test_token_provider_refreshes_ahead_of_exp() -> None:
    calls: list[str] = []

    async def provider() -> str:
        tok = jwt_like(_time.time() + 1.0 + len(calls))
        calls.append(tok)
        return tok

    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, token=provider, on_event=events) as client:
        conn, hello = await connect(client, gw)
        assert hello["token"] == calls[0]
        refresh = await conn.expect("refresh")  # halfway to exp (0.5 s), on the same connection
        assert refresh["token"] == calls[1]
        await conn.send({"op": "refreshed", "exp": token_exp(calls[1])})
        await events.wait("refreshed")
        assert client.token_exp == token_exp(calls[1]) and client.stats["refreshes"] == 1
        refresh = await conn.expect("refresh")  # and again, from the new exp
        assert refresh["token"] == calls[2]
        # a refused refresh is not fatal: the session goes on and tries again
        await conn.send({"op": "error", "code": "unauthorized", "message": "nope", "request": "refresh"})
        await events.wait("refresh_failed")
        assert client.connected and "fatal" not in events.names()
        assert (await conn.expect("refresh"))["token"] == calls[3]
        assert gw.accepted == 1


async def test_close_4001_reconnects_with_a_fresh_token_and_recovers() -> None:
    toks = [jwt_like(_time.time() + 600), jwt_like(_time.time() + 1200)]
    tokens = iter(toks)
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, token=lambda: next(tokens), on_event=events) as client:
        conn, hello = await connect(client, gw)
        first = hello["token"]
        sub, _ = await subscribe(client, conn, S1, epoch="e1", seq=0, recovered=True)
        await conn.send({"op": "msg", "subject": S1, "epoch": "e1", "seq": 1, "prev": 0, "content": "a"})
        assert (await sub.get(timeout=T)).seq == 1
        await conn.send({"op": "error", "code": "unauthorized", "message": "token expired"})
        await conn.close(4001, "token expired")
        conn2 = await gw.accept()
        hello2 = await conn2.handshake()
        assert (first, hello2["token"]) == (toks[0], toks[1])  # the provider was asked again
        resub = await conn2.expect("subscribe")
        assert resub["subjects"] == [{"subject": S1, "epoch": "e1", "seq": 1}]  # recovers from its position
        await conn2.subscribed(S1, epoch="e1", seq=2, recovered=True)
        await conn2.send({"op": "msg", "subject": S1, "epoch": "e1", "seq": 2, "prev": 1, "content": "b"})
        assert (await sub.get(timeout=T)).content == "b"
        assert not sub.closed and "fatal" not in events.names() and client.stats["expired"] == 1


async def test_close_4001_with_a_fixed_expired_token_ends_in_unauthorized() -> None:
    async with FakeGateway() as gw, client_for(gw.url, token="fixed") as client:
        conn, _ = await connect(client, gw)
        await conn.send({"op": "error", "code": "unauthorized", "message": "token expired"})
        await conn.close(4001, "token expired")
        conn2 = await gw.accept()  # it tries once more with the same token: the gateway refuses it
        assert (await conn2.expect("connect"))["token"] == "fixed"
        await conn2.send({"op": "error", "code": "unauthorized", "message": "expired", "request": "connect"})
        await conn2.close(1008)
        with pytest.raises(GatewayError) as info:
            await client.subscribe(S1)
        assert info.value.code == "unauthorized"


async def test_a_failing_token_provider_is_a_failed_attempt_with_backoff() -> None:
    calls = 0

    def provider() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError("identity provider down")
        return jwt_like(_time.time() + 600)

    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, token=provider, on_event=events) as client:
        conn, hello = await connect(client, gw)
        assert calls == 3 and events.names().count("connect_failed") == 2
        assert token_exp(hello["token"]) is not None


async def test_a_token_provider_that_hangs_is_a_failed_attempt_and_is_cancelled() -> None:
    """An async provider that never answers (an identity service that accepts and stalls) held the
    client before its first connection forever. It gets connect_timeout, like the handshake: then it
    is cancelled, and the attempt fails and is retried after a backoff."""
    calls = 0
    hung_cancelled = asyncio.Event()

    async def provider() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            try:
                await asyncio.Event().wait()  # never set
            except asyncio.CancelledError:
                hung_cancelled.set()
                raise
        return jwt_like(_time.time() + 600)

    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, token=provider, on_event=events,
                                               connect_timeout=0.2) as client:
        conn, hello = await connect(client, gw)
        assert calls == 2 and hung_cancelled.is_set()
        failed = [i for n, i in events.seen if n == "connect_failed"]
        assert len(failed) == 1 and "no token within 0.2 s" in failed[0]["error"], failed
        assert token_exp(hello["token"]) is not None


async def test_the_backoff_grows_over_connections_dropped_at_once_and_resets_after_one_that_lasted() -> None:
    """A gateway that accepts, answers `connected` and drops at once (a crash loop, a 4000 after
    every resubscribe) was retried every `backoff_initial` forever: `connected` reset the backoff.
    Now only a connection that lasted `backoff_max` does."""
    events = Events()
    async with FakeGateway() as gw, client_for(gw.url, on_event=events, backoff_initial=0.001,
                                               backoff_max=1.0) as client:
        conn, _ = await connect(client, gw)
        for _ in range(3):  # dropped right after `connected`, three times
            await conn.close(1011, "crash")
            conn = await gw.accept()
            await conn.handshake()
        await events.wait("connected", 4)
        await asyncio.sleep(2.0)  # the fourth one lasts twice backoff_max (the client's own clock)
        await conn.close(1001, "restart")
        conn = await gw.accept()
        await conn.handshake()
        await events.wait("connected", 5)
        waits = [i["attempt"] for n, i in events.seen if n == "reconnecting"]
        assert waits == [0, 1, 2, 0], waits
