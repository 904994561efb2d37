"""The memory budget (--history-total-bytes) against a real gateway over real sockets: a client sprays
thousands of distinct subjects while another one is subscribed; the gateway's accounting (read from
/metrics) stays under the budget, the subscriber gets every message in order, and a forgotten subject
comes back in a new epoch (standalone) or is read again from Kafka (Kafka engine)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from conftest import SCALE, ws_url
from gateway.subjects import parse_subject
from support.kafka_broker import KafkaBroker
from support.waits import wait_until
from support.ws import connected, recv_until, send

WAIT = 10.0 * SCALE
BUDGET = 300_000


async def metrics(port: int) -> dict[str, float]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        body = (await asyncio.wait_for(reader.read(), WAIT)).split(b"\r\n\r\n", 1)[1].decode()
    finally:
        writer.close()
    out = {}
    for line in body.splitlines():
        if line.startswith("gateway_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class Subscriber:
    """Reads one connection in the background; msgs of every subject, other frames in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.msgs: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async for data in self.ws:
            obj = json.loads(data)
            (self.msgs if obj["op"] == "msg" else self.frames).append(obj)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.ws.close()


async def publish_acked(ws: ClientConnection, subject: str, content: str, id_: int) -> dict[str, Any]:
    await send(ws, {"op": "publish", "id": id_, "subject": subject, "content": content})
    ack = await recv_until(ws, "ack")
    assert ack["id"] == id_, ack
    return ack


async def test_standalone_spray_stays_under_the_budget(gateway_factory: Any) -> None:
    gw = await gateway_factory(history_total_bytes=BUDGET, history=50, publish_rate=0)   # a spray, unthrottled
    url = ws_url(gw)
    sub = Subscriber(await connected(url))
    await send(sub.ws, {"op": "subscribe", "subjects": [{"subject": "/live/1"}]})
    await wait_until(lambda: len(sub.frames) == 1, "subscribed")
    spray = await connected(url)
    old = [await publish_acked(spray, "/old/x", f"old {i}", i) for i in range(3)]
    epoch0 = old[-1]["epoch"]
    assert [a["seq"] for a in old] == [1, 2, 3]

    live_sent = 0
    peak = 0.0
    for batch in range(30):
        for i in range(200):   # 200 distinct subjects, and the live one
            await send(spray, {"op": "publish", "subject": f"/spray/{batch}-{i}", "content": "x" * 40})
            if i % 20 == 0:
                live_sent += 1
                await send(spray, {"op": "publish", "subject": "/live/1", "content": f"live {live_sent}"})
        await publish_acked(spray, "/spray/mark", str(batch), 1000 + batch)   # all of the batch is in
        m = await metrics(gw.port)
        assert m["gateway_history_bytes"] <= m["gateway_history_budget_bytes"] == BUDGET
        peak = max(peak, m["gateway_history_bytes"])
    m = await metrics(gw.port)
    assert m["gateway_subjects_forgotten_total"] > 5000
    assert m["gateway_subjects"] < 6000 - 5000
    assert peak > BUDGET / 2   # the budget was really reached
    # the subscriber got every live message, in order, with nothing in between
    await wait_until(lambda: len(sub.msgs) == live_sent, f"{live_sent} live messages")
    assert [(x["seq"], x["content"]) for x in sub.msgs] == [(n, f"live {n}") for n in range(1, live_sent + 1)]
    assert all(x.get("prev") == x["seq"] - 1 for x in sub.msgs)

    # /old/x was forgotten: its old position answers recovered:false, and it comes back in a new epoch
    assert gw.hub.get("/old/x") is None
    await send(spray, {"op": "subscribe", "subjects": [{"subject": "/old/x", "epoch": epoch0, "seq": 3}]})
    answer = await recv_until(spray, "subscribed")
    assert (answer["recovered"], answer["seq"]) == (False, 0) and answer["epoch"] != epoch0
    await send(spray, {"op": "publish", "id": 5000, "subject": "/old/x", "content": "new"})
    msg = await recv_until(spray, "msg")   # fanned out (to this subscriber too), then acknowledged
    ack = await recv_until(spray, "ack")
    assert (ack["id"], ack["seq"], ack["epoch"]) == (5000, 1, answer["epoch"])
    assert (msg["seq"], msg["epoch"], msg["prev"], msg["content"]) == (1, answer["epoch"], 0, "new")
    # the sentinel: the subscriber of /live/1 received nothing else meanwhile
    await publish_acked(spray, "/live/1", "sentinel", 5001)
    await wait_until(lambda: len(sub.msgs) == live_sent + 1, "the sentinel")
    assert sub.msgs[-1]["content"] == "sentinel" and not [f for f in sub.frames if f["op"] != "subscribed"]
    await sub.stop()
    await spray.close()


@pytest.mark.kafka
async def test_kafka_forgotten_subject_is_read_from_kafka_again(
        kafka_broker: KafkaBroker, gateway_factory: Any, topic: Callable[[str], str]) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 1)
    gw = await gateway_factory(kafka=kafka_broker.bootstrap, topics=(t,), history_total_bytes=BUDGET,
                               kafka_idempotence="on" if kafka_broker.idempotence else "off",
                               max_recovery_records=10_000)
    await wait_until(lambda: gw.engine.ready, "the Kafka engine caught up")
    url = ws_url(gw)
    sub = Subscriber(await connected(url))
    await send(sub.ws, {"op": "subscribe", "subjects": [{"subject": f"/{t}/live"}]})
    await wait_until(lambda: len(sub.frames) == 1, "subscribed")

    producer = kafka_broker.producer(linger_ms=5)
    await producer.start()
    try:
        old = [await (await producer.send(t, b"old %d" % i, key=b"old")) for i in range(3)]
        futures = []
        for i in range(3000):
            futures.append(await producer.send(t, b"y" * 40, key=b"spray-%d" % i))
            if i % 30 == 0:
                futures.append(await producer.send(t, b"live %d" % i, key=b"live"))
        metas = [await f for f in futures]
    finally:
        await producer.stop()
    end = metas[-1].offset + 1
    await wait_until(lambda: gw.engine.read_through(parse_subject(f"/{t}/old")) == end, "every record read")
    m = await metrics(gw.port)
    assert m["gateway_history_bytes"] <= BUDGET and m["gateway_subjects_forgotten_total"] > 1000
    assert gw.hub.get(f"/{t}/old") is None
    await wait_until(lambda: len(sub.msgs) == 100, "every live message")
    assert [x["content"] for x in sub.msgs] == [f"live {i}" for i in range(0, 3000, 30)]
    assert all(a["seq"] < b["seq"] for a, b in zip(sub.msgs, sub.msgs[1:]))

    old_seqs = [r.offset + 1 for r in old]
    ws = await connected(url)
    # a new subscriber gets the snapshot, read from Kafka
    await send(ws, {"op": "subscribe", "subjects": [{"subject": f"/{t}/old"}]})
    answer = await recv_until(ws, "subscribed")
    assert answer["recovered"] is False and answer["seq"] == old_seqs[-1]
    snap = await recv_until(ws, "msg")
    assert (snap["seq"], snap["content"], snap.get("snapshot")) == (old_seqs[-1], "old 2", True)
    epoch = answer["epoch"]
    # a position is still valid: the rest is read from Kafka
    ws2 = await connected(url)
    await send(ws2, {"op": "subscribe", "subjects": [{"subject": f"/{t}/old", "epoch": epoch, "seq": old_seqs[0]}]})
    answer = await recv_until(ws2, "subscribed")
    assert (answer["recovered"], answer["epoch"]) == (True, epoch)
    got = [await recv_until(ws2, "msg") for _ in range(2)]
    assert [(x["seq"], x["content"]) for x in got] == [(old_seqs[1], "old 1"), (old_seqs[2], "old 2")]
    # both are live now: one more record reaches both, and nothing else came before it
    producer = kafka_broker.producer(linger_ms=0)
    await producer.start()
    try:
        last = await (await producer.send(t, b"old 3", key=b"old"))
    finally:
        await producer.stop()
    for w in (ws, ws2):
        x = await recv_until(w, "msg")
        assert (x["seq"], x["content"]) == (last.offset + 1, "old 3")
    await sub.stop()
    await ws.close()
    await ws2.close()
