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


def test_client_counts_duplicate_gap_and_out_of_order() -> None:
    sys.path.insert(0, loadgen.build_client())
    import loadclient

    ready, stop, port_box = threading.Event(), threading.Event(), []
    server = threading.Thread(target=_fake_gateway, args=(ready, port_box, stop), daemon=True)
    server.start()
    try:
        assert ready.wait(10)
        subjects = np.array([[1, 2]], dtype=np.int32)
        client = loadclient.Client("127.0.0.1", port_box[0], "127.0.0.2", subjects, "/matches/football/", 8, 100)
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
