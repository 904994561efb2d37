"""--coalesce-us over real sockets: a gateway that holds its flushes still delivers every message to
every subscriber, in order, exactly once (the fake-clock unit tests are in test_fanout_writer.py)."""

from __future__ import annotations

import asyncio

import pytest

from conftest import ws_url
from gateway.cli import build_parser
from gateway.config import FIELDS, ConfigError
from gateway.config import load as load_config
from support.metrics import metric
from support.ws import WAIT, connected, recv_until, send

pytestmark = pytest.mark.both_loops

SUBSCRIBERS = 8
MESSAGES = 300


async def test_coalesced_flushes_keep_order_and_completeness(gateway_factory):
    # Every flush that wrote to >= 2 connections holds the next one 20 ms (far above uvloop's 1 ms
    # timer resolution), so the publishes below pile up and leave in shared writes. Busy or not: the
    # busy gate (--coalesce-busy-pct) is off here; its unit tests are in test_fanout_writer.py.
    gw = await gateway_factory(coalesce_us=20_000, coalesce_min_conns=2, coalesce_busy_pct=0)
    subs = [await connected(ws_url(gw)) for _ in range(SUBSCRIBERS)]
    for ws in subs:
        await send(ws, {"op": "subscribe", "subjects": [{"subject": "/c/x"}]})
        assert (await recv_until(ws, "subscribed"))["seq"] == 0
    pub = await connected(ws_url(gw))
    for i in range(1, MESSAGES + 1):
        await send(pub, {"op": "publish", "subject": "/c/x", "content": f"m{i}", "id": i})
        if i % 10 == 0:
            await asyncio.sleep(0)
    acks = [(await recv_until(pub, "ack"))["id"] for _ in range(MESSAGES)]
    assert acks == list(range(1, MESSAGES + 1))

    async def read_all(ws) -> list[tuple[int, int, str]]:
        got = []
        while len(got) < MESSAGES:
            m = await recv_until(ws, "msg")
            got.append((m["seq"], m["prev"], m["content"]))
        return got

    want = [(i, i - 1, f"m{i}") for i in range(1, MESSAGES + 1)]
    for got in await asyncio.gather(*(read_all(ws) for ws in subs)):
        assert got == want
    assert gw.writer.held_flushes > 0
    held = await asyncio.to_thread(metric, gw.port, "gateway_write_flushes_held_total")
    assert held >= gw.writer.held_flushes > 0
    # Sentinel: nothing beyond the messages published follows (no duplicate from a held flush).
    await send(pub, {"op": "publish", "subject": "/c/x", "content": "end", "id": "end"})
    for ws in subs:
        m = await recv_until(ws, "msg")
        assert (m["seq"], m["content"]) == (MESSAGES + 1, "end")
    for ws in [*subs, pub]:
        await ws.close()


async def test_the_busy_gate_opens_and_probes_on_the_loop_threads_real_cpu_time(gateway_factory):
    # --coalesce-busy-pct 1: two 0.5 s periods in which this process's loop thread (gateway and test
    # clients alike) used 1 % of a CPU open the gate; every probe finds the same and keeps it. This
    # checks the real clocks (CLOCK_MONOTONIC, CLOCK_THREAD_CPUTIME_ID) and the metrics; the gate's
    # thresholds and transitions are unit-tested with fake clocks in test_fanout_writer.py.
    # --publish-rate 0: the publisher below goes as fast as the subscribers read (no rate_limited).
    gw = await gateway_factory(coalesce_us=20_000, coalesce_min_conns=2, coalesce_busy_pct=1, publish_rate=0)
    subs = [await connected(ws_url(gw)) for _ in range(SUBSCRIBERS)]
    for ws in subs:
        await send(ws, {"op": "subscribe", "subjects": [{"subject": "/c/busy"}]})
        assert (await recv_until(ws, "subscribed"))["seq"] == 0
    pub = await connected(ws_url(gw))
    published = 0
    last = {id(ws): 0 for ws in subs}
    deadline = asyncio.get_running_loop().time() + 3 * WAIT  # the gate opens after 1 s, probes after 4 s
    # Publish, and read every subscriber up to the last message, until a probe has run and holds
    # followed it (bounded in count and time).
    while gw.writer.probes < 1 or gw.writer.held_flushes < 5:
        assert published < 20_000 and asyncio.get_running_loop().time() < deadline, (
            published, gw.writer.busy_share, gw.writer.probes, gw.writer.held_flushes)
        for _ in range(20):
            published += 1
            await send(pub, {"op": "publish", "subject": "/c/busy", "content": f"m{published}"})
        for ws in subs:
            while last[id(ws)] < published:
                m = await recv_until(ws, "msg")
                assert (m["seq"], m["prev"]) == (last[id(ws)] + 1, last[id(ws)])
                last[id(ws)] = m["seq"]
    assert 0.01 <= gw.writer.busy_share <= 1.0
    held = await asyncio.to_thread(metric, gw.port, "gateway_write_flushes_held_total")
    probes = await asyncio.to_thread(metric, gw.port, "gateway_write_busy_probes_total")
    share = await asyncio.to_thread(metric, gw.port, "gateway_write_busy_share")
    assert held >= 5 and probes >= 1 and 0.01 <= share <= 1.0
    # In order and complete through the holds and the probe: a sentinel is the very next seq.
    await send(pub, {"op": "publish", "subject": "/c/busy", "content": "end"})
    for ws in subs:
        m = await recv_until(ws, "msg")
        assert (m["seq"], m["prev"], m["content"]) == (published + 1, published, "end")
    for ws in [*subs, pub]:
        await ws.close()


def load(argv: list[str], env: dict[str, str]):
    args = build_parser().parse_args(["serve", *argv])
    return load_config({k: v for k, v in vars(args).items() if k in FIELDS}, env=env)


def test_coalesce_settings_parse_and_reject_bad_values():
    config = load(["--coalesce-us", "500", "--coalesce-min-conns", "200", "--coalesce-busy-pct", "30"], env={})
    assert (config.coalesce_us, config.coalesce_min_conns, config.coalesce_busy_pct) == (500, 200, 30)
    defaults = load([], env={})
    assert (defaults.coalesce_us, defaults.coalesce_min_conns, defaults.coalesce_busy_pct) == (0, 1000, 85)
    assert load([], env={"GATEWAY_COALESCE_US": "250"}).coalesce_us == 250
    with pytest.raises(ConfigError, match="coalesce"):
        load(["--coalesce-us", "-1"], env={})
    with pytest.raises(ConfigError, match="coalesce"):
        load(["--coalesce-min-conns", "0"], env={})
    for bad in ("-1", "101"):
        with pytest.raises(ConfigError, match="coalesce-busy-pct"):
            load(["--coalesce-busy-pct", bad], env={})
