"""/metrics: Prometheus text format via prometheus-client.

Hot-path counters are plain integers on the objects that own them (fanout's Writer, the Hub, the
gateway's Stats); a custom collector reads them at scrape time, so a delivery costs no metric call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from .protocol import CloseCode

#: the close codes counted by their own label value: the ones the gateway sends itself. A client's close
#: frame (any of 1000-1014 and 3000-4999) is counted apart, in gateway_client_closes_total, and under
#: OTHER_CLOSE unless it is one of these: a label value per code would be about 2000 series any client
#: could create.
COUNTED_CLOSES = frozenset(int(c) for c in CloseCode)
OTHER_CLOSE = 0

if TYPE_CHECKING:
    from .server import Gateway

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Stats:
    """Counters of the gateway's own events."""

    __slots__ = ("connections_total", "publishes", "errors", "closes", "client_closes", "http_requests",
                 "http_rejected")

    def __init__(self) -> None:
        self.connections_total = 0
        self.publishes = 0
        self.errors: Counter[str] = Counter()
        self.closes: Counter[int] = Counter()          # closes the gateway started, by code
        self.client_closes: Counter[int] = Counter()   # closes a client started, by code (OTHER_CLOSE: not ours)
        self.http_requests: Counter[str] = Counter()   # plain HTTP requests by route ("other" for the rest)
        self.http_rejected: Counter[int] = Counter()   # requests refused (bad upgrade, bad HTTP) by status

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def count_close(self, code: int, *, by_client: bool = False) -> None:
        """A close the gateway started, or (`by_client`) one a client started, which it echoes: a client
        closing with 4000 is no slow consumer."""
        (self.client_closes if by_client else self.closes)[code if code in COUNTED_CLOSES else OTHER_CLOSE] += 1

    def count_http_error(self, status: int) -> None:
        self.http_rejected[status] += 1


class GatewayCollector(Collector):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily
                                  | InfoMetricFamily]:
        from .server import FANOUT_KIND  # server imports this module

        gw = self.gw
        s, hub, w = gw.stats, gw.hub.stats, gw.writer

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"gateway_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"gateway_{name}", doc, value=value)

        yield gauge("connections", "Open WebSocket connections", len(gw.sessions))
        yield counter("connections", "WebSocket connections accepted", s.connections_total)
        yield gauge("subscriptions", "Active subscriptions over all connections",
                    sum(x.subscription_count for x in gw.sessions))
        yield gauge("subjects", "Subjects the hub holds state for", len(gw.hub))
        yield gauge("history_bytes", "Estimated bytes of subject state held (recovery history, per-subject "
                    "overhead); kept under --history-total-bytes", gw.hub.bytes)
        yield gauge("history_budget_bytes", "--history-total-bytes", gw.hub.total_bytes)
        yield counter("subjects_forgotten", "Subjects nobody watched, forgotten under the memory budget",
                      hub.forgotten)
        yield counter("history_trimmed", "Messages dropped from watched subjects' history under the memory budget",
                      hub.trimmed)
        yield counter("messages_in", "Publishes accepted from clients", s.publishes)
        yield counter("messages", "Sequenced messages taken from the engine", hub.records)
        yield counter("messages_out", "msg frames queued to subscribers (fan-out deliveries)", hub.deliveries)
        yield counter("duplicate_records", "Records dropped as already held (re-reads)", hub.duplicates)
        yield counter("frames_out", "WebSocket frames written", w.frames_out)
        yield counter("bytes_out", "Bytes written to client sockets", w.bytes_out)
        yield counter("write_syscalls", "send/writev calls made by the fan-out writer", w.syscalls)
        yield counter("write_flushes_held", "Flushes held back by --coalesce-us after a big flush", w.held_flushes)
        yield gauge("write_busy_share", "--coalesce-us: CPU share of the event loop's thread over the last 0.5 s "
                    "period measured (at the end of a flush)", w.busy_share)
        yield counter("write_busy_probes", "--coalesce-us: 0.5 s periods run without holds while busy, to measure "
                      "the load unheld", w.probes)
        yield counter("slow_consumers", "Connections closed with 4000 (output over the limit)", w.overflows)
        errors = CounterMetricFamily("gateway_errors", "error frames sent, by code", labels=["code"])
        for code, n in sorted(s.errors.items()):
            errors.add_metric([code], n)
        yield errors
        for name, doc, counts in (("gateway_closes", "Connections closed by the gateway, by close code", s.closes),
                                  ("gateway_client_closes", "Connections closed by the client (its close frame "
                                   "echoed), by its close code; other: none of the gateway's codes",
                                   s.client_closes)):
            closes = CounterMetricFamily(name, doc, labels=["code"])
            for close_code, n in sorted(counts.items()):
                closes.add_metric(["other" if close_code == OTHER_CLOSE else str(close_code)], n)
            yield closes
        http_requests = CounterMetricFamily("gateway_http_requests", "Plain HTTP requests, by route", labels=["route"])
        for route, n in sorted(s.http_requests.items()):
            http_requests.add_metric([route], n)
        yield http_requests
        rejected = CounterMetricFamily("gateway_http_rejected", "HTTP requests refused (bad request, bad upgrade), "
                                       "by status", labels=["status"])
        for status, n in sorted(s.http_rejected.items()):
            rejected.add_metric([str(status)], n)
        yield rejected
        yield counter("write_errors", "Connections dropped on a hard write error (EPIPE, ECONNRESET, ...)",
                      w.write_errors)
        adm = gw.admission
        yield gauge("open_connections", "Open TCP connections (WebSocket sessions and HTTP requests)", adm.open)
        yield gauge("max_connections", "--max-connections in effect (default: file limit minus a reserve)",
                    adm.max_connections)
        yield gauge("file_limit", "The process's file descriptor limit (RLIMIT_NOFILE)", adm.fd_limit)
        hits = CounterMetricFamily("gateway_limit_hits", "Refusals by resource limit (docs/SECURITY.md): "
                                   "max_connections, max_connections_per_address, file_limit, origin, "
                                   "handshake_timeout, max_subscriptions, publish_rate, max_fragments, "
                                   "max_queued_pongs", labels=["limit"])
        limit_hits = dict(adm.hits)
        limit_hits["max_fragments"] = w.fragment_limit_hits
        limit_hits["max_queued_pongs"] = w.pongs_dropped
        for limit, n in sorted(limit_hits.items()):
            hits.add_metric([limit], n)
        yield hits
        yield gauge("ready", "1 once the engine is ready (healthz 200)", 1.0 if gw.engine.ready else 0.0)
        yield InfoMetricFamily("gateway_build", "Version and fan-out implementation of this gateway",
                               value={"version": __version__, "fanout": FANOUT_KIND})
        yield gauge("fanout_compiled", "1: the compiled fanout modules run; 0: the pure-Python twins "
                    "(FANOUT_NO_EXTENSIONS=1)", 1.0 if FANOUT_KIND == "compiled" else 0.0)
        engine = GaugeMetricFamily("gateway_engine", "Engine counters", labels=["engine", "name"])
        for name, value in sorted(gw.engine.stats().items()):
            engine.add_metric([gw.config.engine, name], float(value))
        yield engine
        yield from engine_metrics(gw)


def engine_metrics(gw: Gateway) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
    """The engine's connection, per-partition progress and publish latency (Kafka; empty or constant
    for the standalone engine)."""
    eng = gw.engine
    yield GaugeMetricFamily("gateway_engine_connected", "1 while the engine reaches its storage (Kafka: the "
                            "last metadata fetch succeeded), 0 during an outage", value=1.0 if eng.connected else 0.0)
    parts = eng.partition_stats()
    lag = GaugeMetricFamily("gateway_partition_lag", "Records behind the partition's end (the high watermark "
                            "of the last fetch minus the next offset to read)", labels=["topic", "partition"])
    read = CounterMetricFamily("gateway_partition_records", "Records read from the partition (restarts at 0 "
                               "when the topic is recreated)", labels=["topic", "partition"])
    for topic, partition, behind, consumed in parts:
        if behind is not None:
            lag.add_metric([topic, str(partition)], float(behind))
        read.add_metric([topic, str(partition)], float(consumed))
    yield lag
    yield read
    latency = eng.produce_latency()
    if latency is not None:
        bounds, counts, total = latency
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip([*map(str, bounds), "+Inf"], counts):
            running += n
            buckets.append((bound, float(running)))
        yield HistogramMetricFamily("gateway_publish_latency_seconds", "Publish to acknowledgement from the "
                                    "engine (Kafka: acks=all), successful publishes only",
                                    buckets=buckets, sum_value=total)


def make_renderer(gw: Gateway) -> Callable[[], bytes]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw))
    # python_gc_collections_total{generation} etc. from gc.get_stats() at scrape time (free on the hot
    # path): full collections (generation 2) walk every connection's objects, so a rising count is
    # the first thing to look at when CPU per delivery grows with the number of connections.
    GCCollector(registry)

    def render() -> bytes:
        return generate_latest(registry)

    return render
