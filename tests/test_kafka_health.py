"""Health and observability of the Kafka engine (issue 11 item 6), against the real broker.

/healthz: 503 `starting` until caught up, 200 `degraded` with the reason during an outage (503
`unavailable` only with --healthz-unreachable-ms), 200 `ok` again once Kafka is back; a deleted topic
is warned about and reported; a recreated topic counts one epoch change and only its current partitions.
/metrics: engine connection state, per-partition lag and records read, publish latency histogram.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import SCALE, ws_url
from gateway.engines.base import Engine
from gateway.engines.kafka import partition_for_key
from support.kafka_broker import KafkaBroker
from support.waits import wait_until  # noqa: E402
from support.ws import connected, recv_until, send

WAIT = 10.0 * SCALE


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def healthz(gw: Any) -> tuple[int, dict[str, Any]]:
    status, body = await http_get(gw.port, "/healthz")
    return status, json.loads(body)


async def metrics(gw: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, body = await http_get(gw.port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def part(topic: str, partition: int) -> tuple[tuple[str, str], ...]:
    return (("partition", str(partition)), ("topic", topic))


async def poll(make: Callable[[], Any], pred: Callable[[Any], bool], what: str) -> Any:
    """Ask (async) until the answer satisfies pred; that answer."""
    last: list[Any] = [None]

    async def ok() -> bool:
        last[0] = await make()
        return pred(last[0])

    try:
        await wait_until(ok, what, interval=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: last {last[0]!r}") from None
    return last[0]


async def start_gateway(gateway_factory: Any, broker: KafkaBroker, bootstrap: str, topics: list[str],
                        **settings: Any) -> Any:
    gw = await gateway_factory(kafka=bootstrap, topics=tuple(topics),
                               kafka_idempotence="on" if broker.idempotence else "off",
                               kafka_metadata_refresh_ms=200, **settings)
    await wait_until(lambda: gw.engine.ready, "the Kafka engine caught up")
    return gw


async def test_healthz_and_metrics_through_an_outage(kafka_broker: KafkaBroker, topic: Callable[[str], str],
                                                     gateway_factory: Any) -> None:
    if kafka_broker.external:
        pytest.skip("needs brokers that advertise the proxies (started here)")
    t = topic()
    gws: list[Any] = []
    async with kafka_broker.behind_proxy() as net:
        try:
            await net.broker.create_topic(t, 2)
            gw = await start_gateway(gateway_factory, net.broker, net.bootstrap, [t])
            strict = await start_gateway(gateway_factory, net.broker, net.bootstrap, [t], healthz_unreachable_ms=300)
            gws += [gw, strict]
            for g in gws:
                status, body = await healthz(g)
                assert (status, body["status"], body["lag"]) == (200, "ok", 0), body
                assert "reason" not in body

            pub = await connected(ws_url(gw))
            keys = [f"k{i}" for i in range(6)]
            for i, k in enumerate(keys):
                await send(pub, {"op": "publish", "subject": f"/{t}/{k}", "content": "x", "id": i})
            assert sorted([(await recv_until(pub, "ack"))["id"] for _ in keys]) == list(range(len(keys)))
            per_part = [sum(1 for k in keys if partition_for_key(k.encode(), 2) == p) for p in (0, 1)]
            # caught up: every record read on both gateways, lag 0 from the fetch high watermark
            for g in gws:
                m = await poll(lambda g=g: metrics(g), lambda m: all(
                    m.get(("gateway_partition_records_total", part(t, p))) == per_part[p] for p in (0, 1)),
                    "every record read")
                assert m[("gateway_engine_connected", ())] == 1
                assert all(m[("gateway_partition_lag", part(t, p))] == 0 for p in (0, 1))
            m = await metrics(gw)
            assert m[("gateway_publish_latency_seconds_count", ())] == len(keys)
            assert m[("gateway_publish_latency_seconds_bucket", (("le", "+Inf"),))] == len(keys)
            assert 0 < m[("gateway_publish_latency_seconds_sum", ())] < len(keys) * 5.0   # under publish timeout
            assert (await metrics(strict))[("gateway_publish_latency_seconds_count", ())] == 0

            net.cut()
            status, body = await poll(lambda: healthz(gw), lambda r: r[1]["status"] == "degraded", "degraded")
            assert status == 200 and "Kafka unreachable" in body["reason"]
            assert body["unreachable_since"].endswith("Z") and body["unreachable_s"] >= 0
            assert (await metrics(gw))[("gateway_engine_connected", ())] == 0
            # with --healthz-unreachable-ms the same outage takes this gateway out of the balancer
            status, body = await poll(lambda: healthz(strict), lambda r: r[0] == 503, "503 after the grace")
            assert body["status"] == "unavailable" and "Kafka unreachable" in body["reason"]
            status, body = await healthz(gw)   # the default never answers 503 for an outage
            assert (status, body["status"]) == (200, "degraded")

            net.restore()
            for g in gws:
                status, body = await poll(lambda g=g: healthz(g), lambda r: r[1]["status"] == "ok", "ok again")
                assert status == 200 and "reason" not in body and "unreachable_since" not in body
                assert (await metrics(g))[("gateway_engine_connected", ())] == 1
            await pub.close()
        finally:
            for g in gws:
                await g.stop()   # before the proxies go


async def test_deleted_and_recreated_topic(kafka_broker: KafkaBroker, topic: Callable[[str], str],
                                           gateway_factory: Any, caplog: pytest.LogCaptureFixture) -> None:

    caplog.set_level(logging.INFO, logger="gateway.engines.kafka")
    t = topic()
    await kafka_broker.create_topic(t, 3)
    gw = await start_gateway(gateway_factory, kafka_broker, kafka_broker.bootstrap, [t])
    stats = gw.engine.stats
    assert (stats()["partitions_assigned"], stats()["epoch_changes"]) == (3, 0)
    pub = await connected(ws_url(gw))
    await send(pub, {"op": "publish", "subject": f"/{t}/a", "content": "old", "id": 1})
    old_epoch = (await recv_until(pub, "ack"))["epoch"]
    await wait_until(lambda: sum(n for *_, n in gw.engine.partition_stats()) == 1, "the record read back")

    await kafka_broker.delete_topic(t)
    status, body = await poll(lambda: healthz(gw), lambda r: r[1]["status"] == "degraded", "topic missing")
    assert status == 200 and body["reason"] == f"topic missing: {t}" and list(body["topics_missing"]) == [t]
    gone = [r for r in caplog.records if r.levelno == logging.WARNING and f"topic {t} is gone" in r.getMessage()]
    assert len(gone) == 1
    assert stats()["partitions_assigned"] == 0 and stats()["topics_missing"] == 1
    assert not [p for p in gw.engine.partition_stats() if p[0] == t]

    await kafka_broker.create_topic(t, 2)
    await poll(lambda: healthz(gw), lambda r: r[1]["status"] == "ok", "ok once the topic is back")
    await wait_until(lambda: stats()["partitions_assigned"] == 2, "the recreated topic's partitions")
    assert stats()["epoch_changes"] == 1 and stats()["topics_missing"] == 0
    m = await metrics(gw)
    assert {dict(labels)["partition"] for (name, labels) in m
            if name == "gateway_partition_records_total" and dict(labels).get("topic") == t} == {"0", "1"}
    await send(pub, {"op": "publish", "subject": f"/{t}/a", "content": "new", "id": 2})
    ack = await recv_until(pub, "ack")
    assert ack["epoch"] != old_epoch
    # the warning about the deleted topic was logged once, however many refreshes saw it gone
    assert len([r for r in caplog.records if f"topic {t} is gone" in r.getMessage()]) == 1
    await pub.close()


class _Starting(Engine):
    """A fake engine that never catches up, for the /healthz answer while starting."""

    ready = False  # type: ignore[assignment]

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def check_subject(self, subject: Any) -> None: ...
    def epoch(self, subject: Any) -> str: return "e"
    async def publish(self, subject: Any, content: bytes) -> tuple[str, int]: raise NotImplementedError

    def health(self) -> dict[str, Any]:
        return {"status": "starting", "reason": "catching up", "lag": 7}


async def test_healthz_is_503_while_starting(gateway_factory: Any) -> None:
    gw = await gateway_factory(engine=_Starting())
    status, body = await healthz(gw)
    assert status == 503 and (body["status"], body["reason"], body["lag"]) == ("starting", "catching up", 7)
