#!/usr/bin/env python3
"""The Kafka engine's defaults by measurement: fetch long-poll wait and producer linger (issue 11, item 4).

    python benchmarks/kafka_defaults.py [--fetch-wait 5,100,500] [--linger 0,5] [--idle-s 10]
        [--light 600@100] [--load 6000@2000]

One Apache Kafka cluster (the tests' 3 nodes, replication factor 3, min.insync.replicas=2; or
KAFKA_BOOTSTRAP with KAFKA_BENCH_BROKER_PIDS), then for every (fetch wait, linger) pair one fresh
`gateway serve --kafka ...` subprocess (flags --kafka-fetch-wait-ms/--kafka-linger-ms), measured:

- idle: the gateway reads its partitions and nothing is produced, `--idle-s` seconds: CPU share of the
  broker JVMs (from /proc) and of the gateway: the price of the fetch long-poll;
- light and loaded: one WebSocket connection publishes N messages at R/s (with ids, a timestamp in the
  payload) to 10 subjects, another is subscribed: publish -> msg and publish -> ack p50/p99, with the
  broker and gateway CPU share meanwhile.

Configurations are measured one after the other on a shared machine: every row also reports the CPU
that other processes used meanwhile (cores), so a row measured under foreign load can be told apart.
Results: a table on stdout and benchmarks/results/kafka_defaults.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kafka_latency as kl  # noqa: E402

RESULTS_JSON = os.path.join(HERE, "results", "kafka_defaults.json")


def _pair(text: str) -> tuple[int, float]:
    n, _, rate = text.partition("@")
    return int(n), float(rate)


async def measure(broker: Any, fetch_wait: int, linger: int, args: argparse.Namespace) -> dict[str, Any]:
    run_id = os.urandom(3).hex()
    topic = f"bench-defaults-{run_id}"
    await broker.create_topic(topic, 1)
    idem = "on" if broker.idempotence else "off"
    gw = kl.GatewayProcess(broker.bootstrap, [topic], idem, "--heartbeat-ms", "60000", "--publish-rate", "0",
                           "--kafka-fetch-wait-ms", str(fetch_wait), "--kafka-linger-ms", str(linger))
    try:
        await gw.healthy()
        await asyncio.sleep(2.0)   # connections settle (metadata, first fetches)
        out: dict[str, Any] = {"fetch_wait_ms": fetch_wait, "linger_ms": linger}
        out["idle"] = await kl.idle_broker_cpu(broker, gw, args.idle_s)
        for name, (n, rate) in (("light", _pair(args.light)), ("load", _pair(args.load))):
            meter = kl.CpuMeter(gw.proc.pid, kl.broker_pids(broker))
            lat = await kl.latency_gateway(gw, topic, n, rate)
            cpu = meter.stop()
            lat["broker_cores"] = cpu["broker_cpu_s"] / cpu["wall_s"]
            lat["gateway_cores"] = cpu["gateway_cpu_s"] / cpu["wall_s"]
            lat["foreign_cores"] = cpu["foreign_cores"]
            out[name] = lat
        return out
    finally:
        gw.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    broker = kl.external_broker() or kl.start_apache_kafka()
    if broker.external and broker.cluster is None:
        broker.replication = min(3, len(broker.bootstrap.split(",")))
    rows = []
    try:
        for fetch_wait in (int(x) for x in args.fetch_wait.split(",")):
            for linger in (int(x) for x in args.linger.split(",")):
                print(f"fetch wait {fetch_wait} ms, linger {linger} ms ...", flush=True)
                rows.append(await measure(broker, fetch_wait, linger, args))
        return {"config": {"idle_s": args.idle_s, "light": args.light, "load": args.load,
                           "replication": broker.replication, "cpus": os.cpu_count(),
                           "loadavg_at_start": os.getloadavg()}, "rows": rows}
    finally:
        broker.stop()


def table(r: dict[str, Any]) -> str:
    head = (f"{'fetch wait':>10}{'linger':>7} | {'idle broker':>11}{'idle gw':>8}{'foreign':>8} | "
            f"{'light msg p50/p99':>18}{'ack p50':>8}{'broker':>7}{'foreign':>8} | "
            f"{'load msg p50/p99':>17}{'ack p50':>8}{'broker':>7}{'gw':>6}{'foreign':>8}{'rate':>6}")
    lines = [head, "-" * len(head)]
    for row in r["rows"]:
        i, lt, ld = row["idle"], row["light"], row["load"]
        lines.append(
            f"{row['fetch_wait_ms']:>10}{row['linger_ms']:>7} | {100 * i['broker_cores']:>10.1f}%"
            f"{100 * i['gateway_cores']:>7.1f}%{i['foreign_cores']:>8.2f} | "
            f"{lt['deliver']['p50']:>8.1f}/{lt['deliver']['p99']:<9.1f}{lt['ack']['p50']:>8.1f}"
            f"{100 * lt['broker_cores']:>6.0f}%{lt['foreign_cores']:>8.2f} | "
            f"{ld['deliver']['p50']:>7.1f}/{ld['deliver']['p99']:<9.1f}{ld['ack']['p50']:>8.1f}"
            f"{100 * ld['broker_cores']:>6.0f}%{100 * ld['gateway_cores']:>5.0f}%{ld['foreign_cores']:>8.2f}"
            f"{ld['achieved_rate']:>6.0f}")
    lines.append("CPU in % of one core (broker: the 3 JVMs together); foreign: cores used by other processes "
                 "meanwhile; latencies in ms; rate: publishes/s achieved under load")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch-wait", default="5,100,500", help="values of --kafka-fetch-wait-ms")
    parser.add_argument("--linger", default="0,5", help="values of --kafka-linger-ms")
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--light", default="600@100", help="N@R: N publishes at R per second")
    parser.add_argument("--load", default="6000@2000", help="N@R: N publishes at R per second")
    parser.add_argument("--json", default=RESULTS_JSON)
    args = parser.parse_args()
    return kl.run_and_write(run, table, args)


if __name__ == "__main__":
    sys.exit(main())
