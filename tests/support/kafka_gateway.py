"""Gateways in Kafka mode for tests: in the test's own loop (`kafka_gateway`, through the
`gateway_factory` fixture) or as a `python -m gateway serve` subprocess (`GatewayProcess`), and the
plain HTTP probe they are watched with. Shared by tests/test_kafka_gateway.py and the Kafka test of
tests/test_demo_browser.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

from support.kafka_broker import KafkaBroker, tansu_fetch_wait
from support.ports import free_port
from support.waits import WAIT, wait_until


def idem(broker: KafkaBroker) -> str:
    return "on" if broker.idempotence else "off"


async def kafka_gateway(gateway_factory: Any, broker: KafkaBroker, topics: list[str], *,
                        bootstrap: str | None = None, wait_ready: bool = True, **settings: Any) -> Any:
    settings.setdefault("kafka_idempotence", idem(broker))
    gw = await gateway_factory(kafka=bootstrap or broker.bootstrap, topics=tuple(topics), **settings)
    if wait_ready:
        await wait_until(lambda: gw.engine.ready, "the Kafka engine caught up")
    return gw


async def http_status(port: int, path: str = "/healthz") -> int:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), WAIT)
        return int(line.split()[1])
    finally:
        writer.close()


class GatewayProcess:
    """`python -m gateway serve --kafka ...` as a subprocess on a free port; stopped by its own PID."""

    def __init__(self, broker: KafkaBroker, topics: list[str], node_id: str, *extra: str) -> None:
        self.port = free_port()
        self.node_id = node_id
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        fd, self.log_path = tempfile.mkstemp(prefix=f"gw-{node_id}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--kafka", broker.bootstrap,
                 "--topics", ",".join(topics), "--port", str(self.port), "--node-id", node_id,
                 "--kafka-idempotence", idem(broker), "--log-level", "warning",
                 *(f"--kafka-{k.replace('_', '-')}={v}" for k, v in tansu_fetch_wait().items()), *extra],
                # not the checkout: the installed package (with its compiled fanout) must run
                cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    async def healthy(self, timeout: float = 3 * WAIT) -> None:
        async def ok() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway {self.node_id} exited {self.proc.returncode}: {self.log()}")
            try:
                return await http_status(self.port) == 200
            except (TimeoutError, OSError, ValueError, IndexError):
                return False

        await wait_until(ok, lambda: f"gateway {self.node_id} to be healthy: {self.log()}", timeout, interval=0.05)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-3000:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def close(self) -> None:
        self.kill(signal.SIGTERM)
        os.unlink(self.log_path)
