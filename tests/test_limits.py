"""The resource limits of PROTOCOL.md 1.1 ("Resource limits") under attack, against a real gateway over
real sockets: each test drives one abuse, checks what the abuser gets (HTTP status, error code, close
code) and that a well-behaved client connected meanwhile still gets every message, in order.

Plus the faults of issue 10 item 5 that sit on the same paths: a hard write error, a close reason cut
inside a UTF-8 character, pipelined HTTP requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import urllib.request

import pytest

from conftest import SCALE, ws_url
from gateway import config as cfg
from gateway.limits import Admission, TokenBucket, default_max_connections, normalize_origins, origin_allowed
from gateway.session import close_reason
from support.metrics import metric
from support.waits import wait_until
from support.ws import (
    WAIT,
    client_frame,
    close_code,
    connected,
    raw_upgrade,
    read_frames,
    read_head,
    recv,
    recv_until,
    send,
    upgrade_request,
)

# ---- a well-behaved client, there during every attack ----------------------------------------------


class Bystander:
    """A subscriber and a publisher on their own connections; `check()` publishes a few more messages and
    asserts the subscriber got every message since it subscribed, in order, nothing else."""

    def __init__(self, gw_url: str, subject: str = "/bystander/1") -> None:
        self.url = gw_url
        self.subject = subject
        self.sent = 0

    async def start(self) -> Bystander:
        self.sub = await connected(self.url)
        await send(self.sub, {"op": "subscribe", "subjects": [{"subject": self.subject}]})
        assert (await recv_until(self.sub, "subscribed"))["seq"] == 0
        self.pub = await connected(self.url)
        return self

    async def check(self, count: int = 5) -> None:
        for _ in range(count):
            self.sent += 1
            await send(self.pub, {"op": "publish", "subject": self.subject, "content": str(self.sent),
                                  "id": self.sent})
        got = []
        while len(got) < count:
            m = await recv_until(self.sub, "msg")
            got.append((m["seq"], m["content"]))
        first = self.sent - count + 1
        assert got == [(i, str(i)) for i in range(first, self.sent + 1)]
        for i in range(first, self.sent + 1):
            assert (await recv_until(self.pub, "ack"))["id"] == i

    async def close(self) -> None:
        await self.sub.close()
        await self.pub.close()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5 * SCALE) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def _metric(port: int, name: str, labels: str = "") -> float:
    return await asyncio.to_thread(metric, port, name, labels)


def _upgrade(port: int, headers: str = "", source: str | None = None) -> tuple[socket.socket, bytes]:
    """A raw upgrade request; (socket, the response head)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source is not None:
        sock.bind((source, 0))
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request(port, headers=headers))
    return sock, read_head(sock)


def _raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def _close_code(frames: list[tuple[int, bytes]]) -> int | None:
    closes = [p for op, p in frames if op == 0x8]
    return struct.unpack("!H", closes[0][:2])[0] if closes and len(closes[0]) >= 2 else None


def _text(obj: object) -> bytes:
    return client_frame(0x1, json.dumps(obj).encode())


# ---- units ---------------------------------------------------------------------------------------


def test_token_bucket_burst_then_rate():
    b = TokenBucket(rate=10.0, burst=3.0, now=100.0)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert b.wait() == pytest.approx(0.1)
    assert not b.take(100.05) and b.take(100.1)
    assert [b.take(200.0) for _ in range(4)] == [True, True, True, False]  # refills to the burst, no more


@pytest.mark.parametrize("origin,host,allowed,ok", [
    (None, b"gw:8800", (), True),                                         # not a browser
    (b"http://gw:8800", b"gw:8800", (), True),                            # same origin
    (b"http://GW:8800", b"gw:8800", (), True),
    (b"https://gw", b"gw", (), True),                                     # default ports on both sides
    (b"http://gw:80", b"gw", (), True),
    (b"http://gw:8801", b"gw:8800", (), False),                           # another port is another origin
    (b"https://evil.example", b"gw:8800", (), False),
    (b"null", b"gw:8800", (), False),
    (b"https://app.example", b"gw:8800", ("https://app.example",), True),
    (b"https://app.example:443", b"gw:8800", ("https://app.example",), True),
    (b"http://app.example", b"gw:8800", ("https://app.example",), False),
    (b"https://evil.example", b"gw:8800", ("*",), True),
])
def test_origin_rule(origin, host, allowed, ok):
    assert origin_allowed(origin, host, normalize_origins(allowed)) is ok


def test_admission_counts_and_limits():
    c = cfg.Config(max_connections=3, max_connections_per_address=2)
    adm = Admission(c, fd_limit=1000)
    assert all(adm.opened(a) for a in ("a", "a", "b"))
    assert adm.check_upgrade("b") is None
    assert adm.check_upgrade("a") is None  # 2 from "a": at its cap, not over
    adm.opened("a")
    assert adm.check_upgrade("a")[0] == 503  # 4 open > 3
    adm.closed("b")
    assert adm.check_upgrade("a")[0] == 429  # 3 open, but 3 from "a" > 2
    for _ in range(3):
        adm.closed("a")
    assert adm.open == 0 and not adm.by_address
    assert adm.hits == {"max_connections": 1, "max_connections_per_address": 1}
    assert default_max_connections(1024) == 1024 - cfg.FD_RESERVE
    assert Admission(cfg.Config(), fd_limit=1024).max_connections == 1024 - cfg.FD_RESERVE


def test_config_limits_defaults_and_refusals():
    c = cfg.Config()
    assert c.max_pending_bytes == 4 * cfg.MiB and c.max_pending_bytes >= 2 * c.max_message_bytes
    with pytest.raises(cfg.ConfigError, match="--max-pending-bytes"):
        cfg.load({"max_pending_bytes": "1000000"}, env={})  # < 2 x the 1 MiB default message
    with pytest.raises(cfg.ConfigError, match="--max-pending-bytes"):
        cfg.load({"max_message_bytes": str(3 * cfg.MiB)}, env={})  # 4 MiB < 2 x 3 MiB
    assert cfg.load({"max_message_bytes": "1000", "max_pending_bytes": "2000"}, env={}).max_pending_bytes == 2000
    with pytest.raises(cfg.ConfigError, match="--allowed-origins"):
        cfg.load({"allowed_origins": "evil.example"}, env={})
    with pytest.raises(cfg.ConfigError, match="--publish-rate"):
        cfg.load({"publish_rate": "-1"}, env={})
    c = cfg.load({"allowed_origins": "https://a.example, http://b.example:8080", "publish_rate": "2.5"}, env={})
    assert c.allowed_origins == ("https://a.example", "http://b.example:8080") and c.publish_rate == 2.5


@pytest.mark.parametrize("origin", ["https://a.example:99999", "https://a.example:44a3", "http://:8080"])
def test_allowed_origins_that_could_never_match_are_refused_at_start(origin):
    """Before: accepted by the flag's check, then dropped without a word by normalize_origins (a port out
    of range or not a number, no host): the origin the operator listed was refused 403 at every upgrade."""
    with pytest.raises(cfg.ConfigError, match="--allowed-origins"):
        cfg.load({"allowed_origins": origin}, env={})
    assert normalize_origins(cfg.load({"allowed_origins": "HTTPS://A.example:443"}, env={}).allowed_origins) == \
        frozenset({"https://a.example:443"})


def test_close_reason_is_cut_at_a_character_boundary():
    assert close_reason("plain") == b"plain"
    for text in ["x" + "é" * 70, "€" * 50, "ab" + "😀" * 40, "y" * 200]:
        data = close_reason(text)
        assert len(data) <= 123 and text.startswith(data.decode("utf-8"))  # valid UTF-8, a prefix
        assert len(data) > 123 - 4  # cut at the last boundary, not earlier


# ---- connection limits -------------------------------------------------------------------------------


async def test_per_address_cap_gets_429_and_other_addresses_are_served(gateway_factory):
    gw = await gateway_factory(max_connections_per_address=2)
    by = await Bystander(ws_url(gw)).start()  # from 127.0.0.1
    socks = []
    for _ in range(2):
        sock, head = await asyncio.to_thread(_upgrade, gw.port, "", "127.0.0.2")
        assert head.startswith(b"HTTP/1.1 101"), head
        socks.append(sock)
    sock, head = await asyncio.to_thread(_upgrade, gw.port, "", "127.0.0.2")
    assert head.startswith(b"HTTP/1.1 429 ") and b"\r\nRetry-After: " in head, head
    sock.close()
    await by.check()
    assert await _metric(gw.port, "gateway_limit_hits_total", '{limit="max_connections_per_address"}') == 1
    socks.pop().close()
    await wait_until(lambda: gw.admission.by_address.get("127.0.0.2") == 1, "the closed connection counted out")
    sock, head = await asyncio.to_thread(_upgrade, gw.port, "", "127.0.0.2")
    assert head.startswith(b"HTTP/1.1 101"), head  # under the cap again
    for s in [*socks, sock]:
        s.close()
    await by.close()


async def test_handshake_timeout_closes_a_slowloris_without_answer(gateway_factory):
    gw = await gateway_factory(handshake_timeout_ms=300)  # connect timeout: the default 10 s
    by = await Bystander(ws_url(gw)).start()
    upgraded = await asyncio.to_thread(raw_upgrade, gw.port)  # upgraded, no connect yet: not a slowloris
    slow = socket.create_connection(("127.0.0.1", gw.port), timeout=WAIT)

    def drip() -> bytes:
        """One byte of a request head every 20 ms until the server closes the connection."""
        head = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000
        slow.settimeout(0.02)
        got = b""
        for i in range(len(head)):
            try:
                slow.sendall(head[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                return got
            try:
                chunk = slow.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
        raise AssertionError("never closed")

    assert await asyncio.to_thread(drip) == b""  # closed without a response
    slow.close()
    await by.check()
    upgraded.sendall(_text({"op": "connect"}))  # the upgraded one was left alone
    upgraded.sendall(_text({"op": "ping", "id": 7}))
    frames = await asyncio.to_thread(_read_until_pong, upgraded)
    assert {"op": "pong", "id": 7} in frames
    upgraded.close()
    assert await _metric(gw.port, "gateway_limit_hits_total", '{limit="handshake_timeout"}') >= 1
    await by.close()


def _read_until_pong(sock: socket.socket) -> list[dict]:
    buf = b""
    sock.settimeout(WAIT)
    while True:
        chunk = sock.recv(65536)
        assert chunk, "closed"
        buf += chunk
        texts = [json.loads(p) for op, p in _parse_frames(buf) if op == 0x1]
        if any(t.get("op") == "pong" for t in texts):
            return texts


def _parse_frames(buf: bytes) -> list[tuple[int, bytes]]:
    frames, i = [], 0
    while i + 2 <= len(buf):
        op, n, j = buf[i] & 0x0F, buf[i + 1] & 0x7F, i + 2
        if n == 126:
            n, j = int.from_bytes(buf[j:j + 2], "big"), j + 2
        elif n == 127:
            n, j = int.from_bytes(buf[j:j + 8], "big"), j + 8
        if j + n > len(buf):
            break
        frames.append((op, buf[j:j + n]))
        i = j + n
    return frames


async def test_origins_same_origin_by_default_listed_or_star(gateway_factory):
    gw = await gateway_factory()
    by = await Bystander(ws_url(gw)).start()
    cases = [("Origin: https://evil.example\r\n", 403), (f"Origin: http://127.0.0.1:{gw.port}\r\n", 101),
             ("", 101), ("Origin: null\r\n", 403)]
    for header, status in cases:
        sock, head = await asyncio.to_thread(_upgrade, gw.port, header)
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), (header, head)
        sock.close()
    await by.check()
    assert await _metric(gw.port, "gateway_limit_hits_total", '{limit="origin"}') == 2
    await by.close()
    listed = await gateway_factory(allowed_origins=("https://app.example",))
    for header, status in [("Origin: https://app.example\r\n", 101), ("Origin: https://evil.example\r\n", 403)]:
        sock, head = await asyncio.to_thread(_upgrade, listed.port, header)
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), (header, head)
        sock.close()
    star = await gateway_factory(allowed_origins=("*",))
    sock, head = await asyncio.to_thread(_upgrade, star.port, "Origin: https://evil.example\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    sock.close()


def _limit_rlimit() -> None:  # in the child: a small file table
    resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))


def test_max_connections_default_from_the_file_limit_503_healthz_and_warnings():
    """A gateway process with RLIMIT_NOFILE 160: --max-connections defaults to 160 - reserve; over it
    upgrades get 503 + Retry-After while /healthz is still answered; near the file limit new connections
    are closed at once; both are logged; a client connected all along keeps getting every message."""
    limit = default_max_connections(160)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", "0",
                                 "--handshake-timeout-ms", "60000", "--connect-timeout-ms", "60000"],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd="/", preexec_fn=_limit_rlimit)
        socks: list[socket.socket] = []
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            assert m, line
            port = int(m.group(1))
            asyncio.run(_max_connections_scenario(port, limit, socks))
        finally:
            for s in socks:
                s.close()
            proc.terminate()
            proc.wait(10 * SCALE)
            proc.stdout.close()  # type: ignore[union-attr]
            err.seek(0)
            log = err.read()
        assert f"--max-connections {limit} reached" in log, log
        assert "near the file limit (RLIMIT_NOFILE 160)" in log, log


async def _max_connections_scenario(port: int, limit: int, socks: list[socket.socket]) -> None:
    by = await Bystander(f"ws://127.0.0.1:{port}/ws").start()  # 2 connections
    assert await _metric(port, "gateway_max_connections") == limit
    for _ in range(limit - 2):
        sock, head = await asyncio.to_thread(_upgrade, port)
        assert head.startswith(b"HTTP/1.1 101"), head
        socks.append(sock)
    sock, head = await asyncio.to_thread(_upgrade, port)
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: " in head, head
    sock.close()
    status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
    assert status == 200 and json.loads(body)["connections"] == limit
    await by.check()
    # the refused one and the /healthz request counted out (this /metrics request is one more)
    for _ in range(int(500 * SCALE)):
        if await _metric(port, "gateway_open_connections") == limit + 1:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the refused connection was never counted out")
    # Idle TCP connections past the limit: kept while the reserve allows, then closed at once.
    closed_at_once = None
    for i in range(cfg.FD_RESERVE):
        s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        socks.append(s)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        s.settimeout(0.2 * SCALE)
        try:
            if s.recv(1) == b"":
                closed_at_once = i
                break
        except TimeoutError:
            continue  # held open: still within the reserve
        except ConnectionResetError:
            closed_at_once = i
            break
    assert closed_at_once == cfg.FD_RESERVE // 2, closed_at_once
    await by.check()
    for s in socks[limit - 2:]:
        s.close()
    del socks[limit - 2:]
    await wait_until(lambda: _try_get(f"http://127.0.0.1:{port}/healthz") == 200, "/healthz answered again")
    assert await _metric(port, "gateway_limit_hits_total", '{limit="max_connections"}') == 1
    assert await _metric(port, "gateway_limit_hits_total", '{limit="file_limit"}') == 1
    await by.close()


def _try_get(url: str) -> int | None:
    try:
        return _get(url)[0]
    except OSError:
        return None


# ---- per-connection limits ------------------------------------------------------------------------


async def test_max_subscriptions_limit_exceeded_per_subject(gateway_factory):
    gw = await gateway_factory(max_subscriptions=3)
    by = await Bystander(ws_url(gw)).start()
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": f"/many/{i}"} for i in range(5)]})
    answers = [await recv(ws) for _ in range(5)]
    assert [(a["op"], a["subject"]) for a in answers[:3]] == [("subscribed", f"/many/{i}") for i in range(3)]
    assert [(a["op"], a["code"], a["subject"]) for a in answers[3:]] == [
        ("error", "limit_exceeded", "/many/3"), ("error", "limit_exceeded", "/many/4")]
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/many/1"}]})  # already held: not a new one
    assert (await recv(ws))["op"] == "subscribed"
    await send(ws, {"op": "unsubscribe", "subjects": ["/many/0"]})
    assert (await recv(ws))["op"] == "unsubscribed"
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/many/4"}]})
    assert (await recv(ws))["op"] == "subscribed"
    await by.check()
    assert await _metric(gw.port, "gateway_limit_hits_total", '{limit="max_subscriptions"}') == 2
    assert await _metric(gw.port, "gateway_errors_total", '{code="limit_exceeded"}') == 2
    await ws.close()
    await by.close()


async def test_publish_flood_is_rate_limited_and_paused(gateway_factory):
    gw = await gateway_factory(publish_rate=100, publish_burst=10)
    by = await Bystander(ws_url(gw)).start()
    flood = await connected(ws_url(gw), max_queue=None)
    watcher = await connected(ws_url(gw))
    await send(watcher, {"op": "subscribe", "subjects": [{"subject": "/flood/1"}]})
    await recv_until(watcher, "subscribed")
    n = 300
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        await flood.send(json.dumps({"op": "publish", "subject": "/flood/1", "content": str(i), "id": i}))
    checked = asyncio.create_task(by.check())  # meanwhile, another connection publishes freely
    answers = {}
    while len(answers) < n:
        a = await recv(flood, 10 * WAIT)
        assert a["op"] in ("ack", "error"), a
        assert a["id"] not in answers
        answers[a["id"]] = a
    elapsed = loop.time() - start
    await checked
    acked = [i for i in range(n) if answers[i]["op"] == "ack"]
    refused = [answers[i] for i in range(n) if answers[i]["op"] == "error"]
    assert acked[:10] == list(range(10))  # the burst
    assert refused and all(e["code"] == "rate_limited" and e["subject"] == "/flood/1" for e in refused)
    assert len(acked) <= 10 + 100 * elapsed + 1  # the token bucket's bound, whatever the machine's speed
    assert [answers[i]["seq"] for i in acked] == list(range(1, len(acked) + 1))
    seen = [await recv_until(watcher, "msg") for _ in acked]
    assert [m["content"] for m in seen] == [str(i) for i in acked]  # the accepted ones, in order
    assert await _metric(gw.port, "gateway_limit_hits_total", '{limit="publish_rate"}') == len(refused)
    for ws in (flood, watcher):
        await ws.close()
    await by.close()


async def test_a_connection_paused_for_its_rate_is_not_taken_for_dead(gateway_factory):
    """The gateway does not read a connection over its rate, so its pongs wait too: the liveness sweep
    must not close it 1011 for a silence that is the gateway's own."""
    gw = await gateway_factory(publish_rate=1, publish_burst=1, heartbeat_ms=100)  # 1 s pause, 0.3 s dead
    by = await Bystander(ws_url(gw)).start()
    ws = await connected(ws_url(gw))  # websockets answers the gateway's pings
    for i in (1, 2, 3):
        await send(ws, {"op": "publish", "subject": "/slow/1", "content": str(i), "id": i})
    assert (await recv_until(ws, "ack"))["id"] == 1
    refused = await recv_until(ws, "error")
    assert (refused["id"], refused["code"]) == (2, "rate_limited")
    ack = await recv_until(ws, "ack")  # read once a token is there again: the connection lived through it
    assert (ack["id"], ack["seq"]) == (3, 2)
    await by.check(1)
    await ws.close()
    await by.close()


async def test_requests_behind_a_slow_subscribe_wait_in_the_socket_not_in_memory(gateway_factory):
    """While a subscribe awaits the engine (a recovery read), later requests of that connection wait;
    they must wait in its socket (input paused), not pile up in the gateway: at most a frame or two."""
    from gateway.engines.standalone import StandaloneEngine

    release = asyncio.Event()

    class SlowReplay(StandaloneEngine):
        async def replay(self, subject, epoch, after_seq, upto_seq):
            await release.wait()
            return None  # nothing durable: recovered:false, then the snapshot

    gw = await gateway_factory(engine=SlowReplay(), history=2)
    by = await Bystander(ws_url(gw)).start()
    ws = await connected(ws_url(gw), max_queue=None)
    for i in range(5):
        await send(ws, {"op": "publish", "subject": "/deep/1", "content": str(i), "id": i})
    acks = [await recv_until(ws, "ack") for _ in range(5)]
    epoch = acks[0]["epoch"]
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/deep/1", "epoch": epoch, "seq": 1}]})
    n = 2000
    for i in range(n):
        await ws.send(json.dumps({"op": "ping", "id": i}))
    await wait_until(lambda: any("/deep/1" in s.subjects for s in gw.sessions), "the subscribe taken")
    session = next(s for s in gw.sessions if "/deep/1" in s.subjects)
    await wait_until(lambda: session.ws_input_paused, "the connection's input paused behind the subscribe")
    await by.check()  # everyone else is served meanwhile
    assert len(session._backlog) <= 2
    release.set()
    sub = await recv_until(ws, "subscribed")
    assert (sub["recovered"], sub["seq"]) == (False, 5)
    assert (await recv_until(ws, "msg"))["snapshot"] is True
    pongs = [(await recv_until(ws, "pong"))["id"] for _ in range(n)]
    assert pongs == list(range(n))  # every request answered, in order
    await ws.close()
    await by.close()


async def test_fragment_flood_closes_1009(gateway_factory):
    gw = await gateway_factory(max_fragments=8)
    by = await Bystander(ws_url(gw)).start()
    sock = await asyncio.to_thread(raw_upgrade, gw.port)
    sock.sendall(_text({"op": "connect"}))
    body = json.dumps({"op": "ping", "id": 1}).encode()
    cuts = [len(body) * i // 8 for i in range(9)]
    sock.sendall(b"".join(client_frame(0x1 if i == 0 else 0x0, body[cuts[i]:cuts[i + 1]], fin=(i == 7))
                          for i in range(8)))
    assert {"op": "pong", "id": 1} in await asyncio.to_thread(_read_until_pong, sock)  # 8 frames: fine
    sock.sendall(b"".join(client_frame(0x1 if i == 0 else 0x0, b" ", fin=False) for i in range(1000)))
    frames = await asyncio.to_thread(read_frames, sock, WAIT)
    assert _close_code(frames) == 1009
    sock.close()
    await by.check()
    assert await _metric(gw.port, "gateway_limit_hits_total", '{limit="max_fragments"}') == 1


async def test_ping_flood_gets_few_pongs_and_the_connection_lives(gateway_factory):
    gw = await gateway_factory(max_queued_pongs=4)
    by = await Bystander(ws_url(gw)).start()
    sock = await asyncio.to_thread(raw_upgrade, gw.port)
    sock.sendall(_text({"op": "connect"}))
    sock.sendall(b"".join(client_frame(0x9, b"p") for _ in range(5000)))
    sock.sendall(_text({"op": "ping", "id": 2}))

    def read_all_until_pong() -> list[tuple[int, bytes]]:
        buf = b""
        sock.settimeout(WAIT)
        while True:
            chunk = sock.recv(65536)
            assert chunk, "closed"
            buf += chunk
            frames = _parse_frames(buf)
            if any(op == 0x1 and json.loads(p).get("op") == "pong" for op, p in frames):
                return frames

    frames = await asyncio.to_thread(read_all_until_pong)
    pongs = sum(1 for op, _ in frames if op == 0xA)
    assert 1 <= pongs < 5000
    assert await _metric(gw.port, "gateway_limit_hits_total", '{limit="max_queued_pongs"}') == 5000 - pongs
    sock.close()
    await by.check()


# ---- faults -------------------------------------------------------------------------------------------


async def test_hard_write_error_closes_the_session(gateway_factory):
    """A subscriber whose socket fails hard (EPIPE here: the server side's write half shut down under the
    gateway) while the client itself stays silent: the session must go, not linger outside the sweep."""
    gw = await gateway_factory()
    by = await Bystander(ws_url(gw)).start()
    victim = await asyncio.to_thread(raw_upgrade, gw.port)
    victim.sendall(_text({"op": "connect"}))
    victim.sendall(_text({"op": "subscribe", "subjects": [{"subject": "/broken/1"}]}))
    await wait_until(lambda: any("/broken/1" in s.subjects for s in gw.sessions), "the victim subscribed")
    session = next(s for s in gw.sessions if "/broken/1" in s.subjects)
    fd = session.transport.get_extra_info("socket").fileno()
    dup = socket.socket(fileno=os.dup(fd))
    dup.shutdown(socket.SHUT_WR)  # every later send(2) on it fails with EPIPE
    dup.close()  # (the dup only; the gateway's fd stays open)
    errors_before = gw.writer.write_errors
    await send(by.pub, {"op": "publish", "subject": "/broken/1", "content": "x", "id": "b"})
    assert (await recv_until(by.pub, "ack"))["id"] == "b"
    await wait_until(lambda: gw.writer.write_errors > errors_before, "the write error")
    await wait_until(lambda: session not in gw.sessions, "the broken session closed")
    assert gw.admission.open == 2  # only the bystander's connections are left
    assert await _metric(gw.port, "gateway_write_errors_total") >= 1
    victim.close()
    await by.check()
    await by.close()


async def test_close_reason_cut_inside_a_character_still_closes(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await wait_until(lambda: len(gw.sessions) == 1, "the session")
    session = next(iter(gw.sessions))
    session.disconnect(1008, "x" + "é" * 70)  # byte 120 falls inside an "é"
    assert await close_code(ws) == 1008
    assert ws.close_reason == "x" + "é" * 61


async def test_pipelined_http_requests_get_the_first_answer_then_close(gateway_factory):
    gw = await gateway_factory()
    answer = await asyncio.to_thread(
        _raw_http, gw.port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head, head
    assert json.loads(body)["status"] == "ok"
    assert answer.count(b"HTTP/1.1 ") == 1  # one answer; the client retries the rest (RFC 9112 9.3.2)
    answer = await asyncio.to_thread(
        _raw_http, gw.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and b"gateway_connections" in answer
