#!/usr/bin/env python3
"""The gateway in Kafka mode: publish-to-deliver latency and consume-to-deliver throughput.

One command, bounded (about 2 minutes on 2 cores with the cluster's start; --quick about 1 minute):

    python benchmarks/kafka_latency.py [--quick] [--records 200000] [--messages 3000] [--rate 500]
        [--broker kafka|tansu] [--rounds 3] [--profile out.svg] [-- extra gateway flags]

It starts a broker (by default the 3-node Apache Kafka cluster of the tests, topics with replication
factor 3; `--broker tansu` for Tansu; KAFKA_BOOTSTRAP names a running cluster instead, with
KAFKA_BENCH_BROKER_PIDS its JVMs' pids for the broker CPU figures) and one `python -m gateway serve
--kafka ...` subprocess on 127.0.0.1 with the gateway's default Kafka settings plus any flags after
`--` (on Tansu, whose fetch does not wake on new data, --kafka-fetch-wait-ms 5 unless given), then:

1. latency: one WebSocket connection publishes (with `id`) at a moderate fixed rate, a timestamp in
   the payload, to 10 subjects; another connection is subscribed to them. Reported: publish -> ack
   (Kafka acks=all) and publish -> msg, p50/p90/p99/max. Baseline in the same run: the same rate and
   payloads from a plain aiokafka producer to a plain aiokafka consumer (the gateway's fetch wait and
   linger), i.e. what Kafka itself costs; the gateway's share is the difference.
2. throughput: S subjects, C subscriber connections each subscribed to every subject (so every record
   goes out C times). The gateway is paused (SIGSTOP), N records are produced with aiokafka, the
   gateway is resumed (SIGCONT): it then reads the backlog from Kafka as fast as it can and pushes it
   to the sockets. Measured from the subscriber side (raw sockets that only count frames, in this
   process) from SIGCONT to the last frame, plus the gateway's CPU time over the same span from
   /proc/<pid>/stat: records/s per gateway CPU-second is the one-core figure. Baseline: a plain
   aiokafka consumer reading the same N records (no fan-out), records/s of its own CPU time.
   `--rounds` repeats the pair (gateway, then baseline, on a fresh backlog each time) and reports
   each round and the median ratio, with the machine's CPU time used by other processes meanwhile
   (the box is shared: a ratio from one round is worth little). `--profile FILE` records the gateway
   with py-spy during the first round (py-spy must be installed; `.svg` flame graph or `.txt` raw).

Results: a table on stdout and benchmarks/results/kafka_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "tests")]  # tests/support: the Tansu broker helpers (not the packages)

from aiokafka.structs import TopicPartition  # noqa: E402

from _procs import machine_busy_seconds, require_installed_package, schedstat_seconds, stop_process  # noqa: E402
from support.kafka_broker import (  # noqa: E402
    KafkaBroker,
    external_broker,
    start_apache_kafka,
    start_tansu,
)
from support.ports import free_port  # noqa: E402

RESULTS_JSON = os.path.join(HERE, "results", "kafka_latency.json")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- small utilities

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (psutil is not needed for this). Counted in clock ticks
    (10 ms): a short round may see 0; divide with per_cpu_second()."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def threads_cpu_seconds(pid: int) -> float:
    """CPU time of a process's live threads in ns resolution (/proc/<pid>/task/*/schedstat): a
    long-lived process like the gateway, where utime + stime's 10 ms ticks would round a short round
    to 0. Falls back to cpu_seconds() where schedstat is missing."""
    on_cpu = schedstat_seconds(pid, 0)
    return cpu_seconds(pid) if on_cpu is None else on_cpu


def per_cpu_second(count: float, cpu_s: float) -> float:
    """count / cpu_s, or NaN when the CPU time is under the clock's resolution (a few thousand records
    cost less than one 10 ms tick): no rate can be told from it, which is not a reason to crash."""
    return count / cpu_s if cpu_s > 0 else float("nan")


def broker_pids(broker: KafkaBroker) -> list[int]:
    """The broker processes whose CPU time is reported: the cluster's JVMs, Tansu, or KAFKA_BENCH_BROKER_PIDS."""
    if broker.cluster is not None:
        return [n.pid for n in broker.cluster.nodes if n.pid is not None]
    if broker.pid is not None:
        return [broker.pid]
    return [int(p) for p in os.environ.get("KAFKA_BENCH_BROKER_PIDS", "").split(",") if p.strip()]


class CpuMeter:
    """CPU seconds of the gateway, the brokers, this process and everything else on the machine over a span."""

    def __init__(self, gateway_pid: int, brokers: list[int]) -> None:
        self.gateway_pid, self.brokers = gateway_pid, brokers
        self._t0 = self._sample()

    def _sample(self) -> tuple[float, float, float, float, float]:
        return (time.perf_counter(), threads_cpu_seconds(self.gateway_pid), sum(cpu_seconds(p) for p in self.brokers),
                self_cpu(), machine_busy_seconds())

    def stop(self) -> dict[str, float]:
        t1 = self._sample()
        wall, gw, brokers, me, busy = (b - a for a, b in zip(self._t0, t1))
        return {"wall_s": wall, "gateway_cpu_s": gw, "broker_cpu_s": brokers, "bench_cpu_s": me,
                "foreign_cpu_s": max(0.0, busy - gw - brokers - me),
                "foreign_cores": max(0.0, busy - gw - brokers - me) / wall if wall > 0 else 0.0}


def self_cpu() -> float:
    return time.process_time()  # all of this process's threads, in ns (os.times() counts 10 ms ticks)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99),
            "max": max(ms) if ms else float("nan"), "mean": statistics.fmean(ms) if ms else float("nan")}


class GatewayProcess:
    def __init__(self, bootstrap: str, topics: list[str], idempotence: str, *extra: str) -> None:
        self.extra = list(extra)
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="gw-bench-", suffix=".log", delete=False)
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "gateway", "serve", "--kafka", bootstrap, "--topics", ",".join(topics),
             "--port", str(self.port), "--node-id", "bench", "--kafka-idempotence", idempotence,
             "--log-level", "warning", *extra],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"ws://127.0.0.1:{self.port}/ws"

    async def healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.tail()}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                line = await asyncio.wait_for(reader.readline(), 2)
                writer.close()
                if b" 200 " in line:
                    return
            except (TimeoutError, OSError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"gateway not healthy within {timeout} s: {self.tail()}")

    def tail(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)   # in case it is still paused
        stop_process(self.proc)
        self.log.close()
        os.unlink(self.log.name)


# ----------------------------------------------------------------------------- 1. latency

async def latency_gateway(gw: GatewayProcess, topic: str, messages: int, rate: float) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    subjects = [f"/{topic}/k{i}" for i in range(10)]
    opts: dict[str, Any] = {"max_size": None, "ping_interval": None, "compression": None}
    sub = await connect(gw.url, **opts)
    pub = await connect(gw.url, **opts)
    for ws in (sub, pub):
        await ws.send(json.dumps({"op": "connect", "client": "bench"}))
        assert json.loads(await ws.recv())["op"] == "connected"
    await sub.send(json.dumps({"op": "subscribe", "subjects": [{"subject": s} for s in subjects]}))
    subscribed = 0
    while subscribed < len(subjects):   # snapshots of earlier runs' messages may come in between
        f = json.loads(await sub.recv())
        assert f["op"] in ("subscribed", "msg"), f
        subscribed += f["op"] == "subscribed"

    sent: dict[int, float] = {}
    deliver: list[float] = []
    ack: list[float] = []
    errors: list[dict[str, Any]] = []

    async def read_sub() -> None:
        while len(deliver) + len(errors) < messages:   # a refused publish is never delivered
            f = json.loads(await sub.recv())
            if f["op"] == "msg" and not f.get("snapshot"):
                deliver.append(time.perf_counter() - json.loads(f["content"])["t"])

    async def read_pub() -> None:
        while len(ack) + len(errors) < messages:
            f = json.loads(await pub.recv())
            if f["op"] == "ack":
                ack.append(time.perf_counter() - sent[f["id"]])
            elif f["op"] == "error":
                errors.append(f)

    readers = [asyncio.create_task(read_sub()), asyncio.create_task(read_pub())]
    interval = 1.0 / rate
    start = time.perf_counter()
    for i in range(messages):
        due = start + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.perf_counter()
        sent[i] = now
        await pub.send(json.dumps({"op": "publish", "subject": subjects[i % 10], "id": i,
                                   "content": json.dumps({"t": now, "i": i, "pad": "x" * 40})}))
    try:
        await asyncio.wait_for(asyncio.gather(*readers), 30)
    except TimeoutError:
        raise TimeoutError(f"{len(deliver)} delivered, {len(ack)} acked, errors {errors[:3]} of {messages}") from None
    await sub.close()
    await pub.close()
    return {"deliver": summary_ms(deliver), "ack": summary_ms(ack), "errors": len(errors),
            "error_codes": sorted({e.get("code", "?") for e in errors}),
            "achieved_rate": messages / (time.perf_counter() - start)}


async def latency_kafka(broker: KafkaBroker, topic: str, messages: int, rate: float, fetch_wait_ms: int,
                        linger_ms: int) -> dict[str, Any]:
    """Baseline: aiokafka producer (acks=all) -> aiokafka consumer, with the gateway's fetch wait and linger."""
    producer = broker.producer(linger_ms=linger_ms)
    consumer = broker.consumer(fetch_max_wait_ms=fetch_wait_ms)
    await producer.start()
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    await consumer.seek_to_end(tp)
    await consumer.position(tp)
    deliver: list[float] = []
    ack: list[float] = []

    async def read() -> None:
        while len(deliver) < messages:
            batches = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batches.values():
                for r in records:
                    deliver.append(now - json.loads(r.value)["t"])

    async def one(i: int) -> None:
        now = time.perf_counter()
        fut = await producer.send(topic, json.dumps({"t": now, "i": i, "pad": "x" * 40}).encode(),
                                  key=b"k%d" % (i % 10), partition=0)
        await fut
        ack.append(time.perf_counter() - now)

    reader = asyncio.create_task(read())
    interval = 1.0 / rate
    start = time.perf_counter()
    pending = []
    for i in range(messages):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one(i)))
    await asyncio.gather(*pending)
    await asyncio.wait_for(reader, 30)
    await producer.stop()
    await consumer.stop()
    return {"deliver": summary_ms(deliver), "ack": summary_ms(ack)}


# ----------------------------------------------------------------------------- 2. throughput

def _text_frame(obj: Any) -> bytes:
    payload = json.dumps(obj).encode()
    n = len(payload)
    head = bytes([0x81])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload   # an all-zero mask leaves the payload as it is


class RawSubscriber:
    """A WebSocket client on a plain socket that subscribes and then only counts msg frames."""

    def __init__(self, port: int, subjects: list[str]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.buf = bytearray(rest)
        self.pos = 0
        self.msgs = 0
        self.other = 0
        self.closed = False
        self.sock.sendall(_text_frame({"op": "connect", "client": "bench"}))
        assert self._next_json()["op"] == "connected"
        self.sock.sendall(_text_frame({"op": "subscribe", "subjects": [{"subject": s} for s in subjects]}))
        for _ in subjects:
            f = self._next_json()
            assert f["op"] == "subscribed", f
        self.sock.setblocking(False)

    def _recv(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("gateway closed the connection")
        self.buf += data

    def _next_json(self) -> dict[str, Any]:
        while True:
            frame = self._frame()
            if frame is not None:
                return json.loads(frame)
            self._recv()

    def _frame(self) -> bytes | None:
        buf, i = self.buf, self.pos
        if len(buf) - i < 2:
            return None
        n = buf[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            if len(buf) - j < 2:
                return None
            n = int.from_bytes(buf[j:j + 2], "big")
            j += 2
        elif n == 127:
            if len(buf) - j < 8:
                return None
            n = int.from_bytes(buf[j:j + 8], "big")
            j += 8
        if len(buf) - j < n:
            return None
        self.pos = j + n
        return bytes(buf[j:j + n])

    def on_readable(self) -> None:
        """Read what is there and count whole frames (msg vs anything else, by the payload's start)."""
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            self.closed = True
            return
        buf = self.buf
        buf += data
        i, end = self.pos, len(buf)
        msgs = other = 0
        while end - i >= 2:
            op = buf[i] & 0x0F
            n = buf[i + 1] & 0x7F
            j = i + 2
            if n == 126:
                if end - j < 2:
                    break
                n = (buf[j] << 8) | buf[j + 1]
                j += 2
            elif n == 127:
                if end - j < 8:
                    break
                n = int.from_bytes(buf[j:j + 8], "big")
                j += 8
            if end - j < n:
                break
            if op == 1 and buf[j + 7:j + 10] == b"msg":   # {"op":"msg",...
                msgs += 1
            else:
                other += 1
            i = j + n
        del buf[:i]
        self.pos = 0
        self.msgs += msgs
        self.other += other


def count_until(subs: list[RawSubscriber], target: int, timeout: float) -> tuple[float | None, float]:
    """Block until the subscribers together counted `target` msgs; (time of first msg, time of last)."""
    sel = selectors.DefaultSelector()
    for s in subs:
        sel.register(s.sock, selectors.EVENT_READ, s)
    first: float | None = None
    deadline = time.perf_counter() + timeout
    total = 0
    try:
        while total < target:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"only {total} of {target} msgs within {timeout} s")
            for key, _ in sel.select(0.5):
                key.data.on_readable()
                if key.data.closed:
                    raise ConnectionError("the gateway closed a subscriber (slow consumer?)")
            total = sum(s.msgs for s in subs)
            if first is None and total:
                first = time.perf_counter()
        return first, time.perf_counter()
    finally:
        sel.close()


async def produce_backlog(broker: KafkaBroker, topic: str, records: int, subjects: int) -> float:
    producer = broker.producer(linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    value = b'{"score":"2-1","minute":87,"event":"goal","pad":"' + b"x" * 40 + b'"}'
    t0 = time.perf_counter()
    try:
        futures = [await producer.send(topic, value, key=b"m/%d" % (i % subjects)) for i in range(records)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - t0


async def end_offsets(broker: KafkaBroker, topic: str, partitions: int) -> dict[int, int]:
    consumer = broker.consumer()
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def consume_baseline(broker: KafkaBroker, topic: str, start: dict[int, int], records: int,
                           fetch_wait_ms: int) -> dict[str, float]:
    """A plain aiokafka consumer reads `records` records from `start` (what one gateway round read)."""
    consumer = broker.consumer(fetch_max_wait_ms=fetch_wait_ms)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in start]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, start[tp.partition])
    n = 0
    cpu0, t0 = self_cpu(), time.perf_counter()
    busy0 = machine_busy_seconds()
    deadline = t0 + 120
    while n < records and time.perf_counter() < deadline:
        batches = await consumer.getmany(timeout_ms=200, max_records=2000)
        for rs in batches.values():
            for r in rs:   # touch what the gateway touches: key and value
                _ = (r.key, r.value, r.offset)
            n += len(rs)
    wall, cpu = time.perf_counter() - t0, self_cpu() - cpu0
    foreign = max(0.0, machine_busy_seconds() - busy0 - cpu)
    await consumer.stop()
    if n < records:
        raise TimeoutError(f"baseline consumer read only {n} of {records} records")
    return {"records": n, "wall_s": wall, "cpu_s": cpu, "records_per_s": n / wall,
            "records_per_cpu_s": per_cpu_second(n, cpu), "foreign_cores": foreign / wall}


def gateway_metric(port: int, name: str) -> float | None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def start_profiler(pid: int, out: str) -> subprocess.Popen[bytes] | None:
    """py-spy on the gateway (flame graph for .svg, raw folded stacks otherwise); None when absent."""
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        print("--profile: py-spy is not installed next to this python (pip install py-spy)", flush=True)
        return None
    fmt = "flamegraph" if out.endswith(".svg") else "raw"
    proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "250", "--format", fmt, "--output", out,
                             "--nonblocking"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    time.sleep(1.0)   # py-spy attaches
    return proc


def stop_profiler(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        stop_process(proc, signal.SIGINT, 30)   # SIGINT: py-spy writes its flame graph


async def throughput_round(broker: KafkaBroker, gw: GatewayProcess, topic: str, subs: list[RawSubscriber],
                           records: int, subjects: int, profile: str | None) -> dict[str, Any]:
    """One round: pause the gateway, produce a backlog, resume it, count until every subscriber has it all."""
    conns = len(subs)
    for s in subs:
        s.msgs = 0
    os.kill(gw.proc.pid, signal.SIGSTOP)
    profiler = None
    try:
        produce_s = await produce_backlog(broker, topic, records, subjects)
    finally:
        if profile:
            profiler = start_profiler(gw.proc.pid, profile)   # attaches to the stopped process
        meter = CpuMeter(gw.proc.pid, broker_pids(broker))
        t0 = time.perf_counter()
        os.kill(gw.proc.pid, signal.SIGCONT)
    try:
        target = records * conns
        first, last = await asyncio.to_thread(count_until, subs, target, 120.0)
    finally:
        cpu = meter.stop()
        stop_profiler(profiler)
    cpu_s = cpu["gateway_cpu_s"]
    wall = last - t0
    assert first is not None
    return {
        "records": records, "subjects": subjects, "subscriber_connections": conns,
        "deliveries": target, "produce_s": produce_s,
        "wall_s": wall, "first_msg_after_s": first - t0,
        "records_per_s": records / wall, "deliveries_per_s": target / wall,
        "gateway_cpu_s": cpu_s, "gateway_cpu_share": cpu_s / wall,
        "records_per_gateway_cpu_s": per_cpu_second(records, cpu_s),
        "deliveries_per_gateway_cpu_s": per_cpu_second(target, cpu_s),
        "broker_cpu_s": cpu["broker_cpu_s"], "foreign_cores": cpu["foreign_cores"],
        "other_frames": sum(s.other for s in subs),
    }


async def throughput(broker: KafkaBroker, gw: GatewayProcess, topic: str, partitions: int, records: int,
                     subjects: int, conns: int, rounds: int, fetch_wait_ms: int,
                     profile: str | None) -> list[dict[str, Any]]:
    """`rounds` pairs measured back to back: the gateway on a fresh backlog, then a plain consumer on it."""
    names = [f"/{topic}/m/{i}" for i in range(subjects)]
    subs = [RawSubscriber(gw.port, names) for _ in range(conns)]
    out = []
    try:
        for i in range(rounds):
            start = await end_offsets(broker, topic, partitions)
            print(f"  round {i + 1}/{rounds}: gateway ...", flush=True)
            gw_r = await throughput_round(broker, gw, topic, subs, records, subjects, profile if i == 0 else None)
            print(f"  round {i + 1}/{rounds}: plain aiokafka consumer on the same records ...", flush=True)
            base = await consume_baseline(broker, topic, start, records, fetch_wait_ms)
            out.append({"gateway": gw_r, "kafka_consumer_baseline": base,
                        "ratio": gw_r["records_per_gateway_cpu_s"] / base["records_per_cpu_s"]})  # NaN if either is
    finally:
        for s in subs:
            s.sock.close()
    return out


async def idle_broker_cpu(broker: KafkaBroker, gw: GatewayProcess, seconds: float) -> dict[str, float]:
    """Broker and gateway CPU while the gateway only sits on its partitions (its fetch long-poll)."""
    meter = CpuMeter(gw.proc.pid, broker_pids(broker))
    await asyncio.sleep(seconds)
    cpu = meter.stop()
    return {"seconds": cpu["wall_s"], "broker_cores": cpu["broker_cpu_s"] / cpu["wall_s"],
            "gateway_cores": cpu["gateway_cpu_s"] / cpu["wall_s"], "foreign_cores": cpu["foreign_cores"]}


def gateway_setting(extra: list[str], flag: str, default: int) -> int:
    return int(extra[extra.index(flag) + 1]) if flag in extra else default


# ----------------------------------------------------------------------------- orchestration

async def run(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.config import Config

    broker = external_broker() or (start_tansu() if args.broker == "tansu" else start_apache_kafka())
    kind = "external" if broker.external and broker.cluster is None else args.broker
    if broker.external and broker.cluster is None:
        broker.replication = min(3, len(broker.bootstrap.split(",")))
    gw: GatewayProcess | None = None
    if kind == "tansu" and "--kafka-fetch-wait-ms" not in args.gateway_args:
        args.gateway_args += ["--kafka-fetch-wait-ms", "5"]
    fetch_wait = gateway_setting(args.gateway_args, "--kafka-fetch-wait-ms", Config().kafka_fetch_wait_ms)
    linger = gateway_setting(args.gateway_args, "--kafka-linger-ms", getattr(Config(), "kafka_linger_ms", 0))
    try:
        idem = "on" if broker.idempotence else "off"
        run_id = os.urandom(3).hex()
        t_lat, t_base, t_thr = f"bench-lat-{run_id}", f"bench-base-{run_id}", f"bench-thr-{run_id}"
        await broker.create_topic(t_lat, 1)
        await broker.create_topic(t_base, 1)
        await broker.create_topic(t_thr, args.partitions)
        gw = GatewayProcess(broker.bootstrap, [t_lat, t_thr], idem,
                            "--heartbeat-ms", "60000", "--max-pending-bytes", str(64 << 20), *args.gateway_args)
        await gw.healthy()
        print(f"broker {broker.bootstrap} ({kind}, broker pids {broker_pids(broker)}), "
              f"gateway pid {gw.proc.pid} on {gw.url}, fetch wait {fetch_wait} ms, linger {linger} ms", flush=True)
        result: dict[str, Any] = {
            "config": {"records": args.records, "messages": args.messages, "rate": args.rate,
                       "subjects": args.subjects, "subscriber_connections": args.conns,
                       "partitions": args.partitions, "kafka_fetch_wait_ms": fetch_wait, "kafka_linger_ms": linger,
                       "gateway_args": args.gateway_args, "broker": kind, "replication": broker.replication,
                       "cpus": os.cpu_count(), "python": platform.python_version(),
                       "loadavg_at_start": os.getloadavg()}}
        if args.idle_s > 0:
            print(f"idle: {args.idle_s:.0f} s with the gateway reading, nothing produced ...", flush=True)
            result["idle"] = await idle_broker_cpu(broker, gw, args.idle_s)
        if args.messages > 0:
            print(f"latency: {args.messages} publishes at {args.rate:.0f}/s through the gateway ...", flush=True)
            meter = CpuMeter(gw.proc.pid, broker_pids(broker))
            lat = await latency_gateway(gw, t_lat, args.messages, args.rate)
            cpu = meter.stop()
            lat["broker_cores"] = cpu["broker_cpu_s"] / cpu["wall_s"]
            lat["gateway_cores"] = cpu["gateway_cpu_s"] / cpu["wall_s"]
            lat["foreign_cores"] = cpu["foreign_cores"]
            print("latency baseline: the same through plain aiokafka ...", flush=True)
            base = await latency_kafka(broker, t_base, args.messages, args.rate, fetch_wait, linger)
            result["latency"] = {"gateway": lat, "kafka_baseline": base}
        if args.records > 0:
            print(f"throughput: {args.records} records, {args.subjects} subjects x {args.conns} subscribers, "
                  f"{args.rounds} rounds ...", flush=True)
            rounds = await throughput(broker, gw, t_thr, args.partitions, args.records, args.subjects, args.conns,
                                      args.rounds, fetch_wait, args.profile)
            slow = gateway_metric(gw.port, 'gateway_closes_total{code="4000"}') or 0.0
            result["throughput"] = {"rounds": rounds, "slow_consumer_closes": slow,
                                    "median_ratio": statistics.median(r["ratio"] for r in rounds)}
        return result
    finally:
        if gw is not None:
            gw.stop()
        broker.stop()


def table(r: dict[str, Any]) -> str:
    rows: list[str] = []
    if "idle" in r:
        i = r["idle"]
        rows += [f"idle {i['seconds']:.0f} s: brokers {100 * i['broker_cores']:.1f} % of a core, gateway "
                 f"{100 * i['gateway_cores']:.1f} %, other processes {i['foreign_cores']:.2f} cores", ""]
    if "latency" in r:
        lat, base = r["latency"]["gateway"], r["latency"]["kafka_baseline"]
        rows += [
            f"{'latency (ms)':<44}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}",
            *[f"{name:<44}" + "".join(f"{d[k]:>8.2f}" for k in ("p50", "p90", "p99", "max"))
              for name, d in (("gateway: WS publish -> WS msg", lat["deliver"]),
                              ("gateway: WS publish -> ack (acks=all)", lat["ack"]),
                              ("baseline aiokafka: produce -> consume", base["deliver"]),
                              ("baseline aiokafka: produce -> acked", base["ack"]))],
            f"  gateway share of p50 deliver: {lat['deliver']['p50'] - base['deliver']['p50']:+.2f} ms "
            f"(ratio {lat['deliver']['p50'] / base['deliver']['p50']:.2f}); errors {lat['errors']}; "
            f"brokers {100 * lat['broker_cores']:.1f} % of a core, gateway {100 * lat['gateway_cores']:.1f} %, "
            f"other processes {lat['foreign_cores']:.2f} cores",
            ""]
    if "throughput" in r:
        rows.append(f"{'consume -> deliver':<36}{'records/s':>11}{'rec/CPU-s':>11}{'msgs/s':>11}"
                    f"{'ratio':>7}{'foreign':>9}")
        for n, rd in enumerate(r["throughput"]["rounds"], 1):
            thr, tb = rd["gateway"], rd["kafka_consumer_baseline"]
            rows += [
                f"{f'{n}: gateway (wall, from SIGCONT)':<36}{thr['records_per_s']:>11.0f}"
                f"{thr['records_per_gateway_cpu_s']:>11.0f}{thr['deliveries_per_s']:>11.0f}"
                f"{rd['ratio']:>7.2f}{thr['foreign_cores']:>9.2f}",
                f"{f'{n}: plain aiokafka consumer':<36}{tb['records_per_s']:>11.0f}{tb['records_per_cpu_s']:>11.0f}"
                f"{'-':>11}{'':>7}{tb['foreign_cores']:>9.2f}",
            ]
        thr = r["throughput"]["rounds"][0]["gateway"]
        rows.append(f"  {thr['records']} records x {thr['subscriber_connections']} subscribers per round; "
                    f"median ratio gateway/baseline per CPU-s {r['throughput']['median_ratio']:.2f}; "
                    f"'foreign': cores used by other processes meanwhile")
    return "\n".join(rows)


def run_and_write(run: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
                  table: Callable[[dict[str, Any]], str], args: argparse.Namespace) -> int:
    """A benchmark's main: run(args) on uvloop (asyncio without it), print table(result), write args.json."""
    try:
        import uvloop
        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print()
    print(table(result))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"\nwritten to {os.path.relpath(args.json, ROOT)}")
    return 0


def main() -> int:
    require_installed_package()  # the installed package's fanout and gateway, never the checkout's
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller run (about 20 s)")
    parser.add_argument("--broker", choices=("kafka", "tansu"), default="kafka",
                        help="what to start when KAFKA_BOOTSTRAP is not set")
    parser.add_argument("--records", type=int, default=200_000, help="records per throughput round (0: none)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (gateway, then baseline)")
    parser.add_argument("--messages", type=int, default=3000, help="latency publishes (0: no latency phase)")
    parser.add_argument("--rate", type=float, default=500.0, help="publishes per second (latency)")
    parser.add_argument("--idle-s", type=float, default=0.0, help="measure idle broker CPU this long first")
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--conns", type=int, default=3, help="subscriber connections, each on every subject")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--profile", metavar="FILE", help="py-spy the gateway in the first throughput round")
    parser.add_argument("--json", default=RESULTS_JSON, help="where the results go")
    parser.add_argument("gateway_args", nargs="*", help="after `--`: more `gateway serve` flags")
    args = parser.parse_args()
    if args.quick:
        args.records, args.messages, args.rounds = 50_000, 1000, 2
    return run_and_write(run, table, args)


if __name__ == "__main__":
    sys.exit(main())
