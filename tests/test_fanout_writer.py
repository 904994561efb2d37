"""The write pipeline on real sockets from real loops (uvloop and asyncio), both implementations.

Tiny kernel buffers and readers that stop reading force EAGAIN and partial
writes; every byte a client receives is decoded and compared with what was
published, in order.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

import fanout
from support import fanout_impls
from support.fake_transport import FakeTransport
from support.fanout_net import KINDS, LOOP_PARAMS, GatewayProtocol, Net, Reader, run
from support.fanout_ws import Frame, decode_all
from support.waits import WAIT, wait_until

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
BIG = 10**9


@pytest.fixture(scope="module", params=fanout_impls.IMPL_PARAMS)
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    return fanout_impls.load(request.param)


@pytest.fixture(params=LOOP_PARAMS)
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory:
    factory: LoopFactory = request.param
    return factory


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def payload(tag: str, i: int, size: int) -> bytes:
    head = b"%s:%d:" % (tag.encode(), i)
    return head + b"." * max(0, size - len(head))


def payloads(data: bytes | bytearray) -> list[bytes]:
    frames = decode_all(bytes(data))
    assert all(f.fin and f.opcode == 1 for f in frames)
    return [f.payload for f in frames]


def conn_factory(impl: SimpleNamespace, writer: Any, max_pending: int = BIG,
                 on_overflow: Callable[[Any], None] | None = None) -> Callable[[asyncio.Transport], Any]:
    def make(transport: asyncio.Transport) -> Any:
        return impl.Conn(writer, transport, max_pending, on_overflow or (lambda conn: None))

    return make


def test_compiled_module_loaded() -> None:
    if fanout_impls.NO_EXTENSIONS:
        assert fanout.COMPILED is False
        assert fanout.Writer is fanout_impls.load("reference").Writer
        return
    assert fanout.COMPILED is True
    for module in fanout_impls.load("compiled").modules:
        assert module.__file__ is not None and module.__file__.endswith(".so"), module.__file__
    from fanout import _writer

    assert fanout.Writer is _writer.Writer and fanout.Channel is _writer.Channel


def test_one_write_per_conn_per_tick(impl: SimpleNamespace, loop_factory: LoopFactory, kind: str) -> None:
    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        async with Net(kind, small=False) as net:
            pairs = [await net.open(conn_factory(impl, writer)) for _ in range(3)]
            for gw, _ in pairs:
                assert (gw.conn.fd == -1) == (kind == "tls")
            channel = impl.Channel()
            for gw, _ in pairs:
                assert channel.add(gw.conn)
            frames = [impl.encode_text(payload("f", i, 20 + i)) for i in range(50)]
            own = impl.encode_text(b"only for conn 0")
            for i, frame in enumerate(frames):
                assert channel.publish(frame) == 3
                if i == 20:
                    assert pairs[0][0].conn.send(own) is True
            assert (writer.syscalls, writer.frames_out, writer.bytes_out) == (0, 0, 0)
            await asyncio.sleep(0)  # the one flush scheduled by the first dirty conn runs first
            assert writer.syscalls == 3
            assert writer.frames_out == 151
            expected = b"".join(frames)
            assert writer.bytes_out == 3 * len(expected) + len(own)
            for i, (gw, reader) in enumerate(pairs):
                want = b"".join(frames[:21]) + own + b"".join(frames[21:]) if i == 0 else expected
                await reader.wait_bytes(len(want))
                assert reader.data == want
                assert gw.conn.queued_bytes == 0 and gw.conn.pending_bytes == 0

    run(loop_factory, main)


def test_more_frames_than_iov_max(impl: SimpleNamespace, loop_factory: LoopFactory, kind: str) -> None:
    iov_max = min(os.sysconf("SC_IOV_MAX"), 1024)
    count = 2 * iov_max + 100

    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        async with Net(kind, small=False) as net:
            gw, reader = await net.open(conn_factory(impl, writer))
            frames = [impl.encode_text(b"%d" % (i % 10)) for i in range(count)]
            for frame in frames:
                gw.conn.send(frame)
            await asyncio.sleep(0)
            assert writer.syscalls == (1 if kind == "tls" else math.ceil(count / iov_max))
            assert writer.frames_out == count
            await reader.wait_bytes(3 * count)
            assert reader.data == b"".join(frames)

    run(loop_factory, main)


def test_order_across_many_frames_and_channels(impl: SimpleNamespace, loop_factory: LoopFactory, kind: str) -> None:
    membership = {0: (0, 1, 2), 1: (0,), 2: (1, 2), 3: (2,)}
    sizes = (10, 300, 1500, 5000, 70000, 40)

    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        async with Net(kind) as net:
            pairs = [await net.open(conn_factory(impl, writer)) for _ in membership]
            channels = [impl.Channel() for _ in range(3)]
            for c, chans in membership.items():
                for ch in chans:
                    assert channels[ch].add(pairs[c][0].conn)
            expected: list[list[bytes]] = [[] for _ in membership]
            pairs[0][1].stall()
            pairs[2][1].stall()
            n = 0
            for tick in range(40):
                if tick == 20:
                    for c in (0, 2):
                        gw = pairs[c][0]
                        if kind != "tls":
                            assert gw.conn.paused, "a stalled reader must have paused its conn"
                            # Only (part of) one of our frames may sit in the transport.
                            assert gw.transport is not None
                            assert gw.transport.get_write_buffer_size() <= max(sizes) + 10
                        pairs[c][1].unstall()
                for _ in range(10):
                    ch = n % 3
                    body = payload(f"c{ch}", n, sizes[n % len(sizes)])
                    count = channels[ch].publish(impl.encode_text(body))
                    assert count == sum(ch in chans for chans in membership.values())
                    for c, chans in membership.items():
                        if ch in chans:
                            expected[c].append(body)
                    n += 1
                direct = payload("direct", tick, 100)
                assert pairs[1][0].conn.send(impl.encode_text(direct))
                expected[1].append(direct)
                await asyncio.sleep(0)
            for c, (_gw, reader) in enumerate(pairs):
                total = sum(len(impl.encode_text(p)) for p in expected[c])
                await reader.wait_bytes(total)
                assert payloads(reader.data) == expected[c]
            assert writer.overflows == 0
            assert pairs[0][0].pauses > 0 and pairs[0][0].resumes > 0

    run(loop_factory, main)


def test_stalled_reader_overflows_alone(impl: SimpleNamespace, loop_factory: LoopFactory, kind: str) -> None:
    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        overflowed: list[Any] = []
        by_conn: dict[Any, GatewayProtocol] = {}

        def on_overflow(conn: Any) -> None:
            # What the gateway does: a close frame straight into the transport, then close.
            overflowed.append(conn)
            transport = by_conn[conn].transport
            assert transport is not None
            transport.write(impl.encode_close(4000))
            transport.close()

        async with Net(kind) as net:
            pairs = [await net.open(conn_factory(impl, writer, 64 * 1024, on_overflow)) for _ in range(3)]
            by_conn.update((gw.conn, gw) for gw, _ in pairs)
            slow = pairs[0][0].conn
            channel = impl.Channel()
            for gw, _ in pairs:
                channel.add(gw.conn)
            pairs[0][1].stall()
            published: list[bytes] = []
            sent = 0
            for _tick in range(300):
                for _j in range(4):
                    body = payload("m", len(published), 2000)
                    published.append(body)
                    frame = impl.encode_text(body)
                    sent += len(frame)
                    count = channel.publish(frame)
                    if slow.closed:
                        assert count == 2
                        break
                    assert count == 3
                if slow.closed:
                    break
                await asyncio.sleep(0)
                for _, reader in pairs[1:]:
                    await reader.wait_bytes(sent)  # the others keep up, whatever the transport
            assert slow.closed, "the stalled conn never overflowed"
            assert overflowed == [], "on_overflow must not run inside publish"
            assert writer.overflows == 1
            assert slow.queued_bytes == 0
            assert slow not in channel and len(channel) == 2 and len(writer) == 2
            assert slow.send(impl.encode_text(b"late")) is False
            assert channel.add(slow) is False
            await asyncio.sleep(0)
            assert overflowed == [slow]
            for i in range(20):
                body = payload("after", i, 500)
                published.append(body)
                assert channel.publish(impl.encode_text(body)) == 2
                await asyncio.sleep(0)
            for gw, reader in pairs[1:]:
                await reader.wait_bytes(sum(len(impl.encode_text(p)) for p in published))
                assert payloads(reader.data) == published
                assert not gw.conn.closed
            stalled = pairs[0][1]
            stalled.unstall()
            await stalled.wait_done()
            frames = decode_all(bytes(stalled.data))  # complete frames only: no torn frame before the close
            assert frames[-1] == Frame(True, 8, (4000).to_bytes(2, "big"))
            received = [f.payload for f in frames[:-1]]
            assert 0 < len(received) < len(published)
            assert received == published[: len(received)]
            assert writer.overflows == 1

    run(loop_factory, main)


def test_overflow_releases_the_queue(impl: SimpleNamespace, loop_factory: LoopFactory) -> None:
    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        async with Net("socketpair") as net:
            gw, reader = await net.open(conn_factory(impl, writer, 200_000))
            conn = gw.conn
            reader.stall()
            for i in range(1000):
                if conn.paused and conn.queued_bytes > 0:
                    break
                conn.send(impl.encode_text(payload("fill", i, 1000)))
                await asyncio.sleep(0)
            assert conn.paused and conn.queued_bytes > 0
            marker = impl.encode_text(b"marker" * 200)
            refs = sys.getrefcount(marker)
            assert conn.send(marker)
            assert sys.getrefcount(marker) == refs + 1  # queued by reference, not copied
            await asyncio.sleep(0)
            assert sys.getrefcount(marker) == refs + 1  # a paused conn keeps it queued
            big = impl.encode_text(bytes(50_000))
            for _ in range(10):
                if not conn.send(big):
                    break
            assert conn.closed and conn.queued_bytes == 0
            assert sys.getrefcount(marker) == refs
            assert writer.overflows == 1

    run(loop_factory, main)


def test_resume_after_drain_delivers_the_rest_in_order(impl: SimpleNamespace, loop_factory: LoopFactory,
                                                        kind: str) -> None:
    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        async with Net(kind) as net:
            gw, reader = await net.open(conn_factory(impl, writer))
            assert gw.transport is not None
            channel = impl.Channel()
            channel.add(gw.conn)
            reader.stall()
            published: list[bytes] = []
            pings = 0
            for tick in range(30):
                for _j in range(10):
                    body = payload("r", len(published), 3000)
                    published.append(body)
                    assert channel.publish(impl.encode_text(body)) == 1
                if tick % 7 == 3:
                    # The transport's buffer always ends on a frame boundary, so the
                    # gateway may put a complete control frame there at any time.
                    gw.transport.write(impl.encode_frame(impl.OP_PING, b"%d" % tick))
                    pings += 1
                await asyncio.sleep(0)
            if kind != "tls":
                # (Over TLS the state between two ticks depends on the SSL layer's own buffering.)
                assert gw.conn.paused and gw.conn.queued_bytes > 0
                assert gw.transport.get_write_buffer_size() <= 3100 + 2 * pings * 10
            reader.unstall()
            total = sum(len(impl.encode_text(p)) for p in published) + sum(
                len(impl.encode_frame(impl.OP_PING, b"%d" % t)) for t in range(30) if t % 7 == 3
            )
            await reader.wait_bytes(total)
            frames = decode_all(bytes(reader.data))
            assert [f.payload for f in frames if f.opcode == 1] == published
            assert sum(f.opcode == 9 for f in frames) == pings
            await wait_until(lambda: gw.conn.queued_bytes == 0 and not gw.conn.paused, "the queue to drain")
            assert gw.resumes >= 1 and writer.overflows == 0

    run(loop_factory, main)


def test_close_leaves_every_channel(impl: SimpleNamespace, loop_factory: LoopFactory) -> None:
    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        async with Net("socketpair", small=False) as net:
            a, b, c = [(await net.open(conn_factory(impl, writer)))[0].conn for _ in range(3)]
            x, y, z = impl.Channel(), impl.Channel(), impl.Channel()
            for ch in (x, y, z):
                for conn in (a, b, c):
                    assert ch.add(conn)
                assert ch.add(a) is False
            assert len(writer) == 3
            a.close()
            a.close()
            assert a.closed
            for ch in (x, y, z):
                assert a not in ch and len(ch) == 2
                assert set(ch.conns()) == {b, c}
                assert ch.add(a) is False and ch.remove(a) is False
            assert len(writer) == 2
            assert a.send(impl.encode_text(b"x")) is False
            assert x.publish(impl.encode_text(b"x")) == 2
            assert x.remove(c) and c not in x and b in x and x.remove(c) is False
            assert x.add(c) and x.conns() == [b, c]
            assert 42 not in x

    run(loop_factory, main)


@pytest.mark.parametrize("seed", range(4))
def test_membership_matches_a_set_model(impl: SimpleNamespace, loop_factory: LoopFactory, seed: int) -> None:
    import random

    rng = random.Random(seed)

    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        async with Net("socketpair", small=False) as net:
            conns = [(await net.open(conn_factory(impl, writer)))[0].conn for _ in range(6)]
            channels = [impl.Channel() for _ in range(5)]  # up to 5 per conn: removals inside the tuple
            model: list[set[int]] = [set() for _ in channels]
            closed: set[int] = set()
            for step in range(300):
                op = rng.choice(["add", "add", "remove", "publish", "close"] if step % 50 else ["close"])
                c, ch = rng.randrange(len(conns)), rng.randrange(len(channels))
                if op == "add":
                    assert channels[ch].add(conns[c]) is (c not in model[ch] and c not in closed)
                    if c not in closed:
                        model[ch].add(c)
                elif op == "remove":
                    assert channels[ch].remove(conns[c]) is (c in model[ch])
                    model[ch].discard(c)
                elif op == "publish":
                    assert channels[ch].publish(impl.encode_text(b"p%d" % step)) == len(model[ch])
                else:
                    conns[c].close()
                    closed.add(c)
                    for members in model:
                        members.discard(c)
                for i, channel in enumerate(channels):
                    assert {conns.index(m) for m in channel.conns()} == model[i]
                    assert len(channel) == len(model[i])
                    assert all((conn in channel) is (k in model[i]) for k, conn in enumerate(conns))
                assert len(writer) == len(conns) - len(closed)
                if step % 10 == 0:
                    await asyncio.sleep(0)

    run(loop_factory, main)


def test_write_error_closes_without_raising(impl: SimpleNamespace, loop_factory: LoopFactory) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        writer = impl.Writer(loop)
        a, b = socket.socketpair()
        transport, gw = await loop.create_unix_connection(
            lambda: GatewayProtocol(conn_factory(impl, writer), None), sock=a
        )
        try:
            channel = impl.Channel()
            channel.add(gw.conn)
            b.close()  # the peer is gone: the next write fails with EPIPE
            assert channel.publish(impl.encode_text(b"into the void")) == 1
            writer.flush()
            assert gw.conn.closed and gw.conn.queued_bytes == 0
            assert writer.write_errors == 1 and writer.overflows == 0
            assert len(channel) == 0 and len(writer) == 0
            assert gw.conn.send(impl.encode_text(b"x")) is False
            await asyncio.wait_for(gw.lost, WAIT)  # the transport notices on its own
        finally:
            transport.close()
            await asyncio.sleep(0)

    run(loop_factory, main)


def test_hard_write_error_aborts_the_transport_even_if_the_peer_stays_silent(
        impl: SimpleNamespace, loop_factory: LoopFactory) -> None:
    """EPIPE while the peer sends nothing (so reading never notices): the conn is dropped AND the
    transport aborted, so connection_lost reaches the owner (else nobody would ever close it)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        writer = impl.Writer(loop)
        a, b = socket.socketpair()
        transport, gw = await loop.create_unix_connection(
            lambda: GatewayProtocol(conn_factory(impl, writer), None), sock=a
        )
        try:
            channel = impl.Channel()
            channel.add(gw.conn)
            a.shutdown(socket.SHUT_WR)  # our side's writes fail with EPIPE; b stays open and silent
            assert channel.publish(impl.encode_text(b"into the void")) == 1
            writer.flush()
            assert gw.conn.closed and writer.write_errors == 1 and len(writer) == 0
            await asyncio.wait_for(gw.lost, WAIT)
        finally:
            transport.close()
            b.close()
            await asyncio.sleep(0)

    run(loop_factory, main)


@pytest.mark.parametrize("err", ["ENOBUFS", "ENOMEM"])
@pytest.mark.parametrize("frames", [1, 3])
def test_enobufs_and_enomem_are_like_eagain(monkeypatch: pytest.MonkeyPatch, err: str, frames: int) -> None:
    """The kernel had no buffer memory for a moment: the socket is fine, the frames go to the transport
    (which retries when writable). The reference twin only: send(2)'s errno cannot be injected into the
    compiled module; both share the rule (_writer.pyx _soft_error)."""
    import errno

    ref = fanout_impls.load("reference")
    module = ref.modules[0]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        writer = ref.Writer(loop)
        a, b = socket.socketpair()
        transport, gw = await loop.create_unix_connection(
            lambda: GatewayProtocol(conn_factory(ref, writer), None), sock=a
        )
        try:
            def no_buffers(*args: Any) -> int:
                raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)))

            monkeypatch.setattr(module.os, "write", no_buffers)
            monkeypatch.setattr(module.os, "writev", no_buffers)
            sent = [ref.encode_text(b"frame %d" % i) for i in range(frames)]
            for frame in sent:
                assert gw.conn.send(frame)
            writer.flush()
            monkeypatch.undo()
            assert not gw.conn.closed and writer.write_errors == 0
            # what the transport took (the first frame) plus what stays queued reaches the peer in order
            got = b""
            b.settimeout(WAIT)
            while len(got) < sum(map(len, sent)):
                await asyncio.sleep(0.01)
                if not gw.conn.paused:
                    writer.flush()
                try:
                    b.setblocking(False)
                    got += b.recv(65536)
                except BlockingIOError:
                    pass
            assert got == b"".join(sent)
        finally:
            monkeypatch.undo()
            transport.close()
            b.close()
            await asyncio.sleep(0)

    run(asyncio.new_event_loop, main)


def test_transport_without_socket_gets_one_joined_write(impl: SimpleNamespace, loop_factory: LoopFactory) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        writer = impl.Writer(loop)
        rfd, wfd = os.pipe()
        rpipe, wpipe = os.fdopen(rfd, "rb", buffering=0), os.fdopen(wfd, "wb", buffering=0)
        wtr, gw = await loop.connect_write_pipe(lambda: GatewayProtocol(conn_factory(impl, writer), None), wpipe)
        rtr, reader = await loop.connect_read_pipe(Reader, rpipe)
        try:
            assert gw.conn.fd == -1
            frames = [impl.encode_text(payload("pipe", i, 50)) for i in range(5)]
            for frame in frames:
                assert gw.conn.send(frame)
            await asyncio.sleep(0)
            assert writer.syscalls == 1 and writer.frames_out == 5
            await reader.wait_bytes(sum(map(len, frames)))
            assert reader.data == b"".join(frames)
        finally:
            wtr.close()
            rtr.close()
            await asyncio.wait_for(asyncio.gather(gw.lost, reader.lost), WAIT)

    run(loop_factory, main)


def test_idle(impl: SimpleNamespace, loop_factory: LoopFactory) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        writer = impl.Writer(loop)
        async with Net("socketpair", small=False) as net:
            (ga, _), (gb, rb) = [await net.open(conn_factory(impl, writer)) for _ in range(2)]
            a, b = ga.conn, gb.conn
            t0 = loop.time()
            assert a.last_send <= t0 and a.last_recv <= t0
            assert writer.idle(t0, 1000.0, 1000.0) == ([], [])
            quiet, deaf = writer.idle(t0 + 100.0, 50.0, 50.0)
            assert set(quiet) == {a, b} and set(deaf) == {a, b}
            a.last_recv = t0 + 90.0
            quiet, deaf = writer.idle(t0 + 100.0, 50.0, 50.0)
            assert set(quiet) == {a, b} and deaf == [b]
            b.last_send = 0.0
            assert b.send(impl.encode_text(b"hb"))
            await asyncio.sleep(0)
            assert b.last_send >= t0  # set when the bytes went out
            a.last_send = t0 - 50.0
            quiet, deaf = writer.idle(t0 + 100.0, 120.0, 1e9)
            assert quiet == [a] and deaf == []
            a.close()
            assert writer.idle(t0 + 100.0, 0.0, 0.0) == ([b], [b])

    run(loop_factory, main)


def test_only_data_frames_set_last_send(impl: SimpleNamespace, loop_factory: LoopFactory, kind: str) -> None:
    """last_send times the gateway's heartbeats (`hb` after heartbeat_ms without a protocol message), so
    pings and pongs must not set it: a client whose keepalive pings were answered never got an `hb`.
    One frame (send(2) or the joined write) and several (sendmsg(2) or joined), per kind of socket."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        writer = impl.Writer(loop)
        ping, pong = impl.encode_frame(impl.OP_PING, b""), impl.encode_frame(impl.OP_PONG, b"x")
        text = impl.encode_text(b'{"op":"hb"}')
        async with Net(kind, small=False) as net:
            g, r = await net.open(conn_factory(impl, writer))
            c = g.conn
            total = 0
            for frames, counts in (([pong], False), ([pong, ping], False), ([text], True), ([ping, text], True)):
                c.last_send = -1.0
                for f in frames:
                    assert c.send(f)
                total += sum(map(len, frames))
                await r.wait_bytes(total)
                assert (c.last_send > 0) is counts, (frames, c.last_send)
            assert bytes(r.data) == pong + pong + ping + text + ping + text

    run(loop_factory, main)


def test_argument_checks(impl: SimpleNamespace, loop_factory: LoopFactory) -> None:
    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        async with Net("socketpair", small=False) as net:
            gw, _ = await net.open(conn_factory(impl, writer))
            conn = gw.conn
            assert conn.send(b"") is True
            await asyncio.sleep(0)
            assert writer.syscalls == 0
            for bad in (bytearray(b"x"), "x", None):
                with pytest.raises(TypeError):
                    conn.send(bad)
                with pytest.raises(TypeError):
                    impl.Channel().publish(bad)
            with pytest.raises(TypeError):
                impl.Channel().add(object())
            assert gw.transport is not None
            with pytest.raises(ValueError):
                impl.Conn(writer, gw.transport, -1, lambda c: None)
            with pytest.raises(TypeError):
                impl.Conn(writer, gw.transport, 1.5, lambda c: None)
            assert conn.max_pending == BIG and conn.transport is gw.transport and conn.writer is writer

    run(loop_factory, main)


def owned(impl: SimpleNamespace, conn: Any) -> list[Any]:
    """The objects a conn refers to directly."""
    import gc

    return gc.get_referents(conn) if impl.name == "compiled" else list(vars(conn).values())


def containers(impl: SimpleNamespace, conn: Any) -> list[type]:
    return sorted((type(o) for o in owned(impl, conn) if type(o) in (list, dict, tuple, bytes)),
                  key=lambda t: t.__name__)


def test_idle_conn_owns_no_containers(impl: SimpleNamespace, loop_factory: LoopFactory) -> None:
    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        async with Net("socketpair", small=False) as net:
            gw, reader = await net.open(conn_factory(impl, writer))
            conn = gw.conn
            x, y, z = impl.Channel(), impl.Channel(), impl.Channel()
            assert containers(impl, conn) == []
            assert x.add(conn)
            assert containers(impl, conn) == []  # one channel: held in fields
            assert conn.send(impl.encode_text(b"a"))
            assert containers(impl, conn) == [bytes]  # one frame: the frame itself
            assert conn.send(impl.encode_text(b"b"))
            assert containers(impl, conn) == [list]
            await asyncio.sleep(0)
            assert containers(impl, conn) == []  # flushed: the queue is gone
            assert x.publish(impl.encode_text(b"c")) == 1
            await asyncio.sleep(0)
            assert containers(impl, conn) == []
            assert y.add(conn) and z.add(conn)
            # three channels: a tuple of them, and their indices in a C array (the twin: a list)
            assert containers(impl, conn) == ([tuple] if impl.name == "compiled" else [list, tuple])
            assert x.remove(conn) and z.remove(conn)
            assert containers(impl, conn) == []  # back to one channel: held in fields again
            assert conn in y and conn not in x and conn not in z
            assert y.publish(impl.encode_text(b"d")) == 1 and x.publish(impl.encode_text(b"e")) == 0
            await reader.wait_bytes(4 * 3)
            assert payloads(reader.data) == [b"a", b"b", b"c", b"d"]
            conn.close()
            assert containers(impl, conn) == [] and len(y) == 0

    run(loop_factory, main)


@pytest.mark.skipif(fanout_impls.NO_EXTENSIONS, reason="FANOUT_NO_EXTENSIONS=1")
def test_queue_lists_are_untracked_by_the_cyclic_gc() -> None:
    """A compiled conn's queue list (2+ frames) holds only bytes: untracked, it is never walked nor
    promoted by the collector, however many pile up (the twin cannot untrack from Python)."""
    import gc

    impl = fanout_impls.load("compiled")
    loop = asyncio.new_event_loop()
    try:
        writer = impl.Writer(loop)
        channel = impl.Channel()
        conns = [impl.Conn(writer, FakeTransport(), BIG, lambda conn: None) for _ in range(1000)]
        for conn in conns:
            channel.add(conn)
        frames = [impl.encode_text(b"%d" % i) for i in range(3)]
        for frame in frames:
            assert channel.publish(frame) == len(conns)
        queues = [o for conn in conns for o in gc.get_referents(conn) if type(o) is list]
        assert len(queues) == len(conns)
        assert all(q == frames for q in queues)
        assert not any(gc.is_tracked(q) for q in queues)
        ids = {id(q) for q in queues}
        gc.collect()
        assert not any(id(o) in ids for o in gc.get_objects())  # in no generation
        conns[0].close()  # a closed conn drops its queue (reference counting frees it)
        assert not [o for o in gc.get_referents(conns[0]) if type(o) is list]
    finally:
        loop.close()


@pytest.mark.skipif(fanout_impls.NO_EXTENSIONS, reason="FANOUT_NO_EXTENSIONS=1")
@pytest.mark.parametrize("in_channels", [1, 3])
def test_bytes_per_idle_conn(in_channels: int) -> None:
    """An idle compiled conn in one channel costs its own object plus one slot in the channel and the
    writer; in three, also a tuple of them and an array of its indices (the pure-Python twin has a
    __dict__ per conn; its size is not the point)."""
    import gc
    import tracemalloc

    impl = fanout_impls.load("compiled")
    loop = asyncio.new_event_loop()
    try:
        writer = impl.Writer(loop)
        channels = [impl.Channel() for _ in range(in_channels)]
        transports = [FakeTransport() for _ in range(4000)]
        on_overflow = lambda conn: None  # noqa: E731
        conns = [None] * len(transports)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i, tr in enumerate(transports):
                conns[i] = conn = impl.Conn(writer, tr, 1 << 20, on_overflow)
                for channel in channels:
                    channel.add(conn)
            gc.collect()
            per_conn = (tracemalloc.get_traced_memory()[0] - before) / len(conns)
        finally:
            tracemalloc.stop()
        # 160 bytes of Conn (GC header included) + 8 + 8 list slots, + list over-allocation; in three
        # channels + 64 of tuple, 12 of indices and two more slots: 270 (a dict of them: over 400)
        assert per_conn <= (200 if in_channels == 1 else 300), per_conn
    finally:
        loop.close()


class CountingTransport:
    """A real transport behind a proxy that counts every method called on it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._transport, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return call


@pytest.mark.parametrize("kind", ["socketpair", "tcp"])
def test_flush_asks_the_transport_nothing(impl: SimpleNamespace, loop_factory: LoopFactory, kind: str) -> None:
    """The common path (a socket with room) costs no Python-level call on the transport."""

    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        proxies: list[CountingTransport] = []

        def make(transport: asyncio.Transport) -> Any:
            proxies.append(CountingTransport(transport))
            return impl.Conn(writer, proxies[-1], BIG, lambda conn: None)

        async with Net(kind, small=False) as net:
            pairs = [await net.open(make) for _ in range(3)]
            channel = impl.Channel()
            for gw, _ in pairs:
                assert channel.add(gw.conn) and gw.conn.fd >= 0
            for proxy in proxies:
                proxy.calls.clear()
            sent: list[bytes] = []
            for tick in range(6):
                for _j in range(1 if tick % 2 else 3):  # one frame (send) and several (sendmsg)
                    body = payload("t", len(sent), 100)
                    sent.append(body)
                    assert channel.publish(impl.encode_text(body)) == 3
                await asyncio.sleep(0)
            assert writer.syscalls == 3 * 6 and writer.frames_out == 3 * len(sent)
            assert [proxy.calls for proxy in proxies] == [{}, {}, {}]
            for _, reader in pairs:
                await reader.wait_bytes(sum(len(impl.encode_text(p)) for p in sent))
                assert payloads(reader.data) == sent

    run(loop_factory, main)


def test_no_write_after_connection_lost_even_to_a_reused_fd(impl: SimpleNamespace, loop_factory: LoopFactory) -> None:
    """The transport closes the fd right after connection_lost, which closes the conn first."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        writer = impl.Writer(loop)
        channel = impl.Channel()
        a, b = socket.socketpair()
        transport, gw = await loop.create_unix_connection(
            lambda: GatewayProtocol(conn_factory(impl, writer), None), sock=a
        )
        conn = gw.conn
        fd = conn.fd
        assert fd >= 0 and channel.add(conn)
        first = impl.encode_text(b"first")
        assert channel.publish(first) == 1
        await asyncio.sleep(0)
        transport.abort()  # connection_lost is scheduled; until it runs the fd is still ours
        assert channel.publish(impl.encode_text(b"after abort")) == 1  # its flush comes after connection_lost
        await asyncio.wait_for(gw.lost, WAIT)
        assert conn.closed and len(channel) == 0 and len(writer) == 0
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by the transport right after connection_lost
        c, d = socket.socketpair()  # another connection now owns the number (lowest free, else dup2)
        dup = c.fileno() != fd
        if dup:
            os.dup2(c.fileno(), fd)
        try:
            assert conn.send(impl.encode_text(b"late")) is False
            assert channel.publish(impl.encode_text(b"late")) == 0
            writer.flush()
            await asyncio.sleep(0)
            d.setblocking(False)
            with pytest.raises(BlockingIOError):
                d.recv(100)
            b.settimeout(WAIT)
            got = b""
            while chunk := b.recv(100):
                got += chunk
            assert got == first
            assert writer.syscalls == 1 and writer.write_errors == 0
        finally:
            if dup:
                os.close(fd)
            for s in (b, c, d):
                s.close()

    run(loop_factory, main)


def test_frames_queued_before_connection_lost_reach_the_same_client(
    impl: SimpleNamespace, loop_factory: LoopFactory
) -> None:
    """transport.close() by someone else: the fd stays this connection's until connection_lost."""

    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop())
        async with Net("socketpair", small=False) as net:
            gw, reader = await net.open(conn_factory(impl, writer))
            assert gw.transport is not None
            channel = impl.Channel()
            channel.add(gw.conn)
            frames = [impl.encode_text(b"one"), impl.encode_text(b"two")]
            assert channel.publish(frames[0]) == 1  # schedules the flush
            gw.transport.close()  # schedules connection_lost, after the flush
            assert channel.publish(frames[1]) == 1
            await asyncio.wait_for(asyncio.shield(gw.lost), WAIT)
            assert gw.conn.closed and len(channel) == 0
            await reader.wait_done()
            assert reader.data == b"".join(frames)
            assert writer.write_errors == 0

    run(loop_factory, main)


def test_equal_bound_methods_as_on_overflow_are_shared(impl: SimpleNamespace) -> None:
    """``Conn(..., gw.on_overflow)`` makes a new bound method per call; conns keep one of them."""
    import types

    class Gateway:
        def __init__(self) -> None:
            self.overflowed: list[Any] = []

        def on_overflow(self, conn: Any) -> None:
            self.overflowed.append(conn)

    loop = asyncio.new_event_loop()
    try:
        writer = impl.Writer(loop)
        gw, other = Gateway(), Gateway()
        conns = [impl.Conn(writer, FakeTransport(), 100, gw.on_overflow) for _ in range(3)]
        conns.append(impl.Conn(writer, FakeTransport(), 100, other.on_overflow))
        conns.append(impl.Conn(writer, FakeTransport(), 100, gw.on_overflow))
        held = [[o for o in owned(impl, c) if isinstance(o, types.MethodType)] for c in conns]
        assert all(len(h) == 1 for h in held)
        assert held[0][0] is held[1][0] is held[2][0]
        assert held[3][0].__self__ is other and held[4][0].__self__ is gw
        for conn in (conns[1], conns[3]):
            assert conn.send(impl.encode_text(b"x" * 200)) is False  # over max_pending
        loop.run_until_complete(asyncio.sleep(0))
        assert gw.overflowed == [conns[1]] and other.overflowed == [conns[3]]
    finally:
        loop.close()


# ---- adaptive coalescing (Writer.coalesce_window): a fake clock and loop, no timing thresholds ----

class FakeLoop:
    """The loop surface the Writer uses (time, call_soon, call_at, call_exception_handler), on a
    clock that only moves when the test says so; callbacks run only when the test runs them."""

    def __init__(self) -> None:
        self.now = 100.0
        self.soon: list[Callable[[], object]] = []
        self.timers: list[tuple[float, Callable[[], object]]] = []
        self.errors: list[dict[str, Any]] = []

    def time(self) -> float:
        return self.now

    def call_soon(self, cb: Callable[..., object], *args: Any) -> None:
        self.soon.append(lambda: cb(*args))

    def call_at(self, when: float, cb: Callable[..., object], *args: Any) -> None:
        self.timers.append((when, lambda: cb(*args)))

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def run_soon(self) -> int:
        todo, self.soon = self.soon, []
        for cb in todo:
            cb()
        return len(todo)

    def run_timers(self) -> int:
        """Advance the clock to the earliest timer and run every timer due then."""
        if not self.timers:
            return 0
        self.now = max(self.now, min(when for when, _ in self.timers))
        due = [cb for when, cb in self.timers if when <= self.now]
        self.timers = [(when, cb) for when, cb in self.timers if when > self.now]
        for cb in due:
            cb()
        return len(due)


class RecordingTransport(FakeTransport):
    """No socket (fd -1: the Conn hands every flush to write()); records (loop time, bytes) per write."""

    def __init__(self, loop: FakeLoop) -> None:
        super().__init__()
        self.loop = loop
        self.writes: list[tuple[float, bytes]] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append((self.loop.now, bytes(data)))


def coalescing_setup(impl: SimpleNamespace, conns: int, window: float,
                     min_conns: int) -> tuple[FakeLoop, Any, Any, list[RecordingTransport]]:
    loop = FakeLoop()
    writer = impl.Writer(loop, coalesce_window=window, coalesce_min_conns=min_conns)
    transports = [RecordingTransport(loop) for _ in range(conns)]
    channel = impl.Channel()
    for tr in transports:
        assert channel.add(impl.Conn(writer, tr, BIG, lambda conn: None))
    return loop, writer, channel, transports


def test_coalescing_is_off_by_default(impl: SimpleNamespace) -> None:
    loop = FakeLoop()
    writer = impl.Writer(loop)
    assert writer.coalesce_window == 0.0 and writer.coalesce_min_conns == 1000
    channel = impl.Channel()
    tr = RecordingTransport(loop)
    channel.add(impl.Conn(writer, tr, BIG, lambda conn: None))
    for i in range(3):
        channel.publish(impl.encode_text(b"m%d" % i))
        assert loop.run_soon() == 1 and loop.timers == []
    assert [data for _, data in tr.writes] == [impl.encode_text(b"m%d" % i) for i in range(3)]
    assert writer.held_flushes == 0


def test_messages_within_the_window_after_a_big_flush_share_one_write(impl: SimpleNamespace) -> None:
    loop, writer, channel, transports = coalescing_setup(impl, conns=3, window=0.0005, min_conns=3)
    frames = [impl.encode_text(b"msg %d" % i) for i in range(4)]
    assert channel.publish(frames[0]) == 3
    assert loop.run_soon() == 1  # the first flush: nothing to coalesce with, at once
    t_big = loop.now
    loop.now += 0.0001
    assert channel.publish(frames[1]) == 3
    loop.now += 0.0002
    assert channel.publish(frames[2]) == 3
    assert loop.soon == [] and len(loop.timers) == 1  # held: one flush, at the deadline
    assert loop.timers[0][0] == t_big + 0.0005
    assert writer.held_flushes == 1 and writer.syscalls == 3
    assert loop.run_timers() == 1
    assert loop.now == t_big + 0.0005  # flushed by the deadline, not later
    for tr in transports:
        assert tr.writes == [(t_big, frames[0]), (t_big + 0.0005, frames[1] + frames[2])]
    assert writer.syscalls == 6 and writer.frames_out == 9
    # That flush was big too: the next message waits for its window again ...
    assert channel.publish(frames[3]) == 3
    assert loop.soon == [] and [when for when, _ in loop.timers] == [t_big + 0.001]
    loop.run_timers()
    assert all(tr.writes[-1] == (t_big + 0.001, frames[3]) for tr in transports)
    # ... and a message after the window has passed goes out at the next iteration.
    loop.now += 0.01
    assert channel.publish(frames[0]) == 3
    assert len(loop.soon) == 1 and loop.timers == []
    assert writer.held_flushes == 2


def test_a_small_flush_is_never_held(impl: SimpleNamespace) -> None:
    loop, writer, channel, transports = coalescing_setup(impl, conns=3, window=0.0005, min_conns=4)
    for i in range(3):
        assert channel.publish(impl.encode_text(b"%d" % i)) == 3
        assert loop.run_soon() == 1 and loop.timers == []
        loop.now += 0.0001
    assert writer.held_flushes == 0
    assert all(len(tr.writes) == 3 for tr in transports)


def test_paused_conns_do_not_count_as_touched(impl: SimpleNamespace) -> None:
    """Only conns actually written make a flush big: one that wrote to 2 of 3 (one paused) is small at min 3."""
    loop, _writer, channel, _transports = coalescing_setup(impl, conns=3, window=0.0005, min_conns=3)
    conns = channel.conns()
    conns[0].pause_writing()
    assert channel.publish(impl.encode_text(b"a")) == 3
    loop.run_soon()
    assert channel.publish(impl.encode_text(b"b")) == 3
    assert len(loop.soon) == 1 and loop.timers == []


def test_a_direct_flush_while_held_writes_once(impl: SimpleNamespace) -> None:
    """Writer.flush() called directly (the server does at shutdown) while a held flush is pending:
    everything is written then, and the timer's flush later finds nothing to write."""
    loop, writer, channel, transports = coalescing_setup(impl, conns=2, window=0.001, min_conns=1)
    channel.publish(impl.encode_text(b"a"))
    loop.run_soon()
    channel.publish(impl.encode_text(b"b"))
    assert len(loop.timers) == 1
    writer.flush()
    assert writer.syscalls == 4
    loop.run_timers()
    assert writer.syscalls == 4
    assert all([d for _, d in tr.writes] == [impl.encode_text(b"a"), impl.encode_text(b"b")] for tr in transports)


class FlushClock:
    """The writer's two clocks (Writer(clock=..., cpu_clock=...)): wall time ``t`` and the loop thread's
    CPU time ``cpu``. A write of cost c (CostlyTransport) moves both by c; idle time (the test) moves
    only ``t``. Neither moves by itself."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.cpu = 5.0

    def __call__(self) -> float:
        return self.t

    def cpu_time(self) -> float:
        return self.cpu

    def work(self, seconds: float) -> None:
        self.t += seconds
        self.cpu += seconds

    def idle(self, loop: FakeLoop, seconds: float) -> None:
        self.t += seconds
        loop.now += seconds


class CostlyTransport(RecordingTransport):
    def __init__(self, loop: FakeLoop, clock: FlushClock) -> None:
        super().__init__(loop)
        self.clock = clock
        self.cost = 0.0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        super().write(data)
        self.clock.work(self.cost)


def busy_setup(impl: SimpleNamespace, busy: float) -> tuple[FakeLoop, FlushClock, Any, Any, list[CostlyTransport]]:
    loop, clock = FakeLoop(), FlushClock()
    writer = impl.Writer(loop, coalesce_window=0.005, coalesce_min_conns=3, coalesce_busy=busy, clock=clock,
                         cpu_clock=clock.cpu_time)
    transports = [CostlyTransport(loop, clock) for _ in range(3)]
    channel = impl.Channel()
    for tr in transports:
        assert channel.add(impl.Conn(writer, tr, BIG, lambda conn: None))
    return loop, clock, writer, channel, transports


def publish_and_run(loop: FakeLoop, channel: Any, frame: bytes) -> None:
    assert channel.publish(frame) == 3
    while loop.soon or loop.timers:
        loop.run_soon()
        loop.run_timers()


def publish_held(impl: SimpleNamespace, loop: FakeLoop, channel: Any, frame: bytes) -> bool:
    """Publish one frame to the three conns and run the loop; whether its flush was held (call_at)."""
    assert channel.publish(frame) == 3
    held = bool(loop.timers)
    loop.run_soon()
    loop.run_timers()
    return held


def gate_constants(writer: Any) -> tuple[float, int, int]:
    """(BUSY_PERIOD, PROBE_EVERY, OPEN_AFTER) of the writer's implementation."""
    module = sys.modules[type(writer).__module__]
    return module.BUSY_PERIOD, module.PROBE_EVERY, module.OPEN_AFTER


def test_a_writer_that_is_not_busy_never_holds(impl: SimpleNamespace) -> None:
    """Big flushes (3 conns, min 3) that cost 0.3 ms of CPU every 10 ms: 3 % of a CPU, under 50 %: every
    message leaves at the next iteration, none waits for a window (as at a low rate on a real box)."""
    loop, clock, writer, channel, transports = busy_setup(impl, 0.5)
    period, _, _ = gate_constants(writer)
    for tr in transports:
        tr.cost = 0.0001
    for i in range(int(4 * period / 0.0103) + 1):  # 4 busy periods
        publish_and_run(loop, channel, impl.encode_text(b"%d" % i))
        assert loop.timers == []
        clock.idle(loop, 0.01)
    assert writer.held_flushes == 0 and writer.probes == 0
    assert writer.busy_share == pytest.approx(0.0003 / 0.0103)


def test_the_cpu_share_not_the_time_in_flush_opens_the_gate(impl: SimpleNamespace) -> None:
    """Flushes that take all the wall time but little CPU (a send that waits: for the CPU, for
    softirqs) do not make the writer busy: its share is CPU time over wall time."""
    loop, clock, writer, channel, transports = busy_setup(impl, 0.5)
    period, _, _ = gate_constants(writer)

    def slow_cheap_write(data: bytes | bytearray | memoryview, tr: CostlyTransport) -> None:
        RecordingTransport.write(tr, data)
        clock.t += 0.01  # 10 ms of wall time, 1 ms of it CPU
        clock.cpu += 0.001

    for tr in transports:
        tr.write = lambda data, tr=tr: slow_cheap_write(data, tr)  # type: ignore[method-assign]
    flushes = int(3 * period / 0.03) + 2  # 3 periods
    held = [publish_held(impl, loop, channel, impl.encode_text(b"w%d" % i)) for i in range(flushes)]
    assert held == [False] * flushes and writer.held_flushes == 0
    assert writer.busy_share == pytest.approx(0.1)


def test_a_busy_writer_holds_and_probes_until_a_probe_finds_it_idle(impl: SimpleNamespace) -> None:
    """Flushes back to back (each 30 ms of CPU) make the writer busy once a period is complete: from
    then on a big flush holds the next one. A held period ends the holds at once when even its share
    scaled by the frames per write it gathered (over those of the last unheld period) is under the
    threshold; otherwise, after PROBE_EVERY held periods one period runs without holds, and a probe
    under the threshold ends them."""
    loop, clock, writer, channel, transports = busy_setup(impl, 0.5)
    period, probe_every, open_after = gate_constants(writer)

    def run(cost: float, idle: float, seconds: float, tag: bytes, frames: int = 1) -> list[bool]:
        """Cycles of: idle, `frames` publishes, run the loop; whether each cycle's flush was held."""
        for tr in transports:
            tr.cost = cost
        held = []
        for i in range(int(seconds / (3 * cost + idle))):
            clock.idle(loop, idle)
            for k in range(frames - 1):
                assert channel.publish(impl.encode_text(tag + b"%d.%d" % (i, k))) == 3
            held.append(publish_held(impl, loop, channel, impl.encode_text(tag + b"%d" % i)))
        return held

    # The first flush's end starts the first period; the flush whose end completes the OPEN_AFTER-th
    # busy period in a row opens the gate.
    opening = open_after * math.ceil(round(period / 0.03, 6)) + 1
    held = run(0.01, 0.0, (opening + 3) * 0.03, b"busy ")
    assert held == [False] * opening + [True] * 3
    assert writer.busy_share == pytest.approx(1.0)
    # A third of a CPU (one write of 0.5 ms per conn every 4.5 ms) with 2 frames per write where the
    # load had 1 unheld: scaled, 2/3 >= 1/2, so the holds go on until the probe; the probe's period
    # writes 2 frames per write as well (they are published together), measures 1/3 < 1/2: no more holds.
    held = run(0.0005, 0.003, (probe_every + 3) * period, b"third ", frames=2)
    first_unheld = held.index(False)
    assert all(held[:first_unheld]) and first_unheld > 0.9 * probe_every * period / 0.0045
    assert writer.probes == 1 and writer.busy_share == pytest.approx(1 / 3)
    assert not any(held[first_unheld:])
    # Busy again (its opening period, unheld, wrote 1 frame per write), then nearly idle (9 %, 1 frame
    # per write): the first held period's scaled share (9 % x 1 / 1) ends the holds, without a probe.
    assert run(0.01, 0.0, (open_after + 1) * period, b"again ")[-1]
    held = run(0.0001, 0.003, 3 * period, b"idle ")
    assert held[0] and not held[-1] and not any(held[held.index(False):])
    assert held.index(False) < 1.1 * 2 * period / 0.0033 and writer.probes == 1
    # Busy for long: a probe that finds the load still heavy keeps the holds.
    held = run(0.01, 0.0, 3 * (probe_every + 2) * period, b"long ")
    assert held[-1] and writer.probes >= 2
    probe_runs = [k for k in range(1, len(held)) if not held[k] and held[k - 1]]
    assert probe_runs, "a probe ran without holds while busy"
    assert held[probe_runs[-1]:].count(True) > 0  # and the holds came back after it


def test_busy_gating_off_holds_after_every_big_flush(impl: SimpleNamespace) -> None:
    """coalesce_busy=0 (the Writer's default; --coalesce-busy-pct 0): the window follows every big
    flush whatever the load, as before the gate existed; the clocks are never read."""
    loop, clock, writer, channel, transports = busy_setup(impl, 0.0)
    assert writer.coalesce_busy == 0.0
    publish_and_run(loop, channel, impl.encode_text(b"a"))
    clock.t += 10.0
    assert channel.publish(impl.encode_text(b"b")) == 3
    assert len(loop.timers) == 1 and loop.soon == []
    assert writer.busy_share == 0.0 and writer.probes == 0


def test_coalescing_parity() -> None:
    """The same random schedule of publishes, clock steps and loop runs gives both implementations the
    same writes at the same times and the same counters."""
    import random

    if fanout_impls.NO_EXTENSIONS:
        pytest.skip("FANOUT_NO_EXTENSIONS=1")

    def trace(name: str) -> tuple[Any, ...]:
        impl = fanout_impls.load(name)
        rng = random.Random(7)
        loop, writer, channel, transports = coalescing_setup(impl, conns=5, window=0.0007, min_conns=3)
        extra = impl.Channel()
        for conn in channel.conns()[:2]:
            extra.add(conn)
        for step in range(400):
            r = rng.random()
            if r < 0.4:
                channel.publish(impl.encode_text(b"c%d" % step))
            elif r < 0.55:
                extra.publish(impl.encode_text(b"e%d" % step))
            elif r < 0.75:
                loop.now += rng.choice((0.0001, 0.0003, 0.0009))
            elif r < 0.9:
                loop.run_soon()
            else:
                loop.run_timers()
        while loop.run_soon() or loop.run_timers():
            pass
        return (writer.held_flushes, writer.syscalls, writer.frames_out, writer.bytes_out,
                [tr.writes for tr in transports])

    compiled, reference = trace("compiled"), trace("reference")
    assert compiled == reference
    assert compiled[0] > 0  # the schedule did hold flushes


def test_busy_gate_parity() -> None:
    """The busy gate on the same random schedule (publishes, writes of random cost on the writer's clock,
    idle steps, loop runs): both implementations hold the same flushes and measure the same shares."""
    import random

    if fanout_impls.NO_EXTENSIONS:
        pytest.skip("FANOUT_NO_EXTENSIONS=1")

    def trace(name: str) -> tuple[Any, ...]:
        impl = fanout_impls.load(name)
        rng = random.Random(16)
        loop, clock, writer, channel, transports = busy_setup(impl, 0.5)
        shares = []
        for step in range(8000):
            r = rng.random()
            if r < 0.003:  # long stretches at one cost, so that held periods between 25 and 50 % reach probes
                cost = rng.choice((0.00001, 0.0003, 0.001, 0.01))
                for tr in transports:
                    tr.cost = cost
            elif r < 0.5:
                channel.publish(impl.encode_text(b"p%d" % step))
            elif r < 0.7:
                clock.idle(loop, rng.choice((0.001, 0.002, 0.01, 0.05)))
            elif r < 0.85:
                loop.run_soon()
            else:
                loop.run_timers()
            shares.append(writer.busy_share)
        while loop.run_soon() or loop.run_timers():
            pass
        return (writer.held_flushes, writer.probes, writer.syscalls, writer.frames_out, shares,
                [tr.writes for tr in transports])

    compiled, reference = trace("compiled"), trace("reference")
    assert compiled == reference
    assert compiled[0] > 0 and min(compiled[4]) < 0.25 and max(compiled[4]) >= 0.5  # both states were visited
    assert compiled[1] > 0  # and probes ran


def test_coalescing_on_real_sockets_keeps_order_and_completeness(impl: SimpleNamespace, loop_factory: LoopFactory,
                                                                 kind: str) -> None:
    """Bursts of publishes with loop iterations between them, every flush big enough to hold the next
    (min 1 conn; a 50 ms window, far above uvloop's 1 ms timer resolution): every reader gets every
    frame in order."""
    async def main() -> None:
        writer = impl.Writer(asyncio.get_running_loop(), coalesce_window=0.05, coalesce_min_conns=1)
        async with Net(kind, small=False) as net:
            pairs = [await net.open(conn_factory(impl, writer)) for _ in range(4)]
            channel = impl.Channel()
            for gw, _ in pairs:
                assert channel.add(gw.conn)
            frames = [impl.encode_text(payload("c", i, 30 + i % 50)) for i in range(300)]
            for i, frame in enumerate(frames):
                assert channel.publish(frame) == 4
                if i % 3 == 2:
                    await asyncio.sleep(0)
            for _, reader in pairs:
                await reader.wait_bytes(sum(map(len, frames)))
                assert reader.data == b"".join(frames)
            assert writer.held_flushes > 0
            assert writer.frames_out == 4 * len(frames)

    run(loop_factory, main)
