"""A Session needs only its SessionHost (gateway/session.py), not the whole Gateway.

The host here is built from the real parts a Session uses (hub, standalone engine, fanout writer,
authenticator, counters, admission) and nothing else; the transport is the tests' FakeTransport, so
every byte the session writes is read back and decoded. The same paths run over real sockets in
test_e2e_protocol.py; this proves the interface is all a Session reads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from collections.abc import Coroutine
from typing import Any

import pytest

from fanout import COMPILED, OP_CLOSE, OP_TEXT, Writer
from gateway import http
from gateway.auth import Authenticator
from gateway.config import Config
from gateway.engines.standalone import StandaloneEngine
from gateway.hub import Hub
from gateway.limits import Admission
from gateway.metrics import Stats
from gateway.protocol import CloseCode
from gateway.session import Session, SessionHost
from gateway.subjects import parse_subject
from support.fake_transport import FakeTransport
from support.fanout_ws import decode_all
from support.ws import client_frame


class MinimalHost:
    """Exactly the members of SessionHost; records the callbacks it gets."""

    close_grace = 2.0
    node_id = "host-1"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.config = Config(port=0)
        self.writer = Writer(loop)
        self.engine = StandaloneEngine()
        self.hub = Hub(lambda subject: self.engine.epoch(parse_subject(subject)), 100, 1 << 20)
        self.engine.bind(self.hub.deliver, self.hub)
        self.auth = Authenticator()
        self.stats = Stats()
        self.admission = Admission(self.config)
        self.events: list[str] = []
        self.tasks: list[asyncio.Task[Any]] = []

    def connection_made(self, session: Session) -> bool:
        self.events.append("made")
        return True

    def route(self, req: http.Request, address: str) -> tuple[bytes, bool]:
        self.events.append(f"route {req.path.decode()} from {address}")
        return http.check_upgrade(req), True

    def session_opened(self, session: Session) -> None:
        self.events.append("opened")

    def session_connected(self, session: Session) -> None:
        self.events.append("connected")

    def session_closed(self, session: Session) -> None:
        self.events.append("closed")

    def track_expiry(self, session: Session) -> None:
        self.events.append("track_expiry")

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.tasks.append(self.loop.create_task(coro))


#: every member SessionHost declares; a Session reading anything else of its host fails these tests
HOST_MEMBERS = frozenset(name for name in (*vars(SessionHost), *SessionHost.__annotations__)
                          if not name.startswith("_"))


class Strict:
    """The host as a Session sees it: only SessionHost's members."""

    def __init__(self, host: MinimalHost) -> None:
        self._host = host

    def __getattr__(self, name: str) -> Any:
        if name not in HOST_MEMBERS:
            raise AssertionError(f"the session read host.{name}, which SessionHost does not declare")
        return getattr(self._host, name)


def _text(obj: Any) -> bytes:
    return client_frame(OP_TEXT, json.dumps(obj).encode())


def _upgrade_request() -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


def _frames_after_101(out: bytes) -> list[tuple[int, bytes]]:
    head, sep, rest = out.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 101 "), out[:200]
    return [(f.opcode, f.payload) for f in decode_all(rest)]


async def test_a_session_runs_on_the_narrow_host_alone() -> None:
    host = MinimalHost(asyncio.get_running_loop())
    assert "loop" in HOST_MEMBERS and "close_grace" in HOST_MEMBERS and "sessions" not in HOST_MEMBERS
    await host.engine.start()
    session = Session(Strict(host))
    transport = FakeTransport(peername=("127.0.0.9", 40000))
    session.connection_made(transport)
    session.data_received(_upgrade_request())
    session.data_received(_text({"op": "connect"}) + _text({"op": "subscribe", "subjects": [{"subject": "/a/1"}]})
                          + _text({"op": "publish", "subject": "/a/1", "content": "hi", "id": 7}))
    host.writer.flush()
    ops = [json.loads(payload) for opcode, payload in _frames_after_101(bytes(transport.out)) if opcode == OP_TEXT]
    assert [m["op"] for m in ops] == ["connected", "subscribed", "msg", "ack"]
    assert ops[0]["server"] == "host-1" and ops[2]["content"] == "hi" and ops[3]["id"] == 7
    assert host.events == ["made", "route /ws from 127.0.0.9", "opened", "connected"]
    assert session.address == "127.0.0.9" and host.stats.publishes == 1

    # the peer's close frame without a code (1005, never sent) is answered with a normal close
    session.data_received(client_frame(OP_CLOSE, b""))
    frames = _frames_after_101(bytes(transport.out))
    assert frames[-1] == (OP_CLOSE, struct.pack("!H", CloseCode.NORMAL))
    assert transport.closing and host.stats.client_closes == {CloseCode.NORMAL: 1} and not host.stats.closes
    session.connection_lost(None)
    assert host.events[-1] == "closed" and session.closed
    assert host.hub.state("/a/1").channel.conns() == []


async def test_refused_connection_is_aborted_without_a_word() -> None:
    host = MinimalHost(asyncio.get_running_loop())
    host.connection_made = lambda session: False  # type: ignore[method-assign]  # out of descriptors
    transport = FakeTransport()
    Session(Strict(host)).connection_made(transport)
    assert transport.aborted and transport.out == b""


@pytest.mark.parametrize("code", [CloseCode.POLICY, CloseCode.TOKEN_EXPIRED])
async def test_disconnect_sends_the_named_code_after_what_is_queued(code: CloseCode) -> None:
    host = MinimalHost(asyncio.get_running_loop())
    await host.engine.start()
    session = Session(Strict(host))
    transport = FakeTransport()
    session.connection_made(transport)
    session.data_received(_upgrade_request() + _text({"op": "connect"}))
    session.disconnect(code, "bye")
    session.disconnect(CloseCode.NORMAL)  # idempotent: the first close stands
    frames = _frames_after_101(bytes(transport.out))
    assert json.loads(frames[0][1])["op"] == "connected"
    assert frames[1:] == [(OP_CLOSE, struct.pack("!H", code) + b"bye")]
    session.connection_lost(None)


async def test_subscriptions_held_as_str_tuple_then_set_behave_the_same() -> None:
    """A session keeps one subject as a str, up to SMALL_SUBJECTS in a tuple, more in a set (memory per
    connection): subscribing up past that and unsubscribing back down must answer, join and leave the
    channels, and deliver exactly as one set would."""
    from gateway.session import SMALL_SUBJECTS

    host = MinimalHost(asyncio.get_running_loop())
    await host.engine.start()
    session = Session(Strict(host))
    transport = FakeTransport(peername=("127.0.0.9", 40000))
    session.connection_made(transport)
    session.data_received(_upgrade_request() + _text({"op": "connect"}))
    names = [f"/s/{i}" for i in range(SMALL_SUBJECTS + 3)]
    model: set[str] = set()
    kinds: list[str] = []

    def check() -> None:
        assert set(session.subjects) == model and session.subscription_count == len(model)
        for name in names:
            assert (session in host.hub.state(name).channel) is (name in model)
        kinds.append(type(session._subjects).__name__)

    # up to 4 (a repeat changes nothing) and down to none; then up past SMALL_SUBJECTS and down again
    up4 = [("subscribe", n) for n in names[:4]] + [("subscribe", names[2])]
    down4 = [("unsubscribe", names[i]) for i in (1, 3, 0, 2)]
    up_all = [("subscribe", n) for n in names]
    down = [("unsubscribe", n) for n in names[:-3]] + [("unsubscribe", names[0])]
    for op, name in up4 + down4 + up_all + down:
        entry = {"subject": name} if op == "subscribe" else name
        session.data_received(_text({"op": op, "subjects": [entry]}))
        (model.add if op == "subscribe" else model.discard)(name)
        check()
    assert kinds[:9] == ["str", "tuple", "tuple", "tuple", "tuple", "tuple", "tuple", "str", "NoneType"]
    assert kinds[9:9 + len(names)] == ["str"] + ["tuple"] * (SMALL_SUBJECTS - 1) + ["set"] * 3
    assert model == set(names[-3:])

    # each subscribed subject delivers once, an unsubscribed one not at all
    for name in names:
        host.engine.publish_now(parse_subject(name), name.encode())
    host.writer.flush()
    msgs = [json.loads(p) for op, p in _frames_after_101(bytes(transport.out)) if op == OP_TEXT]
    assert sorted(m["subject"] for m in msgs if m["op"] == "msg" and not m.get("snapshot")) == sorted(model)
    session.connection_lost(None)
    assert all(session not in host.hub.state(name).channel for name in names)


class _ForgetfulTransport(FakeTransport):
    """Keeps nothing it is written (so that only the sessions' own objects are counted)."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass


class _NoEvents(list[str]):
    def append(self, event: str) -> None:
        pass


@pytest.mark.skipif(not COMPILED, reason="the pure-Python fanout twins (a __dict__ per conn)")
async def test_bytes_per_connected_session_with_three_subscriptions() -> None:
    """What the gateway allocates per connection besides its transport, as issue 12's load runs it
    (connected, 3 of 10 subjects): the Session, its subjects and its slots in the channels and the
    writer. tracemalloc counts the bytes; the uvloop transport (about 1.2 KB) comes on top."""
    import gc
    import tracemalloc

    host = MinimalHost(asyncio.get_running_loop())
    host.events = _NoEvents()
    await host.engine.start()
    n, warm = 1000, 10
    transports = [_ForgetfulTransport(peername=("127.0.0.9", 40000 + i)) for i in range(n + warm)]
    requests = [_upgrade_request() + _text({"op": "connect"}) + _text(
        {"op": "subscribe", "subjects": [{"subject": f"/matches/football/{(i + 3 * j) % 10 + 1}"}
                                         for j in range(3)]}) for i in range(n + warm)]
    sessions: list[Session] = []

    def open_session(i: int) -> None:
        session = Session(host)
        session.connection_made(transports[i])
        session.data_received(requests[i])
        sessions.append(session)

    for i in range(n, n + warm):  # the subjects' own state (hub, channels) is made by their first subscriber
        open_session(i)
    host.writer.flush()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            open_session(i)
        host.writer.flush()
        gc.collect()
        per_session = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(sessions) == n + warm and all(s.subscription_count == 3 and s.connected for s in sessions)
    # Session 344 (GC header included), subjects tuple 64, channels tuple 64 + index array 12, 3 + 1
    # list slots (about 36): about 530; a set of subjects and a dict of channels made it about 900
    assert per_session <= 600, per_session
