"""The gateway in Kafka mode, end to end: a real broker (Tansu, or KAFKA_BOOTSTRAP), real gateways
(in this loop, or `python -m gateway serve` subprocesses), real WebSocket clients (the `websockets`
library written from PROTOCOL.md, and our SDK), plain aiokafka producers and consumers on the side.

Each test uses topics of its own. Waits are bounded polls scaled by TEST_TIMEOUT_SCALE; the only
timing asserted is "within a bound" (unavailable during an outage).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from conftest import SCALE, ws_url
from gateway.client import Client, Message
from gateway.engines.kafka import partition_for_key
from gateway.subjects import parse_subject
from support.kafka_broker import KafkaBroker
from support.kafka_gateway import GatewayProcess, http_status, kafka_gateway
from support.metrics import metric
from support.waits import wait_until  # noqa: E402
from support.ws import close_code, connected, open_ws, recv, recv_until, send

pytestmark = pytest.mark.kafka

WAIT = 10.0 * SCALE


# ------------------------------------------------------------------------------------------ helpers


class Collector:
    """Reads one WebSocket connection in the background: msgs per subject, other frames in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.msgs: dict[str, list[dict[str, Any]]] = {}
        self.frames: list[dict[str, Any]] = []
        self.closed: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                obj = json.loads(await self.ws.recv())
                if obj["op"] == "msg":
                    self.msgs.setdefault(obj["subject"], []).append(obj)
                else:
                    self.frames.append(obj)
        except ConnectionClosed as exc:
            self.closed = exc

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["op"] == op]

    def count(self) -> int:
        return sum(len(v) for v in self.msgs.values())

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.ws.close()


async def flush_with_sentinels(pub: ClientConnection, subjects: list[str], collectors: list[Collector]) -> None:
    """Prove that nothing more arrives: publish one sentinel per subject through `pub`, wait until it
    is the last message of that subject on every collector (messages of a subject arrive in order, so
    everything before it has arrived too), then drop the sentinels from the collectors."""
    for s in subjects:
        await send(pub, {"op": "publish", "subject": s, "content": f"sentinel {s}", "id": f"sentinel {s}"})
    await wait_until(lambda: all(c.msgs.get(s) and c.msgs[s][-1]["content"] == f"sentinel {s}"
                                 for c in collectors for s in subjects), "the sentinels")
    for c in collectors:
        for s in subjects:
            c.msgs[s].pop()


def assert_chain(msgs: list[dict[str, Any]], after: int | None = None) -> None:
    """seq strictly increasing, each prev the seq before it (from `after` on, when given)."""
    last = after
    for m in msgs:
        if last is not None:
            assert m["seq"] > last, (m, last)
            if "prev" in m:
                assert m["prev"] == last, (m, last)
        last = m["seq"]


# ------------------------------------------------------------------------------------------ tests

async def test_kafka_record_reaches_subscriber_and_publish_reaches_kafka(
        kafka_broker: KafkaBroker, gateway_factory: Any, topic: Callable[[str], str]) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 3)
    gw = await kafka_gateway(gateway_factory, kafka_broker, [t])
    subject = f"/{t}/football/5"
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": subject}]})
    sub = await recv_until(ws, "subscribed")
    assert (sub["subject"], sub["seq"], sub["recovered"]) == (subject, 0, False)
    epoch = sub["epoch"]

    # Produced straight to Kafka by another producer: seq = offset + 1, the partition's epoch.
    (meta,) = await kafka_broker.produce(t, [(b"football/5", b"goal")])
    assert meta.partition == partition_for_key(b"football/5", 3)
    m = await recv_until(ws, "msg")
    assert (m["subject"], m["content"], m["epoch"], m["seq"], m["prev"], m["ts"]) == (
        subject, "goal", epoch, meta.offset + 1, 0, meta.timestamp)

    # Published through the gateway: acked once Kafka has it, at offset + 1; also delivered.
    await send(ws, {"op": "publish", "subject": subject, "content": "1-0", "id": "p1"})
    await send(ws, {"op": "publish", "subject": subject, "content_b64": "/w==", "id": 7})
    frames = [await recv(ws) for _ in range(4)]
    acks = {f["id"]: f for f in frames if f["op"] == "ack"}
    msgs = [f for f in frames if f["op"] == "msg"]
    assert set(acks) == {"p1", 7} and len(msgs) == 2
    assert [(a["subject"], a["epoch"]) for a in acks.values()] == [(subject, epoch)] * 2
    assert [(x["seq"], x.get("content"), x.get("content_b64")) for x in msgs] == [
        (acks["p1"]["seq"], "1-0", None), (acks[7]["seq"], None, "/w==")]
    assert_chain([m, *msgs])

    records = await kafka_broker.read_topic(t, 3)
    mine = [(r.topic, r.partition, r.key, r.value, r.offset + 1) for r in records]
    assert mine == [(t, meta.partition, b"football/5", b"goal", meta.offset + 1),
                    (t, meta.partition, b"football/5", b"1-0", acks["p1"]["seq"]),
                    (t, meta.partition, b"football/5", b"\xff", acks[7]["seq"])]
    await ws.close()


async def test_records_of_other_producers_with_odd_keys_and_values(
        kafka_broker: KafkaBroker, gateway_factory: Any, topic: Callable[[str], str]) -> None:
    """What other Kafka clients write into a served topic: keys that are no subject tail (empty, '%',
    unicode, not UTF-8, a leading slash) are skipped and counted, a null key outside partition 0 too;
    a null key in partition 0 is /T, slashes make segments, a non-UTF-8 value travels as content_b64 and
    a null one as "". None of it disturbs the other subjects, live or replayed from Kafka."""
    t = topic()
    await kafka_broker.create_topic(t, 2)
    gw = await kafka_gateway(gateway_factory, kafka_broker, [t], history=1)
    subjects = [f"/{t}", f"/{t}/a/b/c", f"/{t}/ok"]
    ws = await connected(ws_url(gw))
    c = Collector(ws)
    await send(ws, {"op": "subscribe", "subjects": [{"subject": s} for s in subjects]})
    await wait_until(lambda: len(c.ops("subscribed")) == 3, "subscribed")
    epochs = {f["subject"]: f["epoch"] for f in c.ops("subscribed")}
    bad = [b"", b"100%", "\u00fc".encode(), b"\xff", b"/lead", b"a b"]
    producer = kafka_broker.producer()
    await producer.start()
    try:
        for p in (0, 1):
            for k in bad:
                await producer.send_and_wait(t, b"bad", key=k, partition=p)
        await producer.send_and_wait(t, b"keyless elsewhere", key=None, partition=1)
        keyless = await producer.send_and_wait(t, b"keyless", key=None, partition=0)
        binary = await producer.send_and_wait(t, b"\xff\xfe", key=b"a/b/c")
        null = await producer.send_and_wait(t, None, key=b"a/b/c")
        ok = await producer.send_and_wait(t, "caf\u00e9".encode(), key=b"ok")
    finally:
        await producer.stop()
    pub = await connected(ws_url(gw))
    try:
        await flush_with_sentinels(pub, subjects, [c])
        got = {s: [(m["seq"], m.get("content"), m.get("content_b64")) for m in c.msgs.get(s, [])] for s in subjects}
        expected = {
            subjects[0]: [(keyless.offset + 1, "keyless", None)],
            subjects[1]: [(binary.offset + 1, None, "//4="), (null.offset + 1, "", None)],
            subjects[2]: [(ok.offset + 1, "caf\u00e9", None)],
        }
        assert got == expected
        for s in subjects:
            assert {m["epoch"] for m in c.msgs[s]} == {epochs[s]}
            assert_chain(c.msgs[s])
        stats = gw.engine.stats()
        assert (stats["records_skipped_bad_key"], stats["records_skipped_keyless"]) == (2 * len(bad), 1)
        # The same from Kafka: a replay of the whole epoch reads past the skipped records (history=1,
        # so the ring cannot serve it).
        ws2 = await connected(ws_url(gw))
        c2 = Collector(ws2)
        await send(ws2, {"op": "subscribe",
                         "subjects": [{"subject": s, "epoch": epochs[s], "seq": 0} for s in subjects]})
        await wait_until(lambda: len(c2.ops("subscribed")) == 3, "subscribed with seq 0")
        assert [f["recovered"] for f in c2.ops("subscribed")] == [True] * 3
        await flush_with_sentinels(pub, subjects, [c, c2])
        for s in subjects:   # the first sentinel is in Kafka: replayed after the records
            assert [(m["seq"], m.get("content"), m.get("content_b64")) for m in c2.msgs[s]][:-1] == expected[s]
            assert c2.msgs[s][-1]["content"] == f"sentinel {s}"
            assert_chain(c2.msgs[s], 0)
        await c2.stop()
    finally:
        await c.stop()
        await pub.close()


async def test_a_record_too_large_as_delivered_is_skipped_not_a_subject_down(
        kafka_broker: KafkaBroker, gateway_factory: Any, topic: Callable[[str], str]) -> None:
    """A record of another producer whose content as delivered is over --max-message-bytes (here valid
    UTF-8 of control characters, 6 bytes each once JSON-escaped) would be a msg over --max-pending-bytes:
    every subscriber of the subject, and every later one (the snapshot, a replay), closed 4000 again and
    again. It is skipped and counted; the next record of the subject carries the last one delivered as
    prev, live and on recovery, and nothing else is disturbed."""
    t = topic()
    await kafka_broker.create_topic(t, 1)
    limit = 64 * 1024
    gw = await kafka_gateway(gateway_factory, kafka_broker, [t], max_message_bytes=limit,
                             max_pending_bytes=2 * limit)
    sa, sb = f"/{t}/a", f"/{t}/b"
    ws = await connected(ws_url(gw))
    c = Collector(ws)
    await send(ws, {"op": "subscribe", "subjects": [{"subject": sa}, {"subject": sb}]})
    await wait_until(lambda: len(c.ops("subscribed")) == 2, "subscribed")
    epoch = c.ops("subscribed")[0]["epoch"]
    big = b"\x01" * (limit // 2)   # 32 KiB in Kafka; 192 KiB as delivered, over max-pending-bytes
    m1, m2, other, m3 = await kafka_broker.produce(t, [(b"a", b"m1"), (b"a", big), (b"b", b"other"), (b"a", b"m3")])
    pub = await connected(ws_url(gw))
    try:
        await flush_with_sentinels(pub, [sa, sb], [c])
        assert c.closed is None
        assert [(m["seq"], m["prev"], m["content"]) for m in c.msgs[sa]] == [
            (m1.offset + 1, 0, "m1"), (m3.offset + 1, m1.offset + 1, "m3")]
        assert [(m["seq"], m["content"]) for m in c.msgs[sb]] == [(other.offset + 1, "other")]
        assert await asyncio.to_thread(metric, gw.port, "gateway_engine",
                                         '{engine="kafka",name="records_skipped_too_large"}') == 1
        # From here on each step ends with a marker of its own, published once its subscriber is in: the
        # marker arrives after everything before it (one subject's messages arrive in order).
        async def marker(text: str, collectors: list[Collector]) -> None:
            await send(pub, {"op": "publish", "subject": sa, "content": text, "id": text})
            await wait_until(lambda: all(x.msgs.get(sa) and x.msgs[sa][-1]["content"] == text
                                         for x in collectors), text)

        def got(x: Collector) -> list[tuple[int, int | None, str, bool]]:
            return [(m["seq"], m.get("prev"), m["content"], m.get("snapshot", False)) for m in x.msgs[sa]]

        # A fresh subscriber at m1 recovers from memory: m3 (prev m1), the first sentinel, then live.
        ws2 = await connected(ws_url(gw))
        c2 = Collector(ws2)
        await send(ws2, {"op": "subscribe", "subjects": [{"subject": sa, "epoch": epoch, "seq": m1.offset + 1}]})
        await wait_until(lambda: len(c2.ops("subscribed")) == 1, "subscribed at m1")
        assert c2.ops("subscribed")[0]["recovered"] is True
        await marker("after c2", [c, c2])
        assert [x[1:] for x in got(c2)] == [(m1.offset + 1, "m3", False), (m3.offset + 1, f"sentinel {sa}", False),
                                            (got(c2)[1][0], "after c2", False)]
        assert_chain(c2.msgs[sa], m1.offset + 1)
        # A fresh subscriber without a position: the newest message as its snapshot, then live; no 4000.
        ws3 = await connected(ws_url(gw))
        c3 = Collector(ws3)
        await send(ws3, {"op": "subscribe", "subjects": [{"subject": sa}]})
        await wait_until(lambda: len(c3.ops("subscribed")) == 1, "subscribed fresh")
        await marker("after c3", [c, c2, c3])
        assert [(x[2], x[3]) for x in got(c3)] == [("after c2", True), ("after c3", False)]
        # The same from Kafka: a gateway holding one message per subject replays the position at m1.
        gw2 = await kafka_gateway(gateway_factory, kafka_broker, [t], max_message_bytes=limit,
                                  max_pending_bytes=2 * limit, history=1)
        replays = gw2.engine.stats()["replays"]
        ws4 = await connected(ws_url(gw2))
        c4 = Collector(ws4)
        await send(ws4, {"op": "subscribe", "subjects": [{"subject": sa, "epoch": epoch, "seq": m1.offset + 1}]})
        await wait_until(lambda: len(c4.ops("subscribed")) == 1, "subscribed at m1 on the second gateway")
        assert c4.ops("subscribed")[0]["recovered"] is True
        assert gw2.engine.stats()["replays"] == replays + 1
        await marker("after c4", [c, c4])
        assert [x[2] for x in got(c4)] == ["m3", f"sentinel {sa}", "after c2", "after c3", "after c4"]
        assert got(c4)[0][:2] == (m3.offset + 1, m1.offset + 1)
        assert_chain(c4.msgs[sa], m1.offset + 1)
        assert (c.closed, c2.closed, c3.closed, c4.closed) == (None, None, None, None)
        await c2.stop()
        await c3.stop()
        await c4.stop()
    finally:
        await c.stop()
        await pub.close()


async def test_unknown_topic(kafka_broker: KafkaBroker, gateway_factory: Any, topic: Callable[[str], str]) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 1)
    gw = await kafka_gateway(gateway_factory, kafka_broker, [t])
    other = f"/{topic('other')}/x"
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "publish", "subject": other, "content": "x", "id": 1})
    err = await recv_until(ws, "error")
    assert (err["code"], err["id"], err["subject"]) == ("unknown_topic", 1, other)
    await send(ws, {"op": "publish", "subject": other, "content": "x"})
    err = await recv_until(ws, "error")
    assert err["code"] == "unknown_topic" and "id" not in err
    await send(ws, {"op": "subscribe", "subjects": [{"subject": other}, {"subject": f"/{t}/ok"}]})
    err = await recv_until(ws, "error")
    assert (err["code"], err["subject"]) == ("unknown_topic", other)
    ok = await recv_until(ws, "subscribed")
    assert ok["subject"] == f"/{t}/ok"
    await ws.close()


async def test_healthz_503_until_caught_up(kafka_broker: KafkaBroker, gateway_factory: Any,
                                           topic: Callable[[str], str]) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 2)
    n = 30_000
    await kafka_broker.produce(t, [(b"s/%d" % (i % 50), b"%d" % i) for i in range(n)])
    gw = await kafka_gateway(gateway_factory, kafka_broker, [t], warmup_records=n, wait_ready=False)
    statuses = [await http_status(gw.port)]
    while statuses[-1] != 200 and len(statuses) < 2000:
        await asyncio.sleep(0.005)
        statuses.append(await http_status(gw.port))
    assert statuses[0] == 503 and statuses[-1] == 200, statuses[:3]
    # Healthy means caught up: everything the topic held is in the hub, no lag.
    assert gw.hub.stats.records == n and gw.engine.stats()["lag"] == 0
    assert await http_status(gw.port) == 200


async def test_two_gateways_agree(kafka_broker: KafkaBroker, gateway_factory: Any,
                                  topic: Callable[[str], str]) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 2)
    gw_a = await kafka_gateway(gateway_factory, kafka_broker, [t])
    gw_b = await kafka_gateway(gateway_factory, kafka_broker, [t])
    subjects = [f"/{t}/x", f"/{t}/y/1", f"/{t}"]
    collectors = []
    for gw in (gw_a, gw_b):
        ws = await connected(ws_url(gw))
        await send(ws, {"op": "subscribe", "subjects": [{"subject": s} for s in subjects]})
        for _ in subjects:
            await recv_until(ws, "subscribed")
        collectors.append(Collector(ws))
    await kafka_broker.produce(t, [(b"x", b"k1"), (b"y/1", b"k2"), (b"x", b"k3")])
    pub = await connected(ws_url(gw_a))
    for i, s in enumerate(subjects * 2):
        await send(pub, {"op": "publish", "subject": s, "content": f"a{i}", "id": i})
    pub_b = await connected(ws_url(gw_b))
    await send(pub_b, {"op": "publish", "subject": subjects[0], "content": "b", "id": "b"})
    await wait_until(lambda: all(c.count() == 10 for c in collectors), "10 messages on both gateways")
    await flush_with_sentinels(pub, subjects, collectors)
    a, b = collectors
    assert a.msgs == b.msgs   # same epoch, seq, prev, ts and content, in the same order per subject
    epochs = {s: {m["epoch"] for m in msgs} for s, msgs in a.msgs.items()}
    assert all(len(e) == 1 for e in epochs.values())   # one epoch per partition
    assert (epochs[subjects[0]] == epochs[subjects[2]]) == (partition_for_key(b"x", 2) == 0)
    for msgs in a.msgs.values():
        assert_chain(msgs, 0)
    for c in collectors:
        await c.stop()
    await pub.close()
    await pub_b.close()


async def test_failover_after_sigkill(kafka_broker: KafkaBroker, gateway_factory: Any,
                                      gateway_processes: list[GatewayProcess],
                                      topic: Callable[[str], str]) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 3)
    gw_a = GatewayProcess(kafka_broker, [t], "gw-a", "--heartbeat-ms", "500")
    gateway_processes.append(gw_a)
    gw_b = await kafka_gateway(gateway_factory, kafka_broker, [t], heartbeat_ms=500, node_id="gw-b")
    await gw_a.healthy()
    subjects = [f"/{t}/match/{i}" for i in range(10)]
    got: dict[str, list[Message]] = {s: [] for s in subjects}
    events: list[str] = []
    client = Client([gw_a.url, ws_url(gw_b)], backoff_initial=0.02, backoff_max=0.2,
                    on_event=lambda name, info: events.append(name))
    await client.connect()
    try:
        assert client.server == "gw-a"
        await client.subscribe_many(subjects, lambda m: got[m.subject].append(m))

        # The publisher writes 1,000 messages over the 10 subjects through gateway B.
        pub = await connected(ws_url(gw_b))
        acks: dict[int, dict[str, Any]] = {}
        errors: list[dict[str, Any]] = []

        async def read_acks() -> None:
            while len(acks) + len(errors) < 1000:
                f = await recv(pub, WAIT)
                if f["op"] == "ack":
                    acks[f["id"]] = f
                elif f["op"] == "error":
                    errors.append(f)

        reader = asyncio.create_task(read_acks())
        for i in range(1000):
            await send(pub, {"op": "publish", "subject": subjects[i % 10], "content": str(i), "id": i})
            if i % 20 == 19:
                await asyncio.sleep(0.01)
            if i == 400:
                # A is really serving this client before it dies
                await wait_until(lambda: sum(len(v) for v in got.values()) > 0, "messages through gateway A")
                gw_a.kill()   # SIGKILL mid-stream: no close frame, no goodbye
        await asyncio.wait_for(reader, WAIT)
        assert not errors and len(acks) == 1000
        # a bound, not a speed claim: the client's backoff, resubscribing and B's replays from Kafka take
        # longer on a loaded machine (timed out once at 10 s with load 14 on 2 cores)
        await wait_until(lambda: sum(len(v) for v in got.values()) >= 1000, "every message after failover",
                         3 * WAIT)
        # nothing more arrives: a sentinel per subject, last of its subject once it is there
        for s in subjects:
            await send(pub, {"op": "publish", "subject": s, "content": "sentinel", "id": "sentinel"})
        await wait_until(lambda: all(got[s] and got[s][-1].content == "sentinel" for s in subjects), "the sentinels")
        for s in subjects:
            got[s].pop()
        assert client.server == "gw-b" and client.stats["reconnects"] >= 1 and "disconnected" in events
        # B took A's positions: the epochs agree across gateways, so every subject recovered.
        assert all(client._subs[s].recovered for s in subjects)
        for k, s in enumerate(subjects):
            want = [(acks[i]["epoch"], acks[i]["seq"], str(i)) for i in range(k, 1000, 10)]
            assert [(m.epoch, m.seq, m.content) for m in got[s]] == want, s
        await pub.close()
    finally:
        await client.close()


async def test_recovery_deeper_than_the_ring(kafka_broker: KafkaBroker, gateway_factory: Any,
                                             topic: Callable[[str], str]) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 1)
    # a and b alternate; c: 5 records in the middle, older than the warmup window (250 records).
    items = [(b"a" if i % 2 == 0 else b"b", b"%d" % i) for i in range(600)]
    items[300:300] = [(b"c", b"c%d" % i) for i in range(5)]
    # The last record alone: Tansu's ListOffsets answers the base offset of the last batch.
    metas = await kafka_broker.produce(t, items[:-1]) + await kafka_broker.produce(t, items[-1:])
    seqs = {k: [m.offset + 1 for (key, _), m in zip(items, metas) if key == k] for k in (b"a", b"b", b"c")}
    value = {m.offset + 1: v for (_, v), m in zip(items, metas)}
    gw = await kafka_gateway(gateway_factory, kafka_broker, [t], history=10, max_recovery_records=350,
                             warmup_records=250)
    sa, sb, sc = f"/{t}/a", f"/{t}/b", f"/{t}/c"
    assert gw.hub.get(sc) is None and gw.hub.get(sa) is not None   # c is older than the warmup
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": sa}]})
    fresh = await recv_until(ws, "subscribed")
    epoch = fresh["epoch"]
    snap = await recv_until(ws, "msg")
    assert snap["snapshot"] and snap["seq"] == seqs[b"a"][-1] == fresh["seq"]

    def expect(key: bytes, after: int) -> list[tuple[int, str]]:
        return [(s, value[s].decode()) for s in seqs[key] if s > after]

    async def recover(subject: str, after: int, recovered: bool) -> list[dict[str, Any]]:
        """Subscribe from `after`; every msg up to and with a sentinel produced once `subscribed` is in
        (it comes after the replay or snapshot, live, and proves that nothing more of them arrives)."""
        await send(ws, {"op": "subscribe", "subjects": [{"subject": subject, "epoch": epoch, "seq": after}]})
        sub = await recv_until(ws, "subscribed")
        assert (sub["subject"], sub["epoch"], sub["recovered"]) == (subject, epoch, recovered), sub
        key = subject.rsplit("/", 1)[1].encode()
        (meta,) = await kafka_broker.produce(t, [(key, b"sentinel")])
        seqs[key].append(meta.offset + 1)   # later expectations include it, like any record of the subject
        value[meta.offset + 1] = b"sentinel"
        out = [await recv_until(ws, "msg")]
        while out[-1]["seq"] < meta.offset + 1:
            out.append(await recv_until(ws, "msg"))
        assert out[-1]["content"] == "sentinel"
        return out

    replays = gw.engine.stats()["replays"]
    # 100 messages of a behind, 200 records of the partition: beyond the ring of 10, from Kafka.
    after = seqs[b"a"][-101]
    got = await recover(sa, after, True)
    assert [(m["seq"], m["content"]) for m in got] == expect(b"a", after)
    assert_chain(got, after)
    assert gw.engine.stats()["replays"] == replays + 1
    # Within the ring: from memory.
    after = seqs[b"a"][-4]
    got = await recover(sa, after, True)
    assert [(m["seq"], m["content"]) for m in got] == expect(b"a", after)
    assert gw.engine.stats()["replays"] == replays + 1
    # Older than --max-recovery-records (350 records of the partition): recovered:false + snapshot.
    after, newest = seqs[b"b"][10], seqs[b"b"][-1]
    got = await recover(sb, after, False)
    assert [(m["seq"], m.get("snapshot")) for m in got] == [(newest, True), (seqs[b"b"][-1], None)]
    # A subject this gateway holds nothing of (its records are older than the warmup window):
    # the gateway has read past the position, so it replays from Kafka; nothing is skipped.
    after = seqs[b"c"][1]
    got = await recover(sc, after, True)
    assert [(m["seq"], m["content"]) for m in got] == expect(b"c", after)
    assert_chain(got, after)

    # A position beyond the partition's end in Kafka (protocol 1.1: asked of Kafka, since it is ahead
    # of what this gateway has read): recovered:false and the snapshot, then every live message, so
    # a bogus position never silences the subscription. (A position ahead of this gateway but held
    # by Kafka: test_position_ahead_of_this_gateway_is_asked_of_kafka.)
    end = max(max(v) for v in seqs.values())
    ws2 = await connected(ws_url(gw))
    await send(ws2, {"op": "subscribe", "subjects": [{"subject": sa, "epoch": epoch, "seq": end + 2}]})
    sub = await recv_until(ws2, "subscribed")
    assert (sub["recovered"], sub["seq"]) == (False, seqs[b"a"][-1])
    snap = await recv_until(ws2, "msg")
    assert (snap["seq"], snap.get("snapshot")) == (seqs[b"a"][-1], True)
    more = await kafka_broker.produce(t, [(b"a", b"x1"), (b"a", b"x2"), (b"a", b"x3"), (b"a", b"x4")])
    assert [m.offset + 1 for m in more] == [end + 1, end + 2, end + 3, end + 4]
    got2 = [await recv_until(ws2, "msg") for _ in range(4)]
    assert [(m["seq"], m["content"]) for m in got2] == [(end + i, f"x{i}") for i in range(1, 5)]
    assert_chain([snap, *got2])
    live = [await recv_until(ws, "msg") for _ in range(4)]   # the first connection has all four
    assert [x["seq"] for x in live] == [end + 1, end + 2, end + 3, end + 4]
    await ws.close()
    await ws2.close()


async def test_position_ahead_of_this_gateway_is_asked_of_kafka(kafka_broker: KafkaBroker, gateway_factory: Any,
                                                                topic: Callable[[str], str]) -> None:
    """Protocol 1.1: a position ahead of what this gateway has read is valid when Kafka holds it
    (another gateway was faster: recovered:true, then only what follows), recovered:false when it is
    beyond the partition's end offset. The gateway is held behind by freezing its connections."""
    if kafka_broker.external:
        pytest.skip("needs brokers that advertise the proxies (started here)")
    t = topic()
    s = f"/{t}/a"
    async with kafka_broker.behind_proxy() as net:
        broker = net.broker
        direct = broker.direct_producer()
        sockets: list[ClientConnection] = []
        gw = None
        try:
            await broker.create_topic(t, 1)
            gw = await kafka_gateway(gateway_factory, broker, [t], bootstrap=net.bootstrap)
            ws = await connected(ws_url(gw))
            sockets.append(ws)
            await send(ws, {"op": "subscribe", "subjects": [{"subject": s}]})
            epoch = (await recv_until(ws, "subscribed"))["epoch"]
            await direct.start()
            first = await direct.send_and_wait(t, b"r1", key=b"a")
            assert (await recv_until(ws, "msg"))["seq"] == first.offset + 1 == 1

            # The gateway's connections to Kafka stall (no FIN, no RST); new ones still pass.
            assert sum(p.freeze() for p in net.proxies) > 0
            later = [await direct.send_and_wait(t, b"r%d" % i, key=b"a") for i in (2, 3, 4)]
            assert [m.offset + 1 for m in later] == [2, 3, 4]   # Kafka holds seq 4; the gateway read 1
            assert gw.engine.read_through(parse_subject(s)) == 1

            async def subscribe_at(seq: int) -> tuple[ClientConnection, dict[str, Any]]:
                w = await connected(ws_url(gw))
                sockets.append(w)
                await send(w, {"op": "subscribe", "subjects": [{"subject": s, "epoch": epoch, "seq": seq}]})
                return w, await recv_until(w, "subscribed")

            ahead, sub = await subscribe_at(3)      # held by Kafka, not yet read here
            assert (sub["recovered"], sub["seq"]) == (True, 1)
            bogus, sub = await subscribe_at(99)     # beyond Kafka's end
            assert (sub["recovered"], sub["seq"]) == (False, 1)
            snap = await recv_until(bogus, "msg")
            assert (snap["seq"], snap.get("snapshot")) == (1, True)

            net.cut()       # resets the frozen connections: the gateway reconnects and reads on
            net.restore()
            m = await recv_until(ahead, "msg")      # nothing of the position or before it
            assert (m["seq"], m["content"]) == (4, "r4")
            assert [(m["seq"], m["content"]) for m in [await recv_until(bogus, "msg") for _ in range(3)]] == [
                (2, "r2"), (3, "r3"), (4, "r4")]
            assert [m["seq"] for m in [await recv_until(ws, "msg") for _ in range(3)]] == [2, 3, 4]
            # a sentinel published last: the next frame on each is it (no duplicate came between)
            sentinel = await direct.send_and_wait(t, b"sentinel", key=b"a")
            for w in (ws, ahead, bogus):
                m = await recv_until(w, "msg")
                assert (m["seq"], m["content"], m["prev"]) == (sentinel.offset + 1, "sentinel", 4)
        finally:
            for w in sockets:
                await w.close()
            if gw is not None:
                await gw.stop()   # before the proxies go
            await direct.stop()


async def test_live_messages_merge_with_kafka_replay(kafka_broker: KafkaBroker, gateway_factory: Any,
                                                     topic: Callable[[str], str]) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 1)
    subject = f"/{t}/live"
    n = 20_000
    await kafka_broker.produce(t, [(b"live", b"old-%d" % i) for i in range(n)])
    gw = await kafka_gateway(gateway_factory, kafka_broker, [t], history=10, warmup_records=100)
    pub = await connected(ws_url(gw))
    acks: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def publisher() -> int:   # publishes through the gateway while the replay runs
        i = 0
        while not stop.is_set() and i < 5000:
            for _ in range(5):
                await send(pub, {"op": "publish", "subject": subject, "content": f"new-{i}", "id": i})
                i += 1
            await asyncio.sleep(0.002)
        return i

    async def ack_reader() -> None:
        while True:
            f = await recv(pub, WAIT)
            assert f["op"] == "ack", f
            acks.append(f)

    readers = asyncio.create_task(ack_reader())
    writer = asyncio.create_task(publisher())
    await wait_until(lambda: len(acks) >= 20, "publishes flowing")

    subscribers = []
    for after in (1_000, 10_000):
        ws = await connected(ws_url(gw))
        await send(ws, {"op": "subscribe", "subjects": [{"subject": subject, "epoch": acks[0]["epoch"],
                                                         "seq": after}]})
        subscribers.append((after, Collector(ws), len(acks)))
    c0 = subscribers[0][1]
    await wait_until(lambda: all(c.ops("subscribed") for _, c, _ in subscribers), "subscribed", 3 * WAIT)
    during = len(acks) - subscribers[0][2]
    more = len(acks) + 20
    await wait_until(lambda: len(acks) >= more or writer.done(), "live publishes after the subscriptions")
    stop.set()
    sent = await writer
    await wait_until(lambda: len(acks) == sent, "every publish acknowledged")
    # a sentinel last: once a subscriber has it, it has everything before it (and a duplicate would show)
    await send(pub, {"op": "publish", "subject": subject, "content": "sentinel", "id": "sentinel"})
    await wait_until(lambda: len(acks) == sent + 1, "the sentinel acknowledged")
    sentinel = acks.pop()
    readers.cancel()
    await asyncio.gather(readers, return_exceptions=True)
    final = acks[-1]["seq"]
    for after, c, _ in subscribers:
        await wait_until(lambda c=c: c.msgs.get(subject) and c.msgs[subject][-1]["seq"] >= sentinel["seq"],
                         "every message to the sentinel", 3 * WAIT)
        (sub,) = c.ops("subscribed")
        assert sub["recovered"] is True
        got = c.msgs[subject]
        assert (got[-1]["seq"], got[-1]["content"]) == (sentinel["seq"], "sentinel")
        got.pop()
        assert [m["seq"] for m in got] == list(range(after + 1, final + 1))   # no gap, no duplicate
        assert [m["content"] for m in got[: n - after]] == ["old-%d" % i for i in range(after, n)]
        assert [m["content"] for m in got[n - after:]] == [f"new-{i}" for i in range(sent)]
        assert_chain(got, after)
        await c.stop()
    assert during > 0, "no publish landed while the replay ran: the merge was not exercised"
    assert [a["seq"] for a in acks] == list(range(n + 1, n + sent + 1))
    assert gw.engine.stats()["replays"] >= 2 and c0.closed is None
    await pub.close()


async def test_seq_0_of_a_subject_the_hub_does_not_hold_is_read_from_kafka(
        kafka_broker: KafkaBroker, gateway_factory: Any, topic: Callable[[str], str]) -> None:
    """Protocol 1.1: a position with seq 0 asks for every message of the epoch from seq 1. A subject whose
    records are all older than the warmup window is not in the hub (its newest seq there is 0), yet
    Kafka holds its messages: they are replayed (recovered:true), never a recovered:true with nothing."""
    t = topic()
    await kafka_broker.create_topic(t, 1)
    items = [(b"old", b"o%d" % i) for i in range(3)] + [(b"other", b"%d" % i) for i in range(50)]
    metas = await kafka_broker.produce(t, items[:-1]) + await kafka_broker.produce(t, items[-1:])
    old = [(m.offset + 1, v.decode()) for (k, v), m in zip(items, metas) if k == b"old"]
    gw = await kafka_gateway(gateway_factory, kafka_broker, [t], warmup_records=10)
    s = f"/{t}/old"
    assert gw.hub.get(s) is None   # older than the warmup window
    ws = await connected(ws_url(gw))
    try:
        epoch = gw.engine.epoch(parse_subject(s))
        await send(ws, {"op": "subscribe", "subjects": [{"subject": s, "epoch": epoch, "seq": 0}]})
        sub = await recv_until(ws, "subscribed")
        assert (sub["epoch"], sub["recovered"]) == (epoch, True), sub
        (sentinel,) = await kafka_broker.produce(t, [(b"old", b"sentinel")])
        got = [await recv_until(ws, "msg")]
        while got[-1]["seq"] < sentinel.offset + 1:
            got.append(await recv_until(ws, "msg"))
        assert [(m["seq"], m["content"]) for m in got] == [*old, (sentinel.offset + 1, "sentinel")]
        assert_chain(got, 0)
    finally:
        await ws.close()


async def test_a_position_older_than_the_log_start_is_not_recovered_from_memory(
        kafka_broker: KafkaBroker, gateway_factory: Any, topic: Callable[[str], str]) -> None:
    """Retention moved the partition's log start past messages a client never got: a gateway that starts
    reading at that log start must not take a subject's first record there for its first ever (prev 0),
    or its memory replays across the deleted messages as recovered:true (a silent gap)."""
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
    from aiokafka.structs import TopicPartition

    if os.environ.get("KAFKA_TEST_BROKER") == "tansu":
        pytest.skip("Tansu has no DeleteRecords")
    t = topic()
    await kafka_broker.create_topic(t, 1)
    items = [(b"s", b"m1"), (b"s", b"m2"), (b"x", b"0"), (b"x", b"1"), (b"x", b"2"), (b"s", b"m3")]
    metas = await kafka_broker.produce(t, items)
    assert [m.offset for m in metas] == list(range(6))
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:   # m1 and m2 go (retention); the client below has m1 and never got m2
        await admin.delete_records({TopicPartition(t, 0): RecordsToDelete(before_offset=3)})
    finally:
        await admin.close()
    gw = await kafka_gateway(gateway_factory, kafka_broker, [t])
    s = f"/{t}/s"
    ws = await connected(ws_url(gw))
    try:
        epoch = gw.engine.epoch(parse_subject(s))
        await send(ws, {"op": "subscribe", "subjects": [{"subject": s, "epoch": epoch, "seq": 1}]})
        sub = await recv_until(ws, "subscribed")
        assert (sub["recovered"], sub["seq"]) == (False, 6), sub   # m2 is gone: not recoverable
        snap = await recv_until(ws, "msg")
        assert (snap["seq"], snap["content"], snap.get("snapshot")) == (6, "m3", True)
        assert snap.get("prev") != 0   # m3 is not the subject's first message
    finally:
        await ws.close()


async def _next_msg(ws: ClientConnection) -> dict[str, Any]:
    """The next frame that is not a heartbeat; it must be a `msg`."""
    while True:
        f = await recv(ws, WAIT)
        if f["op"] != "hb":
            assert f["op"] == "msg", f
            return f


async def test_retention_while_the_gateway_cannot_read_is_no_silent_gap(
        kafka_broker: KafkaBroker, gateway_factory: Any, topic: Callable[[str], str]) -> None:
    """Retention deletes a message while the gateway cannot reach Kafka: when it reads again, its reader's
    position is before the new log start. The live subscriber's next message must not claim continuity
    over the deleted one (prev present and not the client's last seq, so it resubscribes), and a recovery
    from before the log start is recovered:false, not a replay over the hole."""
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
    from aiokafka.structs import TopicPartition

    if os.environ.get("KAFKA_TEST_BROKER") == "tansu" or kafka_broker.external:
        pytest.skip("needs DeleteRecords (not in Tansu) and brokers behind proxies (started here)")
    t = topic()
    s = f"/{t}/s"
    async with kafka_broker.behind_proxy() as net:
        broker = net.broker   # direct access, around the proxies
        await broker.create_topic(t, 1)
        gw = await kafka_gateway(gateway_factory, broker, [t], bootstrap=net.bootstrap, kafka_metadata_refresh_ms=100)
        direct = broker.direct_producer()
        ws = await connected(ws_url(gw))
        ws2: ClientConnection | None = None
        try:
            await direct.start()
            await send(ws, {"op": "subscribe", "subjects": [{"subject": s}]})
            epoch = (await recv_until(ws, "subscribed"))["epoch"]
            m1 = await direct.send_and_wait(t, b"m1", key=b"s")
            got = await _next_msg(ws)
            assert (got["seq"], got["prev"], got["content"]) == (m1.offset + 1, 0, "m1")

            net.cut()
            await wait_until(lambda: not gw.engine.connected, "the gateway noticed it cannot reach Kafka")
            m2 = await direct.send_and_wait(t, b"m2", key=b"s")
            for i in range(3):
                await direct.send_and_wait(t, b"%d" % i, key=b"x")
            m3 = await direct.send_and_wait(t, b"m3", key=b"s")
            admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
            await admin.start()
            try:   # m1 and m2 go (retention); the gateway never read m2
                await admin.delete_records({TopicPartition(t, 0): RecordsToDelete(before_offset=m2.offset + 2)})
            finally:
                await admin.close()
            net.restore()

            got = await _next_msg(ws)   # the gateway reads again: m3 is the next message of s
            assert (got["seq"], got["content"]) == (m3.offset + 1, "m3"), got
            # the client holds seq 1 and never got m2: m3's prev must tell it (present, and not 1)
            assert "prev" in got and got["prev"] != m1.offset + 1, got
            # what the SDK then does: subscribe again from its position, which Kafka no longer holds
            await send(ws, {"op": "subscribe", "subjects": [{"subject": s, "epoch": epoch, "seq": m1.offset + 1}]})
            sub = await recv_until(ws, "subscribed")
            assert (sub["epoch"], sub["seq"], sub["recovered"]) == (epoch, m3.offset + 1, False), sub
            snap = await _next_msg(ws)
            assert (snap["seq"], snap["content"], snap.get("snapshot")) == (m3.offset + 1, "m3", True), snap
            # another client with the same position, on a connection of its own: the same answer
            ws2 = await connected(ws_url(gw))
            await send(ws2, {"op": "subscribe", "subjects": [{"subject": s, "epoch": epoch, "seq": m1.offset + 1}]})
            sub = await recv_until(ws2, "subscribed")
            assert (sub["seq"], sub["recovered"]) == (m3.offset + 1, False), sub
            snap = await _next_msg(ws2)
            assert (snap["seq"], snap.get("snapshot")) == (m3.offset + 1, True), snap
            # nothing else came in between: the next message on both is a sentinel, chained to m3
            sentinel = await direct.send_and_wait(t, b"sentinel", key=b"s")
            for w in (ws, ws2):
                got = await _next_msg(w)
                assert (got["seq"], got["prev"], got["content"]) == (sentinel.offset + 1, m3.offset + 1,
                                                                     "sentinel"), got
        finally:
            await ws.close()
            if ws2 is not None:
                await ws2.close()
            await gw.stop()   # before the proxies go
            await direct.stop()


async def test_a_quiet_subject_of_a_deleted_or_recreated_topic_leaves_the_old_epoch_at_once(
        kafka_broker: KafkaBroker, gateway_factory: Any, topic: Callable[[str], str]) -> None:
    """A topic is deleted, then created again: as soon as the gateway has seen that, a fresh subscriber of a
    quiet subject (one with a subscriber, so the hub keeps it) gets the epoch a fresh gateway would give,
    not the old one with the deleted message as its snapshot (until the subject's next record)."""

    t = topic()
    s = f"/{t}/s"
    await kafka_broker.create_topic(t, 1)
    gw = await kafka_gateway(gateway_factory, kafka_broker, [t], kafka_metadata_refresh_ms=100)
    subject = parse_subject(s)
    old = gw.engine.epoch(subject)
    socks = [await connected(ws_url(gw))]
    try:
        await send(socks[0], {"op": "subscribe", "subjects": [{"subject": s}]})
        assert (await recv_until(socks[0], "subscribed"))["epoch"] == old
        await kafka_broker.produce(t, [(b"s", b"old")])
        got = await recv_until(socks[0], "msg")
        assert (got["epoch"], got["seq"], got["content"]) == (old, 1, "old")

        await kafka_broker.delete_topic(t)
        await wait_until(lambda: gw.engine.stats()["topics_missing"] == 1, "the gateway saw the topic go")
        gone = gw.engine.epoch(subject)
        assert gone != old
        socks.append(await connected(ws_url(gw)))
        await send(socks[1], {"op": "subscribe", "subjects": [{"subject": s}]})
        sub = await recv_until(socks[1], "subscribed")
        assert (sub["epoch"], sub["seq"], sub["recovered"]) == (gone, 0, False), sub   # no snapshot follows

        await kafka_broker.create_topic(t, 1)
        await wait_until(lambda: gw.engine.epoch(subject) not in (old, gone), "the gateway saw the new topic")
        new = gw.engine.epoch(subject)
        socks.append(await connected(ws_url(gw)))
        await send(socks[2], {"op": "subscribe", "subjects": [{"subject": s, "epoch": old, "seq": 1}]})
        sub = await recv_until(socks[2], "subscribed")
        assert (sub["epoch"], sub["seq"], sub["recovered"]) == (new, 0, False), sub   # no snapshot follows
        # the sentinel: the next message of s on every connection is the new topic's first record
        await kafka_broker.produce(t, [(b"s", b"new")])
        for ws in socks:
            got = await recv_until(ws, "msg")
            assert (got["epoch"], got["seq"], got["prev"], got["content"]) == (new, 1, 0, "new"), got
            assert "snapshot" not in got
    finally:
        for ws in socks:
            await ws.close()


async def test_a_publish_whose_answer_is_lost_fails_saying_it_may_still_be_written(
        kafka_broker: KafkaBroker, topic: Callable[[str], str], gateway_factory: Any) -> None:
    """The produce request reaches Kafka and is written; only its answer never comes back. The publish
    fails with `unavailable` after --kafka-publish-timeout-ms, and the error says the record may still be
    written, because it is: Kafka holds it and the subscribers get it like any other record (Kafka's own
    ambiguity: docs/PROTOCOL.md, "Errors"). An idempotent producer's retry does not write it twice."""
    if kafka_broker.external:
        pytest.skip("needs brokers that advertise the proxies (started here)")
    t = topic()
    async with kafka_broker.behind_proxy() as net:
        await net.broker.create_topic(t, 1)   # net.broker: direct access, around the proxies
        gw = await kafka_gateway(gateway_factory, net.broker, [t], bootstrap=net.bootstrap,
                                 kafka_publish_timeout_ms=1000)
        try:
            await _answer_lost(net, gw, t)
        finally:
            await gw.stop()   # before the proxies go


async def _answer_lost(net: Any, gw: Any, t: str) -> None:
    """The body of the test above, on its gateway behind the proxies."""
    broker = net.broker
    subject = f"/{t}/k"
    sub = await connected(ws_url(gw))
    await send(sub, {"op": "subscribe", "subjects": [{"subject": subject}]})
    await recv_until(sub, "subscribed")
    pub = await connected(ws_url(gw))
    await _publish_acked(pub, subject, "before", 0)   # the producer's connection and metadata are up
    assert (await recv_until(sub, "msg", timeout=WAIT))["content"] == "before"

    net.lose_answers()
    await send(pub, {"op": "publish", "subject": subject, "content": "answer-lost", "id": "x"})
    err = await recv_until(pub, "error", timeout=WAIT)
    assert (err["code"], err["id"], err["request"]) == ("unavailable", "x", "publish"), err
    assert "may still be written" in err["message"], err
    assert net.answer_bytes_lost > 0 and gw.engine.stats()["publish_outcome_unknown"] == 1
    held = await broker.read_topic(t, 1, direct=True)
    assert [r.value for r in held].count(b"answer-lost") == 1   # written, though the publisher was told otherwise

    net.cut()       # the connections that lost their answers are reset; the clients reconnect
    net.restore()
    await _publish_acked(pub, subject, "sentinel", 1)
    got = [(await recv_until(sub, "msg", timeout=3 * WAIT))["content"]]
    while got[-1] != "sentinel":
        got.append((await recv_until(sub, "msg", timeout=3 * WAIT))["content"])
    # the producer retried the lost request on its new connection: an idempotent one is not
    # written twice; a producer without idempotence (Tansu) may write it again
    copies = got.count("answer-lost")
    assert copies == 1 if broker.idempotence else copies >= 1, got
    await pub.close()
    await sub.close()


async def test_a_gateway_stopped_during_a_kafka_outage_stops_cleanly(
        kafka_broker: KafkaBroker, topic: Callable[[str], str], gateway_factory: Any) -> None:
    """SIGTERM while Kafka is unreachable: the stop returns (before, aiokafka's fetcher raised a stray
    CancelledError out of it, and a second stop hung) and the engine's clients are closed."""
    if kafka_broker.external:
        pytest.skip("needs brokers that advertise the proxies (started here)")
    t = topic()
    async with kafka_broker.behind_proxy() as net:
        await net.broker.create_topic(t, 1)
        gw = await kafka_gateway(gateway_factory, net.broker, [t], bootstrap=net.bootstrap,
                                 kafka_publish_timeout_ms=1000)
        sub = await connected(ws_url(gw))
        await send(sub, {"op": "subscribe", "subjects": [{"subject": f"/{t}/k"}]})
        await recv_until(sub, "subscribed")
        net.cut()   # every connection to Kafka reset, new ones refused: the consumer retries its fetches
        await wait_until(lambda: not gw.engine.connected, "the engine to see Kafka unreachable")
        await asyncio.wait_for(gw.stop(), 3 * WAIT)   # returns, raises nothing
        assert gw.engine._consumer is None and gw.engine._producer is None and gw.engine._meta is None


async def test_broker_outage(kafka_broker: KafkaBroker, topic: Callable[[str], str], gateway_factory: Any) -> None:
    if kafka_broker.external:
        pytest.skip("needs brokers that advertise the proxies (started here)")
    t = topic()
    collectors: list[Collector] = []
    gw = None
    async with kafka_broker.behind_proxy() as net:
        broker = net.broker   # direct access, around the proxies
        direct = broker.direct_producer()
        try:
            await broker.create_topic(t, 2)
            gw = await kafka_gateway(gateway_factory, broker, [t], bootstrap=net.bootstrap, heartbeat_ms=200,
                                     kafka_publish_timeout_ms=1000)
            subjects = [f"/{t}/k{i}" for i in range(4)]
            for _ in range(2):
                ws = await connected(ws_url(gw))
                await send(ws, {"op": "subscribe", "subjects": [{"subject": s} for s in subjects]})
                for _ in subjects:
                    await recv_until(ws, "subscribed")
                collectors.append(Collector(ws))
            pub = await connected(ws_url(gw))
            for i in range(8):   # one at a time: a loaded machine may miss the 1 s publish timeout
                await _publish_acked(pub, subjects[i % 4], f"before-{i}", i)
            await wait_until(lambda: all(c.count() == 8 for c in collectors), "records before the outage")

            net.cut()
            loop = asyncio.get_running_loop()
            started = loop.time()
            await send(pub, {"op": "publish", "subject": subjects[0], "content": "during-gw", "id": "d"})
            err = await recv_until(pub, "error", timeout=WAIT)
            assert (err["code"], err["id"]) == ("unavailable", "d")
            assert loop.time() - started < 5 * SCALE   # bounded: about --kafka-publish-timeout-ms
            await direct.start()   # records written meanwhile, around the proxies
            for i in range(8):
                await direct.send_and_wait(t, b"during-%d" % i, key=subjects[i % 4].split("/", 2)[2].encode())
            hb_before = [len(c.ops("hb")) for c in collectors]
            # Still connected, still heartbeating (three more each), nothing delivered while the gateway
            # cannot read.
            await wait_until(lambda: all(len(c.ops("hb")) >= n + 3 for c, n in zip(collectors, hb_before)),
                             "heartbeats during the outage")
            assert all(c.closed is None for c in collectors)
            assert all(len(c.ops("hb")) >= n + 3 for c, n in zip(collectors, hb_before))
            assert all(c.count() == 8 for c in collectors)
            net.restore()

            for i in range(8):   # the producer reconnects on demand
                await _publish_acked(pub, subjects[i % 4], f"after-{i}", f"a{i}")
            held = await broker.read_topic(t, 2, direct=True)
            values = {r.value for r in held}
            assert values >= {b"%s-%d" % (w, i) for w in (b"before", b"during", b"after") for i in range(8)}
            want: dict[str, list[tuple[int, str]]] = {}
            for r in held:
                want.setdefault(f"/{t}/{r.key.decode()}", []).append((r.offset + 1, r.value.decode()))
            await wait_until(lambda: all(c.count() == len(held) for c in collectors), "every held record")
            await flush_with_sentinels(pub, subjects, collectors)
            for c in collectors:
                assert c.closed is None
                assert {s: [(m["seq"], m["content"]) for m in msgs] for s, msgs in c.msgs.items()} == want
                for msgs in c.msgs.values():
                    assert_chain(msgs, 0)
            await pub.close()
        finally:
            for c in collectors:
                await c.stop()
            if gw is not None:
                await gw.stop()   # before the proxies go
            await direct.stop()


async def _ack_or_error(ws: ClientConnection) -> dict[str, Any]:
    while True:
        f = await recv(ws, WAIT)
        if f["op"] in ("ack", "error"):
            return f


async def _publish_acked(ws: ClientConnection, subject: str, content: str, id: Any, attempts: int = 50) -> None:
    """Publish until acked: a publish that is not acked must fail with `unavailable` (a publish timeout
    while the producer reconnects, or on a loaded machine), never anything else."""
    for attempt in range(attempts):
        await send(ws, {"op": "publish", "subject": subject, "content": content, "id": id})
        f = await _ack_or_error(ws)
        if f["op"] == "ack":
            assert f["id"] == id, f
            return
        assert f["code"] == "unavailable" and f["id"] == id and attempt < attempts - 1, f
        await asyncio.sleep(0.1)


async def _healthz_node(port: int) -> str:
    """The `node` of the process that answered GET /healthz (the kernel picks one of the workers)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        body = (await asyncio.wait_for(reader.read(), WAIT)).partition(b"\r\n\r\n")[2]
        status = json.loads(body)
        return str(status["node"]) if status["status"] == "ok" else ""
    finally:
        writer.close()


async def _serving_nodes(gw: GatewayProcess, want: set[str]) -> None:
    """Wait until every node in `want` has answered /healthz on the shared port (all listen, caught up)."""
    nodes: set[str] = set()

    async def all_answered() -> bool:
        assert gw.proc.poll() is None, f"nodes seen: {nodes}; {gw.log()}"
        try:
            nodes.add(await _healthz_node(gw.port))
        except (TimeoutError, OSError, ValueError):
            await asyncio.sleep(0.05)
            return False
        return want <= nodes

    await wait_until(all_answered, lambda: f"nodes {sorted(want)}; nodes seen: {nodes}; {gw.log()}", 3 * WAIT,
                     interval=0)
    assert nodes - {""} == want, f"nodes seen: {nodes}"


async def test_workers_auto_starts_one_worker_per_usable_cpu(kafka_broker: KafkaBroker,
                                                             gateway_processes: list[GatewayProcess],
                                                             topic: Callable[[str], str]) -> None:
    """`--workers auto`: as many workers as CPUs the gateway may run on (its affinity mask), each
    serving /healthz on the shared port; one plain process on a one-CPU machine."""
    t = topic()
    await kafka_broker.create_topic(t, 1)
    gw = GatewayProcess(kafka_broker, [t], "wa", "--workers", "auto")
    gateway_processes.append(gw)
    cpus = len(os.sched_getaffinity(0))
    await _serving_nodes(gw, {f"wa-w{i}" for i in range(1, cpus + 1)} if cpus > 1 else {"wa"})
    if cpus > 1:
        assert f"gateway: {cpus} workers on port {gw.port}" in gw.log()


async def test_workers_share_one_port_and_stop_together(kafka_broker: KafkaBroker,
                                                         gateway_processes: list[GatewayProcess],
                                                         topic: Callable[[str], str]) -> None:
    """`--workers 2`: two processes behind one port (SO_REUSEPORT), each reading every partition, so a
    publish through one worker reaches the clients of the other; SIGTERM stops both with 1001."""
    t = topic()
    await kafka_broker.create_topic(t, 2)
    gw = GatewayProcess(kafka_broker, [t], "wk", "--workers", "2")
    gateway_processes.append(gw)
    await _serving_nodes(gw, {"wk-w1", "wk-w2"})  # both workers listen and are caught up

    clients: list[tuple[str, ClientConnection]] = []
    subject = f"/{t}/score"
    for _ in range(24):
        ws = await open_ws(gw.url)
        await send(ws, {"op": "connect"})
        hello = await recv(ws)
        await send(ws, {"op": "subscribe", "subjects": [{"subject": subject}]})
        assert (await recv_until(ws, "subscribed"))["subject"] == subject
        clients.append((hello["server"], ws))
    by_worker = {server for server, _ in clients}
    assert by_worker == {"wk-w1", "wk-w2"}, "the kernel spreads 24 connections over both workers"
    # publish through a client of worker 1: everyone, on both workers, gets it
    publisher = next(ws for server, ws in clients if server == "wk-w1")
    await send(publisher, {"op": "publish", "subject": subject, "content": "1-0", "id": 1})
    seqs = set()
    for _, ws in clients:
        m = await recv_until(ws, "msg", skip=("hb", "ack"))
        assert m["content"] == "1-0"
        seqs.add((m["epoch"], m["seq"]))
    assert len(seqs) == 1, "both workers number the record alike (from Kafka)"

    gw.proc.send_signal(signal.SIGTERM)
    for _, ws in clients:
        assert await close_code(ws) == 1001
    assert gw.proc.wait(3 * WAIT) == 0


async def test_a_dead_worker_is_restarted_and_serves_again(kafka_broker: KafkaBroker,
                                                            gateway_processes: list[GatewayProcess],
                                                            topic: Callable[[str], str]) -> None:
    """`--workers 2`, one worker killed with SIGKILL: the parent logs it and starts another in its place,
    which serves clients (before: nobody noticed, and the port had one worker less for good)."""
    import re

    t = topic()
    await kafka_broker.create_topic(t, 1)
    gw = GatewayProcess(kafka_broker, [t], "wr", "--workers", "2")
    gateway_processes.append(gw)

    await _serving_nodes(gw, {"wr-w1", "wr-w2"})
    m = re.search(r"workers on port \d+ \(pids (\d+), (\d+)\)", gw.log())
    assert m, gw.log()
    first_w1 = int(m.group(1))
    os.kill(first_w1, signal.SIGKILL)
    await wait_until(lambda: re.search(r"worker wr-w1 \(pid \d+\) died \(killed by SIGKILL\)", gw.log()) is not None,
                     "the parent to log the dead worker", 3 * WAIT)
    await wait_until(lambda: re.search(r"worker wr-w1 restarted \(pid (\d+)\)", gw.log()) is not None,
                     "the parent to restart it", 3 * WAIT)
    m2 = re.search(r"worker wr-w1 restarted \(pid (\d+)\)", gw.log())
    assert m2 is not None
    second_w1 = int(m2.group(1))
    assert second_w1 != first_w1
    os.kill(second_w1, 0)  # alive
    await _serving_nodes(gw, {"wr-w1", "wr-w2"})  # wr-w1 answers /healthz again: the new process, the old one is dead

    # and it serves WebSocket clients: one landing on the new wr-w1 gets what another publishes
    subject = f"/{t}/score"
    clients: list[tuple[str, ClientConnection]] = []
    for _ in range(40):
        ws = await open_ws(gw.url)
        await send(ws, {"op": "connect"})
        hello = await recv(ws)
        clients.append((hello["server"], ws))
        if {s for s, _ in clients} == {"wr-w1", "wr-w2"}:
            break
    assert {s for s, _ in clients} == {"wr-w1", "wr-w2"}, "the kernel spreads connections over both workers"
    on_new = next(ws for s, ws in clients if s == "wr-w1")
    on_other = next(ws for s, ws in clients if s == "wr-w2")
    await send(on_new, {"op": "subscribe", "subjects": [{"subject": subject}]})
    await recv_until(on_new, "subscribed")
    await send(on_other, {"op": "publish", "subject": subject, "content": "after-restart", "id": 1})
    assert (await recv_until(on_other, "ack", timeout=WAIT))["id"] == 1
    assert (await recv_until(on_new, "msg", timeout=WAIT))["content"] == "after-restart"
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(3 * WAIT) == 0
    log = gw.log()  # one death, one restart: workers stopped by SIGTERM are not restarted
    assert (log.count(" died ("), log.count(" restarted (pid")) == (1, 1), log


def _exited(pid: int) -> bool:
    """The process is gone or a zombie (an orphan's exit is reaped by whoever adopted it, maybe nobody)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def test_workers_stop_when_their_parent_is_killed(kafka_broker: KafkaBroker,
                                                        gateway_processes: list[GatewayProcess],
                                                        topic: Callable[[str], str]) -> None:
    """`--workers 2`, the parent killed with SIGKILL (an OOM kill, a supervisor's kill -9): each worker
    closes its clients with 1001 and exits. Before: they went on serving as orphans, nobody restarting
    them, holding the port (SO_REUSEPORT) beside the gateway started in the parent's place."""
    import re

    t = topic()
    await kafka_broker.create_topic(t, 1)
    gw = GatewayProcess(kafka_broker, [t], "wo", "--workers", "2")
    gateway_processes.append(gw)
    await _serving_nodes(gw, {"wo-w1", "wo-w2"})
    m = re.search(r"workers on port \d+ \(pids (\d+), (\d+)\)", gw.log())
    assert m, gw.log()
    workers = [int(m.group(1)), int(m.group(2))]
    try:
        clients: list[tuple[str, ClientConnection]] = []
        for _ in range(40):
            ws = await open_ws(gw.url)
            await send(ws, {"op": "connect"})
            clients.append(((await recv(ws))["server"], ws))
            if {s for s, _ in clients} == {"wo-w1", "wo-w2"}:
                break
        assert {s for s, _ in clients} == {"wo-w1", "wo-w2"}, "the kernel spreads connections over both workers"
        gw.kill(signal.SIGKILL)
        for _, ws in clients:
            assert await close_code(ws) == 1001
        await wait_until(lambda: all(_exited(pid) for pid in workers), "both workers to exit", 3 * WAIT)
    finally:
        for pid in workers:  # (started by this test, through the parent it killed)
            if not _exited(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_workers_stopped_while_they_start_exit_0(kafka_broker: KafkaBroker,
                                                       gateway_processes: list[GatewayProcess],
                                                       topic: Callable[[str], str], sig: int) -> None:
    """SIGTERM or SIGINT right after the parent started its workers, while they still import and connect:
    the gateway exits 0 (the operating contract). Before: a worker not yet listening for the signal died
    of it (SIGTERM: the parent's exit status 241 from -15) or printed a KeyboardInterrupt traceback and
    exited 1 (SIGINT)."""
    t = topic()
    await kafka_broker.create_topic(t, 1)
    gw = GatewayProcess(kafka_broker, [t], "ws", "--workers", "2")
    gateway_processes.append(gw)
    await wait_until(lambda: "2 workers on port" in gw.log(), "the parent to start its workers", 3 * WAIT)
    gw.proc.send_signal(sig)
    assert await asyncio.to_thread(gw.proc.wait, 3 * WAIT) == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()
