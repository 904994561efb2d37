"""Fuzz inputs against a real gateway (standalone and Kafka) over real sockets, while a well-behaved
client watches.

Attackers, a sample of what the fuzzers generate: random bytes and hostile frames right after a valid
upgrade, mutated HTTP request heads, and random JSON (any value, huge numbers, NaN literals, duplicate
keys, lone surrogates, deep nesting, both content fields, recovery positions in epochs the attacker
learned from its own acks) after a valid connect. Meanwhile a publisher
publishes a numbered sequence to a subject a watcher is subscribed to.

Asserted: no input raises past the session (nothing reaches the loop's exception handler, nothing is
logged as an error); every frame the gateway sends an attacker is a valid server frame (JSON text with
a string `op`, pong, close); a connected attacker's bad requests never close its connection (a ping
sent after them is answered); the gateway forgets every attacker once it hangs up, /healthz stays 200,
and the watcher receives every message, in order, none missing or doubled, up to a final sentinel.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random

import pytest

from support.waits import wait_until
from support.ws import WAIT, client_frame, connected, recv, recv_until, send

# a fixed sample by default (reproducible); FUZZ_E2E_SEED and FUZZ_E2E_ATTACKERS draw others
SEED = int(os.environ.get("FUZZ_E2E_SEED", "20261201"))
ATTACKERS = 2 * (int(os.environ.get("FUZZ_E2E_ATTACKERS", "120")) // 2)  # half raw bytes, half JSON
MESSAGES = max(ATTACKERS, 10)
BATCH = 10                  # attackers at once


# ---- inputs ------------------------------------------------------------------------------------------------

ODD = ["", "a", "é", "💥", "\u0000", "\n", "/", "*", ">", "~", "x" * 300, "/a/b", "/fz/x", "/*/>", "/../x"]
NUMBERS = [0, -1, 1.5, 2 ** 53, 2 ** 53 + 1, -(2 ** 53) - 1, 2 ** 63, 2 ** 64 + 1, 10 ** 30, 1e308, -0.0]
OPS = ["connect", "subscribe", "unsubscribe", "publish", "ping", "refresh", "msg", ""]


def rand_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice(NUMBERS) if rng.random() < 0.5 else rng.randint(-(2 ** 70), 2 ** 70)
    if kind in (2, 3):
        if rng.random() < 0.6:
            return rng.choice(ODD)
        return "".join(chr(rng.randrange(1, 0x800)) for _ in range(rng.randrange(12)))
    if kind == 4:
        segments = ["fz", "a", "b", "*", ">", "x~y", "é", ""]
        return "/" + "/".join(rng.choice(segments) for _ in range(rng.randrange(1, 5)))
    if kind == 5:
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["op", "id", "subject", "subjects", "content", "seq", "k"]): rand_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


class Target:
    """What attackers aim at: their own topic (`fz` in standalone, a test topic in Kafka), and the
    epochs they learned from acks, so that recovery positions reach the recovery code."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.epochs: list[str] = []

    def subject(self, rng: random.Random) -> str:
        return f"/{self.topic}/{rng.randrange(5)}"

    def position(self, rng: random.Random) -> dict[str, object]:
        epoch = rng.choice(self.epochs) if self.epochs and rng.random() < 0.7 else rand_value(rng, 3)
        seq = rng.choice([0, 1, 2, 3, 1000, rng.randrange(1 << 20)] + NUMBERS)
        return {"epoch": epoch, "seq": seq}


def rand_request(rng: random.Random, target: Target) -> str:
    """One text frame's worth: mostly request-shaped JSON, sometimes JSON no encoder would write."""
    roll = rng.random()
    s = target.subject(rng)
    if roll < 0.15:
        return rng.choice([
            '{"op":"ping","id":NaN}', '{"op":"ping","id":Infinity}', '{"op":"ping","id":-Infinity}',
            '{"op":"publish","subject":"%s","content":"\\ud800"}' % s, '{"op":"ping","id":"\\udc00"}',
            '{"op":"publish","op":"ping","id":1}', '{"op":"ping","id":18446744073709551617}',
            '{"op":"publish","subject":"%s","content":"x","content_b64":"eA=="}' % s,
            '{"op":"subscribe","subjects":' + "[" * 2000 + "]" * 2000 + "}", "[" * 5000, '{"op":', "",
            '{"op":"publish","subject":"%s","content_b64":"not base64!"}' % s, "null", '"op"', "1e400",
            '{"op":"subscribe","subjects":[{"subject":"%s","epoch":"e","seq":18446744073709551615}]}' % s,
        ])
    obj: dict[str, object] = {"op": rng.choice(OPS)}
    for field in rng.sample(["id", "subject", "subjects", "content", "content_b64", "token", "epoch", "seq"],
                            rng.randrange(5)):
        obj[field] = rand_value(rng)
    if obj["op"] == "subscribe" and rng.random() < 0.6:
        obj["subjects"] = [{"subject": rand_value(rng, 3) if rng.random() < 0.2 else target.subject(rng),
                            **(target.position(rng) if rng.random() < 0.6 else {})}
                           for _ in range(rng.randrange(4))]
    if obj["op"] in ("publish", "unsubscribe") and rng.random() < 0.5:
        obj["subject"] = target.subject(rng)
        obj["subjects"] = [target.subject(rng)]
    return json.dumps(obj, allow_nan=True)


def rand_frames(rng: random.Random, target: Target) -> bytes:
    """Bytes after a valid upgrade: random, hostile frames, or valid frames with bits flipped."""
    roll = rng.random()
    if roll < 0.25:
        return rng.randbytes(rng.randrange(1, 300))
    frames = [client_frame(0x1, b'{"op":"connect"}')] if rng.random() < 0.7 else []
    for _ in range(rng.randrange(1, 6)):
        op = rng.choice([0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB, 0xF])
        payload = rng.choice([rand_request(rng, target).encode("utf-8", "surrogatepass"),
                              rng.randbytes(rng.randrange(140)),
                              b"\x03\xe8" + rng.randbytes(3), b"\xff\xfe", b""])
        frame = client_frame(op, payload, mask=rng.random() < 0.9, fin=rng.random() < 0.8)
        if rng.random() < 0.15:
            frame = bytes([frame[0] | rng.choice([0x10, 0x20, 0x40])]) + frame[1:]
        frames.append(frame)
    data = bytearray(b"".join(frames))
    if roll > 0.8:  # bit flips anywhere
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def rand_http(rng: random.Random, port: int) -> bytes:
    head = bytearray((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    for _ in range(rng.randrange(1, 5)):
        at = rng.randrange(len(head))
        if rng.random() < 0.5:
            head[at] ^= 1 << rng.randrange(8)
        else:
            head[at:at] = rng.choice([b"\r\n", b"\x00", b":", b" ", b"\r\n\r\n", rng.randbytes(8)])
    return bytes(head)


# ---- server output checks ---------------------------------------------------------------------------------

def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Parse what the gateway sent after its 101; any malformed frame fails the test."""
    out, i = [], 0
    while i < len(data):
        assert i + 2 <= len(data), f"truncated frame header at {i}"
        b0, b1 = data[i], data[i + 1]
        assert b0 & 0x80 and not b0 & 0x70 and not b1 & 0x80, f"bad server frame header {data[i:i + 2]!r}"
        op, n = b0 & 0x0F, b1 & 0x7F
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        assert i + n <= len(data), "truncated frame payload"
        out.append((op, data[i:i + n]))
        i += n
    for op, payload in out:
        assert op in (0x1, 0x8, 0x9, 0xA), op
        if op == 0x1:
            obj = json.loads(payload)
            assert isinstance(obj, dict) and isinstance(obj.get("op"), str), obj
        if op == 0x8:
            assert len(payload) != 1 and (not payload or payload[2:].decode("utf-8") is not None)
    return out


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded by WAIT)."""
    chunks = []
    async with asyncio.timeout(WAIT):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def raw_attacker(port: int, rng: random.Random, target: Target, stats: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if rng.random() < 0.2:  # a mutated request head instead of a valid upgrade
            writer.write(rand_http(rng, port))
            writer.write_eof()
            answer = await read_all(reader)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:200]
            stats["http"] += 1
            return
        writer.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        writer.write(rand_frames(rng, target))
        writer.write_eof()  # then the gateway closes too: its session ends, whatever the bytes did
        frames = server_frames(await read_all(reader))
        stats["closed" if any(op == 0x8 for op, _ in frames) else "eof"] += 1
    finally:
        writer.close()


async def json_attacker(url: str, rng: random.Random, target: Target, stats: dict[str, int]) -> None:
    ws = await connected(url)
    try:
        if rng.random() < 0.3:  # learn an epoch: later positions then reach the recovery code
            await send(ws, {"op": "publish", "subject": target.subject(rng), "content": "e", "id": "learn"})
            while (reply := await recv(ws))["op"] not in ("ack", "error"):
                pass
            if reply["op"] == "ack":
                target.epochs.append(reply["epoch"])
        for _ in range(rng.randrange(1, 8)):
            await ws.send(rand_request(rng, target))
        await send(ws, {"op": "ping", "id": "end"})
        while True:  # every answer is a valid frame; bad requests never close a connected session
            obj = await recv(ws)
            if obj == {"op": "pong", "id": "end"}:
                break
            if obj["op"] == "error":
                stats["errors"] += 1
        stats["json"] += 1
    finally:
        await ws.close()


async def healthz(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    answer = await read_all(reader)
    writer.close()
    return int(answer.split(b" ", 2)[1])


@pytest.fixture(params=["standalone", pytest.param("kafka", marks=pytest.mark.kafka)])
async def fuzz_gateway(request, gateway_factory, topic):
    """(gateway, the watched subject, the attackers' target) for each engine."""
    if request.param == "standalone":
        return await gateway_factory(), "/fzwatch/good", Target("fz")
    broker = request.getfixturevalue("kafka_broker")
    watch, attacked = topic("watch"), topic("fz")
    for t in (watch, attacked):
        await broker.create_topic(t, 3)
    gw = await gateway_factory(kafka=broker.bootstrap, topics=(watch, attacked),
                               kafka_idempotence="on" if broker.idempotence else "off")
    await wait_until(lambda: gw.engine.ready, "the Kafka engine caught up")
    return gw, f"/{watch}/good", Target(attacked)


async def test_fuzz_inputs_do_not_hurt_the_gateway_or_a_good_client(fuzz_gateway, caplog):
    loop = asyncio.get_running_loop()
    escaped: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    caplog.set_level(logging.WARNING, logger="gateway")
    gw, watch, target = fuzz_gateway
    url = f"ws://127.0.0.1:{gw.port}/ws"

    watcher = await connected(url)
    await send(watcher, {"op": "subscribe", "subjects": [{"subject": watch}]})
    assert (await recv_until(watcher, "subscribed"))["subject"] == watch
    publisher = await connected(url)
    acks = 0

    async def publish(n: int, content: str) -> None:
        nonlocal acks
        await send(publisher, {"op": "publish", "subject": watch, "content": content, "id": n})
        ack = await recv_until(publisher, "ack")
        assert ack["id"] == n
        acks += 1

    rng = random.Random(SEED)
    stats = {"http": 0, "closed": 0, "eof": 0, "json": 0, "errors": 0}
    sent = 0
    for start in range(0, ATTACKERS, BATCH):
        attackers = [raw_attacker(gw.port, random.Random(rng.random()), target, stats) if i % 2 else
                     json_attacker(url, random.Random(rng.random()), target, stats)
                     for i in range(start, start + BATCH)]
        tasks = [asyncio.ensure_future(a) for a in attackers]
        while sent < MESSAGES * (start + BATCH) // ATTACKERS:  # publishes interleaved with the attack
            sent += 1
            await publish(sent, f"m{sent}")
        await asyncio.gather(*tasks)
        assert not escaped, escaped
    await publish(sent + 1, "sentinel")

    got = []
    while not got or got[-1]["content"] != "sentinel":
        got.append(await recv_until(watcher, "msg"))
    assert [m["content"] for m in got] == [f"m{i}" for i in range(1, sent + 1)] + ["sentinel"]
    assert [m["seq"] for m in got] == list(range(1, sent + 2))
    assert all(m.get("prev", m["seq"] - 1) == m["seq"] - 1 for m in got)  # Kafka: prev when known
    assert acks == sent + 1

    # every attacker hung up, and the gateway forgot it (only the watcher and the publisher are left)
    await wait_until(lambda: len(gw.sessions) == 2 and not gw._unconnected, "attacker sessions closed")
    assert await healthz(gw.port) == 200
    assert not escaped, escaped
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # the sample did exercise each kind of attacker
    assert stats["json"] == ATTACKERS // 2 and stats["errors"] > ATTACKERS // 2, stats
    assert stats["http"] > 0 and stats["closed"] > 0
    assert stats["http"] + stats["closed"] + stats["eof"] == ATTACKERS // 2
    await watcher.close()
    await publisher.close()
