"""The load generator's C client counts what a misbehaving server does (`pytest benchmarks/load`, bench extra).

A fake gateway (the websockets library, in a thread) answers the upgrade, `connect` and `subscribe`, then
sends on /matches/football/1: seq 1, 2, 2 (a duplicate), 4 (a gap: 3 lost), 3 (out of order), each with
a monotonic timestamp as content. The client's counters and its "behind" check must say exactly that.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadgen  # noqa: E402

SUBJECT = "/matches/football/1"


def _fake_gateway(ready: threading.Event, port_box: list[int], stop: threading.Event) -> None:
    from websockets.asyncio.server import serve

    def msg(seq: int, prev: int) -> str:
        return json.dumps({"op": "msg", "subject": SUBJECT, "content": f"{time.monotonic_ns()}|x",
                           "epoch": "fake", "seq": seq, "prev": prev, "ts": 0})

    async def handler(ws) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["op"] == "connect":
                await ws.send(json.dumps({"op": "connected", "session": "s", "server": "fake",
                                          "heartbeat_ms": 15000, "version": 1}))
            elif frame["op"] == "subscribe":
                for entry in frame["subjects"]:
                    await ws.send(json.dumps({"op": "subscribed", "subject": entry["subject"], "epoch": "fake",
                                              "seq": 0, "recovered": False}))
                for seq, prev in ((1, 0), (2, 1), (2, 1), (4, 3), (3, 2)):
                    await ws.send(msg(seq, prev))

    async def main() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port_box.append(server.sockets[0].getsockname()[1])
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

    asyncio.run(main())


@pytest.mark.parametrize("pace_us", [0, 2000])
def test_client_counts_duplicate_gap_and_out_of_order(pace_us: int) -> None:
    """Also paced (kafka_100k.py --client-sched batch:PACE_US): sleeping after work loses nothing."""
    sys.path.insert(0, loadgen.build_client())
    import loadclient

    ready, stop, port_box = threading.Event(), threading.Event(), []
    server = threading.Thread(target=_fake_gateway, args=(ready, port_box, stop), daemon=True)
    server.start()
    try:
        assert ready.wait(10)
        subjects = np.array([[1, 2]], dtype=np.int32)
        client = loadclient.Client("127.0.0.1", port_box[0], "127.0.0.2", subjects, "/matches/football/", 8, 100)
        with pytest.raises(ValueError):
            client.set_pace(-1)
        client.set_pace(pace_us)
        client.set_recording(True)
        deadline = time.monotonic() + 10
        while client.stats()["deliveries"] < 5 and time.monotonic() < deadline:
            client.run(0.05)
        stats = client.stats()
        assert stats["ready"] == 1 and stats["failed"] == 0, stats
        assert (stats["deliveries"], stats["duplicates"], stats["gaps"], stats["lost_in_gaps"],
                stats["out_of_order"]) == (5, 1, 1, 1, 1), stats
        latencies = np.frombuffer(client.latencies_ns(), dtype=np.int64)
        assert len(latencies) == 3 and (latencies > 0).all()  # 1, 2 and 4: the ones taken in order
        assert client.behind({1: 5, 2: 0}) == (1, 1)          # seq 5 never came
        assert client.behind({1: 4, 2: 0}) == (0, 0)
    finally:
        stop.set()
        server.join(10)


# ---------------------------------------------------------------------------------------------------
# The peers' protocols of benchmarks/compare.py: NATS over WebSocket and MQTT 3.1.1 over TCP. The
# payload is "<ns>|<seq>|..." (the publisher's seq per subject); the same sequence 1, 2, 2, 4, 3 must be
# counted as one duplicate, one gap (1 lost) and one out of order.

PEER_SEQS = (1, 2, 2, 4, 3)


def _peer_payload(seq: int) -> bytes:
    return f"{time.monotonic_ns()}|{seq}|xxxx".encode()


def _serve_in_thread(main) -> tuple[threading.Event, list, threading.Event, threading.Thread]:
    ready, stop, box = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=lambda: asyncio.run(main(ready, box, stop)), daemon=True)
    thread.start()
    assert ready.wait(10)
    return ready, box, stop, thread


def _run_until(client, done, seconds: float = 10.0) -> dict:
    deadline = time.monotonic() + seconds
    while not done(client.stats()) and time.monotonic() < deadline:
        client.run(0.05)
    return client.stats()


def test_nats_mode_subscribes_reads_a_split_stream_and_answers_ping() -> None:
    """The fake NATS server checks CONNECT, the SUBs (sid = slot) and PING, answers PONG (ready), then
    sends the MSGs in frames that do not follow the protocol's boundaries, and a PING of its own."""
    sys.path.insert(0, loadgen.build_client())
    import loadclient

    seen: list[bytes] = []

    async def main(ready, box, stop) -> None:
        from websockets.asyncio.server import serve

        async def handler(ws) -> None:
            await ws.send(b'INFO {"server_id":"fake","max_payload":1048576}\r\n')
            async for raw in ws:
                data = raw.encode() if isinstance(raw, str) else raw
                seen.append(data)
                if b"PING\r\n" in data and data.startswith(b"CONNECT "):
                    await ws.send(b"PONG\r\n")
                    stream = b"".join(b"MSG matches.football.1 0 %d\r\n%s\r\n" % (len(p), p)
                                      for p in map(_peer_payload, PEER_SEQS))
                    cut1, cut2 = 20, len(stream) - 7  # inside the first header, inside the last payload
                    for piece in (stream[:cut1], stream[cut1:cut2], stream[cut2:], b"PING\r\n"):
                        await ws.send(piece)

        async with serve(handler, "127.0.0.1", 0) as server:
            box.append(server.sockets[0].getsockname()[1])
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

    _, box, stop, thread = _serve_in_thread(main)
    try:
        subjects = np.array([[1, 2]], dtype=np.int32)
        client = loadclient.Client("127.0.0.1", box[0], "127.0.0.2", subjects, "matches.football.", 8, 100, "nats")
        client.set_recording(True)
        stats = _run_until(client, lambda s: s["deliveries"] >= 5 and s["pings"] >= 1)
        assert stats["ready"] == 1 and stats["failed"] == 0, stats
        assert (stats["deliveries"], stats["duplicates"], stats["gaps"], stats["lost_in_gaps"],
                stats["out_of_order"], stats["bad_frames"], stats["pings"]) == (5, 1, 1, 1, 1, 0, 1), stats
        assert len(np.frombuffer(client.latencies_ns(), dtype=np.int64)) == 3
        assert client.behind({1: 4, 2: 0}) == (0, 0) and client.behind({1: 5, 2: 0}) == (1, 1)
        _run_until(client, lambda s: b"PONG\r\n" in seen[-1:], 5)
        hello = seen[0].decode()
        assert hello.startswith("CONNECT {") and "SUB matches.football.1 0\r\n" in hello
        assert hello.endswith("SUB matches.football.2 1\r\nPING\r\n"), hello
        assert seen[-1] == b"PONG\r\n", seen  # the answer to the server's PING
    finally:
        stop.set()
        thread.join(10)


async def _read_mqtt(reader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    n, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return first, await reader.readexactly(n)


def test_mqtt_qos1_mode_connects_subscribes_and_acknowledges_every_publish() -> None:
    """The fake broker checks CONNECT (MQTT 3.1.1, clean session) and SUBSCRIBE (both topics at QoS 1),
    then sends PUBLISH QoS 1 (one split over two writes) and one QoS 0: five PUBACKs must come back, with
    the packet ids in order, and none for the QoS 0 message."""
    sys.path.insert(0, loadgen.build_client())
    import loadclient

    got: dict = {"pubacks": []}

    async def main(ready, box, stop) -> None:
        handlers: set[asyncio.Task] = set()

        async def handle(reader, writer) -> None:
            handlers.add(asyncio.current_task())  # awaited below: the loop must not close under it
            try:
                await serve(reader, writer)
            finally:
                writer.close()
                await writer.wait_closed()

        async def serve(reader, writer) -> None:
            first, body = await _read_mqtt(reader)
            got["connect"] = (first, body[:8])
            writer.write(b"\x20\x02\x00\x00")
            first, body = await _read_mqtt(reader)
            got["subscribe"] = (first, body)
            writer.write(b"\x90\x04" + body[:2] + b"\x01\x01")
            topic = b"\x00\x12matches/football/1"
            packets = [loadgen.mqtt_packet(0x32, topic + (10 + i).to_bytes(2, "big") + _peer_payload(seq))
                       for i, seq in enumerate(PEER_SEQS)]
            packets.append(loadgen.mqtt_packet(0x30, b"\x00\x12matches/football/2" + _peer_payload(1)))
            stream = b"".join(packets)
            writer.write(stream[:30])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(stream[30:])
            while len(got["pubacks"]) < 5:
                got["pubacks"].append(await _read_mqtt(reader))
            while not stop.is_set():
                await asyncio.sleep(0.02)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        box.append(server.sockets[0].getsockname()[1])
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        server.close()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    _, box, stop, thread = _serve_in_thread(main)
    try:
        subjects = np.array([[1, 2]], dtype=np.int32)
        client = loadclient.Client("127.0.0.1", box[0], "127.0.0.2", subjects, "matches/football/", 8, 100, "mqtt1")
        client.set_recording(True)
        stats = _run_until(client, lambda s: s["deliveries"] >= 6)
        assert stats["ready"] == 1 and stats["failed"] == 0, stats
        assert (stats["deliveries"], stats["duplicates"], stats["gaps"], stats["lost_in_gaps"],
                stats["out_of_order"], stats["bad_frames"], stats["acks_sent"]) == (6, 1, 1, 1, 1, 0, 5), stats
        assert client.behind({1: 4, 2: 1}) == (0, 0)
        deadline = time.monotonic() + 5
        while len(got["pubacks"]) < 5 and time.monotonic() < deadline:
            client.run(0.05)
        assert got["pubacks"] == [(0x40, (10 + i).to_bytes(2, "big")) for i in range(5)]
        first, head = got["connect"]
        assert first == 0x10 and head == b"\x00\x04MQTT\x04\x02", head
        first, body = got["subscribe"]
        assert first == 0x82 and body[2:] == b"\x00\x12matches/football/1\x01\x00\x12matches/football/2\x01", body
    finally:
        stop.set()
        thread.join(10)
