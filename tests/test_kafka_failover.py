"""The gateway on a 3-node Apache Kafka cluster while brokers fail: a leader killed (SIGKILL), every
broker restarted one at a time, partitions added. Real gateway, real WebSocket clients, a plain
aiokafka producer on the side; the brokers are the session's cluster (support/kafka_cluster.py),
which every test here leaves as it found it (every node running, every replica in sync).

What is checked, each time, against what Kafka holds at the end (read back with a plain consumer):
  - every acked publish is in Kafka exactly once, at offset seq - 1, with its content;
  - every subscriber got every record of its subjects exactly once, in offset order, with
    continuous seq/prev (a sentinel per subject, published last, proves nothing more arrives);
  - publishes that were not acked failed with `unavailable` (never another error, never silence);
  - the gateway recovers by itself (publishes ack again, /healthz 200) without a restart.
Failover numbers (publishes failed, longest gap in delivery) are printed (`pytest -s`), not asserted.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from conftest import SCALE, ws_url
from gateway.engines.kafka import partition_for_key
from support.kafka_broker import KafkaBroker
from support.kafka_cluster import KafkaCluster
from support.waits import wait_until
from support.ws import connected, recv, recv_until, send

pytestmark = pytest.mark.kafka

WAIT = 10.0 * SCALE


# ------------------------------------------------------------------------------------------ helpers

class Cluster:
    """The session's cluster, with the operations these tests do on it (by PID, nodes started here)."""

    def __init__(self, broker: KafkaBroker, cluster: KafkaCluster) -> None:
        self.broker = broker
        self.c = cluster

    async def describe(self, topic: str) -> list[dict[str, Any]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.up_bootstrap(), request_timeout_ms=5000)
        await admin.start()
        try:
            (t,) = await admin.describe_topics([topic])
            return sorted(t["partitions"], key=lambda p: p["partition"])
        finally:
            await admin.close()

    def up_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.c.nodes if n.pid is not None)

    async def leader(self, topic: str, partition: int) -> int:
        return int((await self.describe(topic))[partition]["leader"])

    async def kill(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        await asyncio.to_thread(self.c.kill_node, self.c.node(node_id), sig)

    async def restart(self, node_id: int) -> None:
        """Start the node again (same config, same log dir) and wait until every broker is back
        (KafkaCluster.restart_node: a start that fails is tried again, then fails with the node's log)."""
        await asyncio.to_thread(self.c.restart_node, self.c.node(node_id))

    async def wait_in_sync(self, topic: str, timeout: float = 6 * WAIT) -> None:
        """Until every partition of `topic` has a leader and all its replicas in sync."""
        last: list[Any] = [None]

        async def in_sync() -> bool:
            try:
                parts = last[0] = await self.describe(topic)
            except Exception as exc:  # noqa: BLE001 - a node is still coming back
                last[0] = exc
                return False
            return bool(parts) and all(p["leader"] >= 0 and len(p["isr"]) == len(p["replicas"]) for p in parts)

        await wait_until(in_sync, lambda: f"every replica of {topic} in sync (last: {last[0]!r})", timeout,
                         interval=0.2)


@pytest.fixture
async def cluster(kafka_broker: KafkaBroker) -> AsyncIterator[Cluster]:
    if kafka_broker.cluster is None:
        pytest.skip("needs the Apache Kafka cluster started here (not Tansu, not KAFKA_BOOTSTRAP)")
    c = Cluster(kafka_broker, kafka_broker.cluster)   # whole: conftest's _whole_kafka_cluster saw to it
    yield c
    # leave the cluster as found: every node running and registered (if this fails, the next test that
    # uses the cluster finds it not whole and brings it back or replaces it)
    await asyncio.to_thread(c.c.heal)


class Subscriber:
    """One WebSocket client subscribed to `subjects`, reading in the background (arrival times too)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.msgs: dict[str, list[dict[str, Any]]] = {}
        self.arrivals: list[float] = []
        self.errors: list[dict[str, Any]] = []
        self.task = asyncio.get_running_loop().create_task(self._run())

    @classmethod
    async def open(cls, url: str, subjects: list[str]) -> Subscriber:
        ws = await connected(url)
        await send(ws, {"op": "subscribe", "subjects": [{"subject": s} for s in subjects]})
        for _ in subjects:
            await recv_until(ws, "subscribed")
        return cls(ws)

    async def _run(self) -> None:
        try:
            while True:
                obj = json.loads(await self.ws.recv())
                if obj["op"] == "msg":
                    self.msgs.setdefault(obj["subject"], []).append(obj)
                    self.arrivals.append(time.monotonic())
                elif obj["op"] == "error":
                    self.errors.append(obj)
        except ConnectionClosed:
            pass

    def longest_gap(self, since: float) -> float:
        times = [since] + [t for t in self.arrivals if t >= since]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.ws.close()


class Publisher:
    """Publishes through one WebSocket with ids; collects each id's answer (ack or error)."""

    WINDOW = 200

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.sent: dict[int, tuple[str, str]] = {}
        self.acks: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, dict[str, Any]] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            f = await recv(self.ws, 6 * WAIT)
            if f["op"] == "ack":
                self.acks[f["id"]] = f
            elif f["op"] == "error":
                self.errors[f["id"]] = f

    async def publish(self, i: int, subject: str, content: str) -> None:
        # a well-behaved client: at most WINDOW publishes unanswered (the gateway's limit is 1000, and
        # while a leader moves, answers wait up to --kafka-publish-timeout-ms)
        await wait_until(lambda: len(self.sent) - len(self.acks) - len(self.errors) < self.WINDOW,
                         "room in the publish window", 6 * WAIT)
        self.sent[i] = (subject, content)
        await send(self.ws, {"op": "publish", "subject": subject, "content": content, "id": i})

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.ws.close()

    async def settle(self) -> None:
        """Until every publish is answered."""
        await wait_until(lambda: len(self.acks) + len(self.errors) >= len(self.sent) or self.reader.done(),
                         "every publish answered", 6 * WAIT)
        if self.reader.done():
            self.reader.result()   # raises what stopped it
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


async def load(pub: Publisher, outside: Any, topic: str, subjects: list[str], stop: asyncio.Event,
               max_n: int, outside_sent: list[bytes], pause: float = 0.02) -> None:
    """Publish through the gateway and, every third step, straight to Kafka, 10 per `pause`;
    bounded in count."""
    i = 0
    while not stop.is_set() and i < max_n:
        s = subjects[i % len(subjects)]
        await pub.publish(i, s, f"gw-{i}")
        if i % 3 == 0:
            value = b"out-%d" % i
            outside_sent.append(value)
            await outside.send(topic, value, key=s.split("/", 2)[2].encode())   # not awaited: pipelined
        i += 1
        if i % 10 == 0:
            await asyncio.sleep(pause)


async def check_delivery(broker: KafkaBroker, topic: str, partitions: int, subjects: list[str],
                         pub: Publisher, subs: list[Subscriber], outside_sent: list[bytes]) -> dict[str, Any]:
    """The checks of the module docstring; returns the numbers worth reporting."""
    # Only `unavailable` for the publishes that were not acked.
    assert {e["code"] for e in pub.errors.values()} <= {"unavailable"}, pub.errors
    assert set(pub.acks) | set(pub.errors) == set(pub.sent)
    # A sentinel per subject, published last (retried until acked: the gateway has recovered).
    sentinel_ws = await connected(ws_url_of(pub))
    try:
        for s in subjects:
            for attempt in range(100):
                await send(sentinel_ws, {"op": "publish", "subject": s, "content": f"sentinel {s}", "id": attempt})
                f = await _answer(sentinel_ws)
                if f["op"] == "ack":
                    break
                assert f["code"] == "unavailable" and attempt < 99, f
                await asyncio.sleep(0.1)
    finally:
        await sentinel_ws.close()
    await wait_until(lambda: all(sub.msgs.get(s) and sub.msgs[s][-1]["content"] == f"sentinel {s}"
                                 for sub in subs for s in subjects), "the sentinels on every subscriber", 3 * WAIT)

    held = await broker.read_topic(topic, partitions)
    values = [r.value for r in held]
    assert len(values) == len(set(values)), "a record is in Kafka twice"
    by_value = {r.value: r for r in held}
    for i, ack in pub.acks.items():   # acked -> in Kafka once, where the ack said
        subject, content = pub.sent[i]
        r = by_value.get(content.encode())
        assert r is not None, f"acked publish {i} is not in Kafka"
        assert (r.offset + 1, f"/{topic}/{r.key.decode()}") == (ack["seq"], subject)
    assert set(outside_sent) <= set(values)
    failed_then_written = sum(1 for i in pub.errors if pub.sent[i][1].encode() in by_value)

    want: dict[str, list[tuple[int, str]]] = {}
    for r in held:
        want.setdefault(f"/{topic}/{r.key.decode()}", []).append((r.offset + 1, r.value.decode()))
    for sub in subs:
        assert not sub.errors, sub.errors
        got = {s: [(m["seq"], m["content"]) for m in msgs] for s, msgs in sub.msgs.items()}
        assert got == want   # every record, once, in offset order
        for msgs in sub.msgs.values():
            last = 0
            for m in msgs:
                assert m["seq"] > last and m.get("prev", last) == last, (m, last)
                last = m["seq"]
    return {"acked": len(pub.acks), "unavailable": len(pub.errors), "failed_then_written": failed_then_written,
            "outside": len(outside_sent), "records": len(held)}


async def _answer(ws: ClientConnection) -> dict[str, Any]:
    while True:
        f = await recv(ws, 3 * WAIT)
        if f["op"] in ("ack", "error"):
            return f


def ws_url_of(pub: Publisher) -> str:
    host, port = pub.ws.remote_address[:2]
    return f"ws://{host}:{port}/ws"


async def healthz(port: int) -> int:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return int((await asyncio.wait_for(reader.readline(), WAIT)).split()[1])
    finally:
        writer.close()


async def gateway_on(gateway_factory: Any, broker: KafkaBroker, topics: list[str], **settings: Any) -> Any:
    gw = await gateway_factory(kafka=broker.bootstrap, topics=tuple(topics), kafka_idempotence="on", **settings)
    await wait_until(lambda: gw.engine.ready, "the Kafka engine caught up")
    return gw


# ------------------------------------------------------------------------------------------ tests

async def test_leader_killed_while_publishing(cluster: Cluster, gateway_factory: Any,
                                              topic: Callable[[str], str]) -> None:
    t = topic()
    await cluster.broker.create_topic(t, 2)
    subjects = [f"/{t}/m{i}" for i in range(6)]
    gw = await gateway_on(gateway_factory, cluster.broker, [t])
    subs = [await Subscriber.open(ws_url(gw), subjects) for _ in range(2)]
    pub = Publisher(await connected(ws_url(gw)))
    outside = cluster.broker.producer(enable_idempotence=True, linger_ms=2)
    await outside.start()
    outside_sent: list[bytes] = []
    stop = asyncio.Event()
    try:
        loader = asyncio.create_task(load(pub, outside, t, subjects, stop, 3000, outside_sent))
        await wait_until(lambda: len(pub.acks) >= 100 and all(len(s.msgs) == len(subjects) for s in subs),
                         "publishes acked and delivered before the kill")
        victim = await cluster.leader(t, partition_for_key(b"m0", 2))
        killed_at = time.monotonic()
        await cluster.kill(victim)   # SIGKILL: no controlled shutdown
        # publishes to the victim's partition acked again after the kill: a new leader elsewhere (acks
        # of the other partition alone can reach any count before the controller fences the victim)
        there = partition_for_key(b"m0", 2)
        moved = {s for s in subjects if partition_for_key(s.split("/", 2)[2].encode(), 2) == there}

        def acked_there() -> int:
            return sum(1 for a in list(pub.acks.values()) if a.get("subject") in moved)

        acked_at_kill = acked_there()
        await wait_until(lambda: acked_there() >= acked_at_kill + 100,
                         "publishes to the victim's partition acked again after the kill", 6 * WAIT)
        assert await cluster.leader(t, partition_for_key(b"m0", 2)) not in (victim, -1)
        stop.set()
        await loader
        await outside.flush()
        await pub.settle()
        numbers = await check_delivery(cluster.broker, t, 2, subjects, pub, subs, outside_sent)
        assert await healthz(gw.port) == 200
        gap = max(s.longest_gap(killed_at) for s in subs)
        print(f"\nleader kill (node {victim}): {numbers}, longest delivery gap {gap:.2f} s, "
              f"lost 0, duplicated 0")
        # the node comes back and catches up; the gateway goes on unbothered
        await cluster.restart(victim)
        await cluster.wait_in_sync(t)
    finally:
        stop.set()
        await outside.stop()
        for s in subs:
            await s.stop()
        await pub.close()


async def test_rolling_restart_under_load(cluster: Cluster, gateway_factory: Any,
                                          topic: Callable[[str], str]) -> None:
    t = topic()
    await cluster.broker.create_topic(t, 3)
    subjects = [f"/{t}/r{i}" for i in range(6)]
    gw = await gateway_on(gateway_factory, cluster.broker, [t])
    subs = [await Subscriber.open(ws_url(gw), subjects) for _ in range(2)]
    pub = Publisher(await connected(ws_url(gw)))
    outside = cluster.broker.producer(enable_idempotence=True, linger_ms=2)
    await outside.start()
    outside_sent: list[bytes] = []
    stop = asyncio.Event()
    try:
        loader = asyncio.create_task(load(pub, outside, t, subjects, stop, 12_000, outside_sent, 0.05))
        await wait_until(lambda: len(pub.acks) >= 100, "publishes acked before the restarts")
        started = time.monotonic()
        for node in cluster.c.nodes:   # one at a time: SIGTERM (controlled shutdown), start, in sync
            await cluster.kill(node.node_id, signal.SIGTERM)
            acked = len(pub.acks)
            await wait_until(lambda: len(pub.acks) >= acked + 50,  # noqa: B023 (awaited in this iteration)
                             f"publishes acked with node {node.node_id} down",
                             6 * WAIT)
            await cluster.restart(node.node_id)
            await cluster.wait_in_sync(t)
        stop.set()
        await loader
        await outside.flush()
        await pub.settle()
        numbers = await check_delivery(cluster.broker, t, 3, subjects, pub, subs, outside_sent)
        assert await healthz(gw.port) == 200
        gap = max(s.longest_gap(started) for s in subs)
        print(f"\nrolling restart: {numbers}, longest delivery gap {gap:.2f} s, lost 0, duplicated 0")
    finally:
        stop.set()
        await outside.stop()
        for s in subs:
            await s.stop()
        await pub.close()


async def test_partitions_added_while_running(cluster: Cluster, gateway_factory: Any,
                                              topic: Callable[[str], str]) -> None:
    t = topic()
    await cluster.broker.create_topic(t, 2)
    gw = await gateway_on(gateway_factory, cluster.broker, [t])   # metadata refreshed every 5 s
    # keys that land in the new partitions once there are 4 (and elsewhere while there are 2)
    keys = {p: next(f"k{i}" for i in range(1000) if partition_for_key(f"k{i}".encode(), 4) == p) for p in range(4)}
    subjects = [f"/{t}/{k}" for k in keys.values()]
    sub = await Subscriber.open(ws_url(gw), subjects)
    pub = Publisher(await connected(ws_url(gw)))
    try:
        await pub.publish(0, subjects[2], "before")
        await wait_until(lambda: 0 in pub.acks, "a publish before the growth")

        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.broker.bootstrap)
        await admin.start()
        try:
            await admin.create_partitions({t: NewPartitions(total_count=4)})
        finally:
            await admin.close()
        await cluster.wait_in_sync(t)
        await wait_until(lambda: gw.engine.stats()["partitions_assigned"] == 4, "the new partitions assigned",
                         3 * WAIT)

        # Records produced straight into the new partitions reach the subscriber.
        producer = cluster.broker.producer()
        await producer.start()
        try:
            metas = [await producer.send_and_wait(t, b"outside-%d" % p, key=keys[p].encode(), partition=p)
                     for p in (2, 3)]
        finally:
            await producer.stop()
        await wait_until(lambda: all(sub.msgs.get(subjects[p])
                                     and sub.msgs[subjects[p]][-1]["content"] == f"outside-{p}"
                                     for p in (2, 3)), "records of the new partitions")
        for p, meta in zip((2, 3), metas):
            assert [(m["seq"], m["content"]) for m in sub.msgs[subjects[p]]][-1] == (meta.offset + 1, f"outside-{p}")

        # Publishes through the gateway go where the key maps now, with that partition's epoch.
        for i, s in enumerate(subjects, start=1):
            await pub.publish(i, s, f"after-{i}")
        await wait_until(lambda: all(i in pub.acks for i in range(1, 5)), "publishes after the growth")
        assert not pub.errors
        held = await cluster.broker.read_topic(t, 4)
        where = {r.value: r.partition for r in held}
        for i, p in enumerate(range(4), start=1):
            assert where[f"after-{i}".encode()] == p
            assert pub.acks[i]["epoch"] == gw.engine.epoch(_subject(subjects[p]))
        await wait_until(lambda: all(sub.msgs[s][-1]["content"] == f"after-{i}" for i, s in enumerate(subjects, 1)),
                         "the publishes delivered")
        assert {m["epoch"] for m in sub.msgs[subjects[3]]} == {pub.acks[4]["epoch"]}
        await pub.settle()
    finally:
        await sub.stop()
        await pub.close()


def _subject(text: str) -> Any:
    from gateway.subjects import parse_subject

    return parse_subject(text)

