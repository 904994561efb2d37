"""KafkaEngine against a real Kafka-protocol broker (Tansu, or KAFKA_BOOTSTRAP): no mocks.

Each test uses its own topics. Waits are bounded polls (scaled by TEST_TIMEOUT_SCALE); no test
asserts on how long something took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from gateway.engines import kafka_records
from gateway.engines.base import EngineUnavailable, UnknownTopic
from gateway.engines.kafka import KafkaEngine, outcome_unknown, partition_for_key
from gateway.records import Record
from gateway.subjects import parse_subject
from support.kafka_broker import KafkaBroker, start_tansu, tansu_fetch_wait
from support.ports import free_port
from support.waits import wait_until  # noqa: E402

pytestmark = pytest.mark.kafka

SCALE = float(os.environ.get("TEST_TIMEOUT_SCALE", "1"))
WAIT = 10.0 * SCALE







Make = Callable[..., Awaitable[tuple[KafkaEngine, list[Record]]]]


@pytest.fixture
async def make_engine(kafka_broker: KafkaBroker) -> AsyncIterator[Make]:
    engines: list[KafkaEngine] = []

    async def make(topics: list[str], **kw: Any) -> tuple[KafkaEngine, list[Record]]:
        bootstrap = kw.pop("bootstrap", kafka_broker.bootstrap)
        kw.setdefault("idempotence", kafka_broker.idempotence)
        kw.setdefault("metadata_refresh_s", 0.2)
        for key, value in tansu_fetch_wait().items():
            kw.setdefault(key, value)
        engine = KafkaEngine(bootstrap, topics, **kw)
        got: list[Record] = []
        engine.bind(got.append)
        engines.append(engine)
        await engine.start()
        return engine, got

    yield make
    for engine in engines:
        await engine.stop()


async def produce(broker: KafkaBroker, topic: str, items: list[tuple[bytes | None, bytes | None]],
                  partition: int | None = None) -> list[Any]:
    """Produce (key, value) pairs in order with a plain aiokafka producer; their RecordMetadata."""
    producer = broker.producer()
    await producer.start()
    try:
        return [await producer.send_and_wait(topic, v, key=k, partition=partition) for k, v in items]
    finally:
        await producer.stop()


def test_partitioner_is_javas_murmur2() -> None:
    # Output of Kafka's Java partitioner with 1000 partitions (as in kafka-python's tests).
    vectors = {b"": 681, b"a": 524, b"ab": 434, b"abc": 107, b"123456789": 566, b"\x00 ": 742}
    for key, want in vectors.items():
        assert partition_for_key(key, 1000) == want
        assert DefaultPartitioner()(key, list(range(1000)), []) == want
    assert partition_for_key(None, 7) == 0


async def test_produced_record_reaches_sink(kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 3)
    engine, got = await make_engine([t])
    metas = await produce(kafka_broker, t, [(b"football/5", b"goal"), (b"football/6", b"x"),
                                            (b"football/5", b"second"), (b"football/5", None)])
    await wait_until(lambda: len(got) == 4, "4 records")
    s = parse_subject(f"/{t}/football/5")
    mine = [r for r in got if r.subject == s.text]
    assert [r.content for r in mine] == [b"goal", b"second", b""]   # null value -> b""
    offsets = [m.offset for m in metas if m is not metas[1]]
    assert [r.seq for r in mine] == [o + 1 for o in offsets]
    assert [r.prev for r in mine] == [0, mine[0].seq, mine[1].seq]
    assert {r.epoch for r in mine} == {engine.epoch(s)}
    assert metas[0].partition == partition_for_key(b"football/5", 3) == engine.partition_of(s)
    assert mine[0].ts == metas[0].timestamp
    assert engine.stats()["records_consumed"] == 4


async def test_publish_is_read_back_by_plain_consumer(kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 4)
    engine, got = await make_engine([t])
    s = parse_subject(f"/{t}/tennis/7")
    results = [await engine.publish(s, b"m%d" % i) for i in range(3)]
    records = await kafka_broker.read_topic(t, 4, polls=200)
    assert [(r.topic, r.key, r.value) for r in records] == [(t, b"tennis/7", b"m%d" % i) for i in range(3)]
    assert {r.partition for r in records} == {partition_for_key(b"tennis/7", 4)}
    assert results == [(engine.epoch(s), r.offset + 1) for r in records]
    await wait_until(lambda: len(got) == 3, "own publishes in the sink")
    assert [(r.subject, r.seq, r.content) for r in got] == [(s.text, seq, b"m%d" % i)
                                                            for i, (_, seq) in enumerate(results)]
    with pytest.raises(UnknownTopic):
        await engine.publish(parse_subject("/not-served/x"), b"x")
    with pytest.raises(UnknownTopic):
        engine.check_subject(parse_subject("/not-served"))


async def test_concurrent_publishes_keep_call_order(kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 2)
    engine, got = await make_engine([t])
    s = parse_subject(f"/{t}/one")
    results = await asyncio.gather(*[engine.publish(s, b"%d" % i) for i in range(100)])
    seqs = [seq for _, seq in results]
    assert seqs == sorted(seqs) and len(set(seqs)) == 100
    await wait_until(lambda: len(got) == 100, "100 records")
    assert [r.content for r in got] == [b"%d" % i for i in range(100)]
    assert [r.prev for r in got[1:]] == [r.seq for r in got[:-1]]


async def test_keyless_subject_is_partition_0(kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 3)
    engine, got = await make_engine([t])
    s = parse_subject(f"/{t}")
    results = [await engine.publish(s, b"k%d" % i) for i in range(3)]
    await produce(kafka_broker, t, [(None, b"elsewhere")], partition=2)   # skipped: not partition 0
    records = await kafka_broker.read_topic(t, 3, polls=200)
    assert [(r.partition, r.key) for r in records if r.value != b"elsewhere"] == [(0, None)] * 3
    assert [seq for _, seq in results] == [1, 2, 3]
    await wait_until(lambda: engine.stats()["records_skipped_keyless"] == 1, "keyless record of partition 2 counted")
    assert [(r.subject, r.seq, r.prev, r.content) for r in got] == [
        (s.text, 1, 0, b"k0"), (s.text, 2, 1, b"k1"), (s.text, 3, 2, b"k2")]


async def test_bad_keys_are_skipped_and_counted(kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 1)
    engine, got = await make_engine([t])
    bad = [b"has space", b"\xff\xfe", b"/lead", b"a//b", b"trail/", b"x" * 1100]
    await produce(kafka_broker, t, [(k, b"bad") for k in bad] + [(b"ok/1", b"good")])
    await wait_until(lambda: len(got) == 1, "the good record")
    assert [(r.subject, r.seq, r.prev) for r in got] == [(f"/{t}/ok/1", len(bad) + 1, 0)]
    await wait_until(lambda: engine.stats()["records_skipped_bad_key"] == len(bad), "bad keys counted")


async def test_records_too_large_as_delivered_are_skipped_on_every_path(
        kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:
    """A record of another producer whose content as delivered (JSON-escaped: a control character is 6
    bytes, \\u0001) is over --max-message-bytes (1 MiB) would be a msg over every subscriber's
    --max-pending-bytes: skipped and counted by the consumer (live and warmup), a replay and a snapshot
    read alike, and no record's prev: the next one of the subject carries the last one delivered."""
    t = topic()
    await kafka_broker.create_topic(t, 1)
    limit = 1 << 20
    fits = (limit - len('"content":""')) // 6   # escaped, the member is exactly at the limit or just under
    engine, got = await make_engine([t])
    metas = await kafka_broker.produce(t, [
        (b"a", b"m1"), (b"a", b"\x01" * (fits + 1)), (b"b", b"other"), (b"a", b"m3"),
        (b"a", b"\x01" * fits), (b"a", b"\x02" * 200_000)])
    seq = [m.offset + 1 for m in metas]
    a, b = parse_subject(f"/{t}/a"), parse_subject(f"/{t}/b")
    epoch = engine.epoch(a)
    # every record read (handed to the sink, or skipped, in the same turn)
    await wait_until(lambda: engine.partition_stats()[0][3] == len(metas), "the records read")
    expected = [(a.text, seq[0], 0, b"m1"), (b.text, seq[2], 0, b"other"), (a.text, seq[3], seq[0], b"m3"),
                (a.text, seq[4], seq[3], b"\x01" * fits)]
    assert [(r.subject, r.seq, r.prev, r.content) for r in got] == expected
    assert engine.stats()["records_skipped_too_large"] == 2
    of_a = [x for x in expected if x[0] == a.text]
    # Replays from Kafka: from the subject's start, from m1 and from m3 (the record before the range is
    # read for prev); the same records with the same prev as live. From the skipped record's own seq (no
    # client was given it): the first prev is unknown, as after any position that is no message of it.
    at_skipped = [(a.text, seq[3], None, b"m3"), *of_a[2:]]
    for after, want in ((0, of_a), (seq[0], of_a[1:]), (seq[1], at_skipped), (seq[3], of_a[2:])):
        replayed = await engine.replay(a, epoch, after, seq[-1])
        assert replayed is not None
        assert [(r.subject, r.seq, r.prev, r.content) for r in replayed] == want, after
    # A snapshot read (the subject's newest record) passes over the newest record, too large.
    snap = await engine.latest(a)
    assert snap is not None and (snap.seq, snap.prev) == (seq[4], seq[3])
    # Warmup: an engine started now reads them at start, with the same result.
    engine2, got2 = await make_engine([t])
    await wait_until(lambda: engine2.partition_stats()[0][3] == len(metas), "the records read, at warmup")
    assert [(r.subject, r.seq, r.prev, r.content) for r in got2] == expected
    assert engine2.stats()["records_skipped_too_large"] == 2


async def test_two_engines_agree(kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:
    t1, t2 = topic("a"), topic("b")
    await kafka_broker.create_topic(t1, 2)
    await kafka_broker.create_topic(t2, 2)
    e1, got1 = await make_engine([t1, t2])
    e2, got2 = await make_engine([t1, t2])
    await e1.publish(parse_subject(f"/{t1}/x"), b"from e1")
    await e2.publish(parse_subject(f"/{t2}/x"), b"from e2")
    await produce(kafka_broker, t1, [(b"y/%d" % i, b"p%d" % i) for i in range(6)])
    await wait_until(lambda: len(got1) == 8 and len(got2) == 8, "8 records in both engines")
    key = lambda r: (r.subject, r.seq)  # noqa: E731 - partitions interleave differently per engine
    assert sorted(got1, key=key) == sorted(got2, key=key)
    for text in (f"/{t1}/x", f"/{t2}/x", f"/{t1}", f"/{t1}/y/3"):
        assert e1.epoch(parse_subject(text)) == e2.epoch(parse_subject(text))
    epochs = {e1._epoch_of(t, p) for t in (t1, t2) for p in range(2)}
    assert len(epochs) == 4 and all(len(e) == 16 for e in epochs)


async def test_warmup_fills_history_and_ready_flips(kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 1)
    await produce(kafka_broker, t, [(b"s/%d" % (i % 2), b"%d" % i) for i in range(60)])

    engine, got = await make_engine([t], warmup_records=20)
    await wait_until(lambda: engine.ready, "ready")
    assert got and got[-1].seq == 60          # ready only once caught up
    seqs = [r.seq for r in got]
    # The last 20 at least (Tansu's ListOffsets may report a slightly lower end: start earlier).
    assert seqs == list(range(seqs[0], 61)) and 20 <= len(seqs) < 60
    first = {}
    for r in got:
        first.setdefault(r.subject, r)
    assert all(r.prev is None for r in first.values())   # started mid-partition: unknown
    assert all(r.prev == r.seq - 2 for r in got if r is not first[r.subject])

    full, got_full = await make_engine([t], warmup_records=1000)
    await wait_until(lambda: full.ready, "ready")
    assert [r.seq for r in got_full] == list(range(1, 61))
    assert [r.prev for r in got_full[:3]] == [0, 0, 1]
    assert full.stats()["lag"] == 0


async def test_empty_topics_are_ready(make_engine: Make, topic, kafka_broker: KafkaBroker) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 3)
    engine, _ = await make_engine([t, topic("absent")])
    await wait_until(lambda: engine.ready, "ready on empty and absent topics")
    assert engine.stats()["partitions_assigned"] == 3


async def test_replay(kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:
    t = topic()
    await kafka_broker.create_topic(t, 1)
    items = [(b"a" if i % 3 else b"b", b"v%d" % i) for i in range(30)]
    metas = await produce(kafka_broker, t, items)
    engine, _ = await make_engine([t], max_recovery_records=20)
    a = parse_subject(f"/{t}/a")
    epoch = engine.epoch(a)
    a_seqs = [m.offset + 1 for (k, _), m in zip(items, metas) if k == b"a"]

    after, upto = a_seqs[3], a_seqs[12]
    replayed = await engine.replay(a, epoch, after, upto)
    assert replayed is not None
    assert [r.seq for r in replayed] == [s for s in a_seqs if after < s <= upto]
    assert [r.content for r in replayed] == [items[s - 1][1] for s in a_seqs if after < s <= upto]
    assert [r.prev for r in replayed] == [s for s in a_seqs if after <= s < upto]
    assert {(r.subject, r.epoch) for r in replayed} == {(a.text, epoch)}

    from_start = await engine.replay(a, epoch, 0, 10)
    assert from_start is not None and [r.seq for r in from_start] == [s for s in a_seqs if s <= 10]
    assert from_start[0].prev == 0
    assert await engine.replay(a, epoch, 5, 5) == []
    assert await engine.replay(a, epoch, 0, 21) is None            # more than max_recovery_records
    assert await engine.replay(a, "0123456789abcdef", after, upto) is None
    beyond = await engine.replay(a, epoch, 25, 40)                # upto past the end: what exists
    assert beyond is not None and [r.seq for r in beyond] == [s for s in a_seqs if s > 25]


async def test_a_replay_whose_records_retention_deletes_meanwhile_fails(
        kafka_broker: KafkaBroker, make_engine: Make, topic, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention deletes the rest of the range while a replay reads it: the replay fails (the client gets
    recovered:false), it does not jump to the new log start and return the range with a hole in it."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
    from aiokafka.structs import TopicPartition

    from gateway.engines import kafka as kafka_module

    if os.environ.get("KAFKA_TEST_BROKER") == "tansu":
        pytest.skip("Tansu has no DeleteRecords")
    t = topic()
    await kafka_broker.create_topic(t, 1)
    tp = TopicPartition(t, 0)
    # one record per batch, 300 KB each: a fetch (1 MiB per partition) returns a few, not the range
    metas = await produce(kafka_broker, t, [(b"a", b"%02d" % i + b"x" * 300_000) for i in range(12)])
    deleted: list[int] = []

    class RetentionMeanwhile(AIOKafkaConsumer):
        """A replay reader: after its first records, retention deletes three records past them."""

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.replay = kw.get("client_id", "").endswith("-replay")

        async def getmany(self, *partitions: Any, **kw: Any) -> Any:
            out = await super().getmany(*partitions, **kw)
            if self.replay and not deleted and out.get(tp):
                self.pause(tp)   # no await since the records were drained: no fetch of the next ones yet
                before = out[tp][-1].offset + 4
                admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
                await admin.start()
                try:
                    await admin.delete_records({tp: RecordsToDelete(before_offset=before)})
                finally:
                    await admin.close()
                deleted.append(before)
                self.resume(tp)
            return out

    engine, _ = await make_engine([t])
    monkeypatch.setattr(kafka_module, "AIOKafkaConsumer", RetentionMeanwhile)
    a = parse_subject(f"/{t}/a")
    replayed = await engine.replay(a, engine.epoch(a), 0, metas[-1].offset + 1)
    assert deleted and deleted[0] < metas[-1].offset   # records were deleted within the range
    assert replayed is None, [r.seq for r in replayed]


async def test_topic_created_after_start_is_picked_up(kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:
    t = topic()
    engine, got = await make_engine([t])
    await wait_until(lambda: engine.ready, "ready")
    assert engine.stats()["partitions_assigned"] == 0
    await kafka_broker.create_topic(t, 2)
    await wait_until(lambda: engine.stats()["partitions_assigned"] == 2, "partitions discovered")
    metas = await produce(kafka_broker, t, [(b"k/%d" % i, b"x") for i in range(4)])
    await wait_until(lambda: len(got) == 4, "records of the new topic")
    assert sorted((r.subject, r.seq, r.prev) for r in got) == sorted(
        (f"/{t}/k/{i}", m.offset + 1, 0) for i, m in enumerate(metas))


async def test_recreated_topic_gets_new_epoch(kafka_broker: KafkaBroker, make_engine: Make, topic) -> None:

    t = topic()
    await kafka_broker.create_topic(t, 1)
    engine, got = await make_engine([t])
    s = parse_subject(f"/{t}/k")
    old_epoch, _ = await engine.publish(s, b"old")
    await wait_until(lambda: len(got) == 1, "the old record read back before the topic goes")
    await kafka_broker.delete_topic(t)
    await wait_until(lambda: engine.stats()["partitions_assigned"] == 0, "deleted topic dropped")
    await kafka_broker.create_topic(t, 1)
    await wait_until(lambda: engine.stats()["partitions_assigned"] == 1, "recreated topic assigned")
    # the new topic id reaches the engine with a metadata refresh (a documented short window)
    await wait_until(lambda: engine.epoch(s) != old_epoch, "epoch of the recreated topic")
    new_epoch, seq = await engine.publish(s, b"new")
    assert new_epoch != old_epoch and new_epoch == engine.epoch(s) and seq == 1
    await wait_until(lambda: len(got) == 2, "both records")
    assert [(r.epoch, r.seq, r.prev, r.content) for r in got] == [(old_epoch, 1, 0, b"old"), (new_epoch, 1, 0, b"new")]
    assert await engine.replay(s, old_epoch, 0, 1) is None


async def test_idempotence_fallback_warns_once(make_engine: Make, topic,
                                               caplog: pytest.LogCaptureFixture) -> None:
    tansu = start_tansu()   # a broker without the idempotent producer, whatever the session runs on
    try:
        t = topic()
        with caplog.at_level(logging.WARNING, logger="gateway.engines.kafka"):
            engine, _ = await make_engine([t], idempotence=None, bootstrap=tansu.bootstrap)
        warnings = [r for r in caplog.records if r.name == "gateway.engines.kafka" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "without idempotence" in warnings[0].getMessage()
        assert not engine.idempotent
        assert (await engine.publish(parse_subject(f"/{t}/x"), b"ok"))[1] == 1
        await engine.stop()
        await engine.stop()   # idempotent
    finally:
        tansu.stop()


async def test_idempotent_producer_where_the_broker_has_it(kafka_broker: KafkaBroker, make_engine: Make, topic,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    if not kafka_broker.idempotence:
        pytest.skip("this broker has no idempotent producer (Tansu)")
    t = topic()
    await kafka_broker.create_topic(t, 1)
    with caplog.at_level(logging.WARNING, logger="gateway.engines.kafka"):
        engine, got = await make_engine([t], idempotence=None)   # auto: on, and it works
    assert engine.idempotent and engine.stats()["idempotent"] == 1.0
    assert not [r for r in caplog.records if r.name == "gateway.engines.kafka" and r.levelno >= logging.WARNING]
    s = parse_subject(f"/{t}/x")
    assert [(await engine.publish(s, b"%d" % i))[1] for i in range(3)] == [1, 2, 3]
    await wait_until(lambda: len(got) == 3, "own publishes")


async def test_outage_through_proxy(kafka_broker: KafkaBroker, topic) -> None:
    if kafka_broker.external:
        pytest.skip("needs brokers that advertise the proxies (started here)")
    t = topic()
    async with kafka_broker.behind_proxy() as net:
        broker = net.broker   # direct access, around the proxies
        engine = KafkaEngine(net.bootstrap, [t], idempotence=broker.idempotence, publish_timeout=1.0,
                             metadata_refresh_s=0.2, **tansu_fetch_wait())
        got: list[Record] = []
        engine.bind(got.append)
        direct = broker.direct_producer()
        try:
            await broker.create_topic(t, 2)
            await engine.start()
            subjects = [parse_subject(f"/{t}/k{i}") for i in range(4)]
            for i in range(6):
                await engine.publish(subjects[i % 4], b"before-%d" % i)
            await wait_until(lambda: len(got) == 6, "records before the outage")

            net.cut()
            with pytest.raises(EngineUnavailable):
                await asyncio.wait_for(engine.publish(subjects[0], b"during-outage"), WAIT)
            await direct.start()   # straight to the broker's own listener, around the proxies
            for i in range(6):
                await direct.send_and_wait(t, b"during-%d" % i, key=subjects[i % 4].key_bytes)
            # nothing passes the cut proxies (the engine's consumer keeps failing meanwhile)
            assert len(got) == 6
            net.restore()

            for i in range(6):
                for attempt in range(20):   # the producer reconnects on demand
                    try:
                        await engine.publish(subjects[i % 4], b"after-%d" % i)
                        break
                    except EngineUnavailable:
                        if attempt == 19:
                            raise
                        await asyncio.sleep(0.1)

            # A sentinel last in each partition: once both are in the sink, everything before them is
            # (records of a partition reach the sink in offset order), and a duplicate would show.
            sentinels = [next(s for s in (parse_subject(f"/{t}/end{j}") for j in range(100))
                              if engine.partition_of(s) == p) for p in range(2)]
            for s in sentinels:
                await engine.publish(s, b"sentinel")
            # what Kafka holds (maybe the failed publish too)
            held = await broker.read_topic(t, 2, direct=True, polls=200)
            assert {r.value for r in held} >= {b"%s-%d" % (w, i) for w in (b"before", b"during", b"after")
                                               for i in range(6)}
            await wait_until(lambda: {r.subject for r in got if r.content == b"sentinel"}
                             == {s.text for s in sentinels}, "both partitions' sentinels in the sink")
            by_epoch: dict[str, list[tuple[str, int, bytes]]] = {}
            for r in held:
                s = parse_subject(f"/{t}/{r.key.decode()}")
                by_epoch.setdefault(engine.epoch(s), []).append((s.text, r.offset + 1, r.value))
            got_by_epoch: dict[str, list[tuple[str, int, bytes]]] = {}
            for r in got:
                got_by_epoch.setdefault(r.epoch, []).append((r.subject, r.seq, r.content))
            assert got_by_epoch == by_epoch   # exactly once, in offset order, per partition
            assert engine.stats()["publish_errors"] >= 1
        finally:
            await engine.stop()
            await direct.stop()


async def test_start_without_broker_raises_unavailable() -> None:
    engine = KafkaEngine(f"127.0.0.1:{free_port()}", ["t"], idempotence=False, start_timeout=5)
    engine.bind(lambda r: None)
    with pytest.raises(EngineUnavailable):
        await engine.start()
    assert not engine.ready
    with pytest.raises(EngineUnavailable):
        await engine.publish(parse_subject("/t/x"), b"x")
    await engine.stop()


def test_raw_records_hook_fits_this_aiokafka() -> None:
    """The reader's shortcut around ConsumerRecord leans on aiokafka internals (kafka_records): it must
    install on every aiokafka version pyproject allows, or the gateway silently reads slower."""
    from aiokafka.consumer import fetcher

    assert kafka_records.install()
    assert fetcher.PartitionRecords is kafka_records._PartitionRecords


async def test_raw_records_match_consumer_records(kafka_broker: KafkaBroker, topic) -> None:
    """A consumer with key_deserializer=raw_records reads the same offsets, keys, values and timestamps
    as a plain one (which still gets ConsumerRecords), null key and value included."""
    from aiokafka.structs import ConsumerRecord, TopicPartition

    assert kafka_records.install()
    t = topic()
    await kafka_broker.create_topic(t, 1)
    items: list[tuple[bytes | None, bytes | None]] = [(b"a", b"1"), (None, b"2"), (b"b", None), (b"a", b"x" * 5000)]
    metas = await produce(kafka_broker, t, items, partition=0)
    got: dict[str, list[Any]] = {}
    for name, kw in (("plain", {}), ("raw", {"key_deserializer": kafka_records.raw_records})):
        consumer = kafka_broker.consumer(**kw)
        await consumer.start()
        try:
            tp = TopicPartition(t, 0)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            records: list[Any] = []
            for _ in range(200):
                if len(records) >= len(items):
                    break
                for rs in (await consumer.getmany(timeout_ms=50)).values():
                    records.extend(rs)
            assert await consumer.position(tp) == len(items)
        finally:
            await consumer.stop()
        got[name] = records
    assert all(isinstance(r, ConsumerRecord) for r in got["plain"])
    assert not any(isinstance(r, ConsumerRecord) for r in got["raw"])
    fields = [[(r.offset, r.key, r.value, r.timestamp) for r in got[name]] for name in ("plain", "raw")]
    assert fields[0] == fields[1] == [(m.offset, k, v, m.timestamp) for m, (k, v) in zip(metas, items)]


async def test_engine_hands_runs_to_the_hub(kafka_broker: KafkaBroker, topic) -> None:
    """Bound as the server binds it (deliver_run), interleaved subjects of one partition reach the hub
    with their own seq/prev chains, in order, each once; a sentinel last proves nothing more comes."""
    from gateway.hub import Hub

    t = topic()
    await kafka_broker.create_topic(t, 2)
    engine = KafkaEngine(kafka_broker.bootstrap, [t], idempotence=kafka_broker.idempotence, metadata_refresh_s=0.2,
                         **tansu_fetch_wait())
    hub = Hub(lambda s: engine.epoch(parse_subject(s)), 1000, 1 << 24)
    engine.bind(hub.deliver, hub, hub.deliver_run)
    await engine.start()
    try:
        keys = [b"k%d" % i for i in range(5)]
        metas = await produce(kafka_broker, t, [(keys[i % 5], b"v%d" % i) for i in range(60)])
        sentinel = await engine.publish(parse_subject(f"/{t}/k0"), b"sentinel")
        await wait_until(lambda: hub.position(f"/{t}/k0") == sentinel, "the sentinel in the hub")
        await wait_until(lambda: all(hub.position(f"/{t}/{k.decode()}") is not None for k in keys), "every subject")
        for k in keys:
            subject = f"/{t}/{k.decode()}"
            mine = [m for i, m in enumerate(metas) if keys[i % 5] == k]
            seqs = [m.offset + 1 for m in mine] + ([sentinel[1]] if k == b"k0" else [])
            st_ = hub.get(subject)
            assert st_ is not None and st_.ring is not None
            frames = st_.ring.since(0)
            assert frames is not None
            msgs = [orjson.loads(f[2:] if f[1] < 126 else f[4:]) for f in frames]
            assert [m["seq"] for m in msgs] == seqs
            assert [m["prev"] for m in msgs] == [0, *seqs[:-1]]
            assert {m["epoch"] for m in msgs} == {engine.epoch(parse_subject(subject))}
            assert [m["content"] for m in msgs[:len(mine)]] == [f"v{keys.index(k) + 5 * i}" for i in range(12)]
        assert hub.stats.records == 61 and hub.stats.duplicates == 0
        assert engine.stats()["records_consumed"] == 61
    finally:
        await engine.stop()


def test_which_failed_publishes_may_still_be_in_kafka() -> None:
    """After the record was handed to the producer: timeouts and retriable errors leave the outcome open
    (the request may have been appended); a broker's refusal of the record does not."""
    from aiokafka import errors

    for exc in (TimeoutError(), errors.KafkaTimeoutError(), errors.RequestTimedOutError(),
                errors.NotEnoughReplicasAfterAppendError(), errors.KafkaConnectionError()):
        assert outcome_unknown(exc), exc
    for exc in (errors.MessageSizeTooLargeError(), errors.TopicAuthorizationFailedError(),
                errors.InvalidTopicError(), errors.ProducerClosed()):
        assert not outcome_unknown(exc), exc


async def test_a_stop_cut_short_by_aiokafkas_fetcher_is_finished(kafka_broker: KafkaBroker, make_engine: Make,
                                                                  topic, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka 0.14's Fetcher.close() awaits the fetch tasks it cancels, and one cancelled in its retry
    back-off (Kafka unreachable) raises CancelledError out of the consumer's stop() before it closes its
    client. The engine's stop() neither passes that on nor leaves the client's connections open."""
    t = topic()
    await kafka_broker.create_topic(t, 1)
    engine, _ = await make_engine([t])
    consumer = engine._consumer
    assert consumer is not None
    closed: list[bool] = []
    real_close = consumer._client.close

    async def client_close() -> None:
        closed.append(True)
        await real_close()

    async def cut_short() -> None:   # what consumer.stop() does until its fetcher's close raises
        consumer._closed = True
        fetcher = consumer._fetcher
        fetcher._closed = True
        fetcher._fetch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fetcher._fetch_task
        raise asyncio.CancelledError   # `await x` on a fetch task cancelled in its retry back-off

    monkeypatch.setattr(consumer._client, "close", client_close)
    monkeypatch.setattr(consumer, "stop", cut_short)
    await engine.stop()   # returns: the stray cancellation is the consumer's, not the caller's
    assert closed == [True]
    assert engine._consumer is None and engine._producer is None


async def test_a_stop_of_the_caller_is_still_a_cancellation(kafka_broker: KafkaBroker, make_engine: Make,
                                                            topic, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancellation of whoever stops the engine is not mistaken for aiokafka's: it goes on."""
    t = topic()
    await kafka_broker.create_topic(t, 1)
    engine, _ = await make_engine([t])
    consumer = engine._consumer
    assert consumer is not None
    entered = asyncio.Event()
    real_stop = consumer.stop

    async def slow_stop() -> None:
        entered.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(consumer, "stop", slow_stop)
    stopping = asyncio.get_running_loop().create_task(engine.stop())
    await asyncio.wait_for(entered.wait(), WAIT)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    # the test's own cleanup of what the cancelled stop left (the fixture's stop() returns at once now)
    await real_stop()
    if engine._producer is not None:
        await engine._producer.stop()
    if engine._meta is not None:
        await engine._meta.close()
