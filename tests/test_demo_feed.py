"""The demo's feed (gateway/demo_feed.py): its schedule, and its three ways out over real sockets:
`demo-feed --url` through a gateway, `demo-feed --kafka` into a Kafka-protocol broker, and
`serve --demo` inside a gateway started from the command line."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import jwt
import pytest
from aiokafka.partitioner import murmur2
from aiokafka.structs import TopicPartition

from conftest import SCALE, ws_url
from gateway import demo_feed
from gateway.client import Client, Message
from support.kafka_broker import read_after
from support.waits import wait_until

SUBJECTS = [f"/matches/football/{n}" for n in range(1, 11)]


# --------------------------------------------------------------------------- the schedule


def test_schedule_is_repeatable_with_a_seed_and_stays_in_the_demo():
    a = list(demo_feed.schedule(random.Random(7), count=200))
    b = list(demo_feed.schedule(random.Random(7), count=200))
    c = list(demo_feed.schedule(random.Random(8), count=200))
    assert a == b and a != c
    assert sum(len(t.updates) for t in a) == 200  # the last tick is cut to the count
    assert all(1 <= len(t.updates) <= 5 for t in a)
    assert [t.at for t in a] == [2.0 * i for i in range(len(a))]
    updates = [u for t in a for u in t.updates]
    assert {s for s, _ in updates} == set(SUBJECTS)  # 200 draws reach every match
    assert {c for _, c in updates} == {"score_home", "score_away"}
    # every size from 1 to 5 occurs: "a random number of up to 5", never an empty tick
    assert {len(t.updates) for t in a[:-1]} == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("bounds", [{"rate": float("nan")}, {"rate": float("inf")},
                                    {"duration": float("nan")}])
def test_schedule_refuses_bounds_that_are_not_finite(bounds):
    with pytest.raises(ValueError):
        next(demo_feed.schedule(random.Random(1), **bounds))


def test_schedule_rate_and_duration():
    fast = list(demo_feed.schedule(random.Random(1), rate=4, duration=10))
    assert [t.at for t in fast] == [0.5 * i for i in range(20)]  # due before 10 s, one every 2/4 s
    slow = list(demo_feed.schedule(random.Random(1), rate=0.5, duration=10))
    assert [t.at for t in slow] == [0.0, 4.0, 8.0]
    both = list(demo_feed.schedule(random.Random(1), count=3, duration=100))
    assert sum(len(t.updates) for t in both) == 3
    with pytest.raises(ValueError):
        next(demo_feed.schedule(random.Random(1), rate=0))


async def test_run_publishes_the_schedule_and_counts_failures():
    expected = [u for t in demo_feed.schedule(random.Random(3), count=40) for u in t.updates]
    calls: list[tuple[str, str]] = []

    async def publish(subject: str, content: str) -> None:
        calls.append((subject, content))
        if len(calls) % 10 == 0:
            raise ConnectionError("down")

    stats = await demo_feed.run(publish, rng=random.Random(3), rate=1000, count=40)
    assert calls == expected
    assert (stats.published, stats.failed) == (36, 4)
    ok = Counter(u for i, u in enumerate(calls) if (i + 1) % 10)
    assert sum(sum(per.values()) for per in stats.totals.values()) == 36
    assert {(s, c): n for s, per in stats.totals.items() for c, n in per.items() if n} == dict(ok)


# --------------------------------------------------------------------------- over real sockets


async def _collect(client: Client, got: list[Message]) -> None:
    subs = [await client.subscribe(s) for s in SUBJECTS]

    async def drain(sub: Any) -> None:
        async for m in sub:
            got.append(m)

    await asyncio.gather(*(drain(s) for s in subs))


def _feed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "demo-feed", *args], capture_output=True,
                          text=True, timeout=60 * SCALE, cwd="/")  # cwd: the installed package, not the tree


async def test_demo_feed_through_a_gateway_reaches_a_subscriber(gateway_factory):
    gw = await gateway_factory()
    got: list[Message] = []
    async with Client([ws_url(gw)]) as sub:
        task = asyncio.create_task(_collect(sub, got))
        await wait_until(lambda: sum(1 for s in gw.sessions for _ in s.subjects) == 10, "10 subscriptions")
        proc = await asyncio.to_thread(_feed, "--url", ws_url(gw), "--count", "25", "--rate", "20",
                                       "--seed", "5")
        assert proc.returncode == 0, proc.stderr
        assert "25 updates published, 0 failed" in proc.stdout
        await wait_until(lambda: len(got) == 25, "the 25 updates at the subscriber")
        task.cancel()
    expected = Counter(u for t in demo_feed.schedule(random.Random(5), count=25) for u in t.updates)
    assert Counter((m.subject, m.content) for m in got) == expected
    for subject in SUBJECTS:  # each subject's seqs 1..n in order: nothing lost, nothing doubled
        seqs = [m.seq for m in got if m.subject == subject]
        assert seqs == list(range(1, len(seqs) + 1))


async def test_demo_feed_with_a_token_when_auth_is_on(gateway_factory):
    secret = "demo-feed-test-secret-0123456789abcdef"
    gw = await gateway_factory(jwt_secret=secret)
    tok = jwt.encode({"sub": "feed", "exp": int(time.time()) + 300, "pub_allow": ["/matches/>"],
                      "sub_allow": ["/matches/>"]}, secret, algorithm="HS256")
    refused = await asyncio.to_thread(_feed, "--url", ws_url(gw), "--count", "1")
    assert refused.returncode == 1 and "unauthorized" in refused.stderr
    assert "Traceback" not in refused.stderr
    got: list[Message] = []
    async with Client([ws_url(gw)], token=tok) as sub:
        task = asyncio.create_task(_collect(sub, got))
        await wait_until(lambda: sum(1 for s in gw.sessions for _ in s.subjects) == 10, "10 subscriptions")
        proc = await asyncio.to_thread(_feed, "--url", ws_url(gw), "--token", tok, "--count", "3", "--rate", "50")
        assert proc.returncode == 0, proc.stderr
        await wait_until(lambda: len(got) == 3, "the 3 updates at the subscriber")
        task.cancel()
    assert {m.content for m in got} <= {"score_home", "score_away"}


async def test_demo_feed_without_bounds_runs_until_interrupted(gateway_factory):
    gw = await gateway_factory()
    got: list[Message] = []
    async with Client([ws_url(gw)]) as sub:
        task = asyncio.create_task(_collect(sub, got))
        await wait_until(lambda: sum(1 for s in gw.sessions for _ in s.subjects) == 10, "10 subscriptions")
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo-feed", "--url", ws_url(gw), "--rate", "20"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        try:
            await wait_until(lambda: len(got) >= 10, "updates from the endless feed")
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.to_thread(proc.communicate, timeout=10 * SCALE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err
        m = re.search(r"demo feed: (\d+) updates published, 0 failed", out)
        assert m and int(m.group(1)) >= 10, out
        # a sentinel stored after everything the feed stored reaches the subscriber after all of it
        await sub.publish(SUBJECTS[0], "sentinel")
        await wait_until(lambda: any(x.content == "sentinel" for x in got), "the sentinel")
        task.cancel()
    feed = [x for x in got if x.content != "sentinel"]
    # every acknowledged update arrived; at most the tick cut short by the interrupt (stored, not
    # acknowledged) on top
    assert int(m.group(1)) <= len(feed) <= int(m.group(1)) + demo_feed.MAX_PER_TICK


@pytest.mark.parametrize("argv", [
    ["--count", "1"],                                   # neither --url nor --kafka
    ["--url", "ws://127.0.0.1:1/ws", "--kafka", "127.0.0.1:1"],
    ["--url", "ws://127.0.0.1:1/ws", "--rate", "0"],
    ["--url", "ws://127.0.0.1:1/ws", "--count", "-3"],
    ["--kafka", "127.0.0.1:1", "--token", "x"],
    # not numbers the bounds hold to: a tick due at NaN is never waited for (publishes without pause) and a
    # NaN duration never ends
    ["--url", "ws://127.0.0.1:1/ws", "--rate", "nan"],
    ["--url", "ws://127.0.0.1:1/ws", "--rate", "inf"],
    ["--url", "ws://127.0.0.1:1/ws", "--duration", "nan"],
    ["--url", "ws://127.0.0.1:1/ws", "--duration", "inf"],
])
def test_demo_feed_bad_arguments_exit_2_with_one_line(argv, capsys):
    from gateway import cli

    try:
        code = cli.main(["demo-feed", *argv])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err


async def test_serve_demo_publishes_by_itself():
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", "0", "--demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        line = await asyncio.to_thread(proc.stdout.readline)  # type: ignore[union-attr]
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m and "demo feed on" in line, line
        got: list[Message] = []
        async with Client([f"ws://127.0.0.1:{m.group(1)}/ws"]) as sub:
            task = asyncio.create_task(_collect(sub, got))
            # two ticks' worth at least (a tick every 2 s, 1 to 5 updates each)
            await wait_until(lambda: len({(x.subject, x.seq) for x in got if not x.snapshot}) >= 6,
                             "score updates from the gateway's own feed", timeout=20 * SCALE)
            task.cancel()
        assert {x.subject for x in got} <= set(SUBJECTS)
        assert {x.content for x in got} <= {"score_home", "score_away"}
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 5 * SCALE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.mark.kafka
async def test_demo_feed_into_kafka_keys_and_partitions(kafka_broker):
    """Records in topic `matches`, key `football/N`, in the partition Kafka's default partitioner
    (murmur2) gives the key, read back with a plain consumer. The topic name is the demo's own, so the
    test reads only what lies after the end offsets it saw before running the feed."""
    await kafka_broker.create_topic("matches", 3)
    consumer = kafka_broker.consumer()
    await consumer.start()
    try:
        partitions = sorted(consumer.partitions_for_topic("matches") or [])
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = sorted(consumer.partitions_for_topic("matches") or [])
        tps = [TopicPartition("matches", p) for p in partitions]
        start = await consumer.end_offsets(tps)
        proc = await asyncio.to_thread(_feed, "--kafka", kafka_broker.bootstrap, "--count", "30",
                                       "--rate", "20", "--seed", "11")
        assert proc.returncode == 0, proc.stderr
        assert "30 updates published, 0 failed" in proc.stdout
        records = await read_after(consumer, start, 30)
    finally:
        await consumer.stop()
    assert len(records) == 30
    for r in records:
        assert r.key is not None and re.fullmatch(rb"football/([1-9]|10)", r.key), r.key
        assert r.value in (b"score_home", b"score_away")
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % len(partitions)
    expected = Counter((s.removeprefix("/matches/").encode(), c.encode())
                       for t in demo_feed.schedule(random.Random(11), count=30) for s, c in t.updates)
    assert Counter((r.key, r.value) for r in records) == expected
