"""Apache Kafka for the tests and for trying Kafka mode by hand: a 3-node KRaft cluster on loopback.

The jars come from Maven Central (tests/support/kafka/pom.xml, `mvn dependency:copy-dependencies`)
into ~/.cache/kafka-ws-gateway/kafka-<version>/ (~/.m2 keeps them between runs); there is no
distribution tarball there, so each node runs `kafka.tools.StorageTool format` then `kafka.Kafka`
straight from that classpath. Every node is broker and controller (a voter quorum of 3): the
fastest realistic layout on a small machine (3 JVMs instead of 6), and killing one node kills a
broker and a controller, as a lost machine would.

Each node has four listeners on 127.0.0.1:
    PLAINTEXT   clients and replication (advertised as is)         -> `bootstrap`
    PROXIED     clients that must go through a TcpProxy per node   -> `proxied_bootstrap`
                (advertised as the proxy's port: a client that bootstraps through a proxy is
                told to reach every broker through its proxy, as with an advertised load balancer)
    SECURE      SASL_SSL: TLS with a certificate for 127.0.0.1 signed by a CA made at start
                (`ca_file`), SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for the users in
                SASL_USERS (SCRAM credentials bootstrapped by `StorageTool format --add-scram`)
                                                                   -> `secure_bootstrap`
    CONTROLLER  the KRaft quorum
so an outage test cuts the proxies and nothing else: replication and plain test clients go on.
The key and certificates live in the cluster's work dir and go with it.

A node killed by a test comes back with `restart_node` (or `heal`: every node that is down): its old JVM
is reaped first, a port another socket holds is waited for, and a start that fails is tried again, then
reported with the node's log of that start (each start is marked in node.log).

By hand (what the README shows):
    scripts/kafka-cluster.sh                 # 3 nodes on 127.0.0.1:19092-19094, Ctrl-C stops them
    python3 tests/support/kafka_cluster.py --resolve-only
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

if __package__:
    from .ports import free_ports
    from .waits import wait_until_sync
else:  # run as a script (scripts/kafka-cluster.sh): tests/support is sys.path[0]
    from ports import free_ports
    from waits import wait_until_sync

KAFKA_VERSION = "4.1.1"   # keep in step with tests/support/kafka/pom.xml
POM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kafka")
HEAP = os.environ.get("KAFKA_TEST_HEAP", "384m")
START_TIMEOUT_S = float(os.environ.get("KAFKA_TEST_START_TIMEOUT", "120"))

#: SASL users of the SECURE listener: name -> password (PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 alike)
SASL_USERS = {"alice": "alice-secret", "bob": "bob-secret"}
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
#: starts with fresh free ports when a node could not bind one of its own: free_ports() (support/ports.py:
#: outside the ephemeral range, so no client connection takes a port while its node is down) releases the
#: ports it found, so another process (a parallel cluster) may take one before the JVM binds it
START_ATTEMPTS = 3
#: a node brought back (restart_node, heal) gets this many tries, each of at most RESTART_TIMEOUT_S until the
#: cluster is ready with it: a restart takes 3-6 s on a loaded 2-core machine. Small enough that a node that
#: cannot come back costs less than a test's timeout (pyproject), so the next test can replace the cluster.
RESTART_ATTEMPTS = 2
RESTART_TIMEOUT_S = float(os.environ.get("KAFKA_TEST_RESTART_TIMEOUT", "30"))
#: how long a node brought back waits for a port of its own that another socket holds
PORT_WAIT_S = 10.0

T = TypeVar("T")


def cache_dir(version: str = KAFKA_VERSION) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kafka-ws-gateway", f"kafka-{version}")


def resolve_jars(version: str = KAFKA_VERSION) -> str:
    """The directory of Kafka's jars, resolved with Maven on first use (a marker says it is whole)."""
    out = cache_dir(version)
    marker = os.path.join(out, ".resolved")
    if os.path.exists(marker):
        return out
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("Apache Kafka for the tests is resolved with Maven: install maven (and Java 17)")
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    proc = subprocess.run(
        [mvn, "-q", "-B", "-f", os.path.join(POM_DIR, "pom.xml"), "dependency:copy-dependencies",
         f"-Dkafka.version={version}", f"-DoutputDirectory={tmp}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mvn could not resolve Apache Kafka {version}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    with open(marker, "w") as f:
        f.write(f"resolved in {time.monotonic() - started:.1f} s\n")
    return out


def run_async(factory: Callable[[], Any]) -> Any:
    """Run a coroutine to completion in a thread of its own (callable from inside or outside a loop)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=target, name="kafka-cluster-admin")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class KafkaNode:
    node_id: int
    port: int            # PLAINTEXT
    proxied_listen: int  # PROXIED, the port the broker itself listens on
    proxy_port: int      # PROXIED, advertised: a TcpProxy in front of proxied_listen goes here
    controller_port: int
    secure_port: int     # SECURE (SASL_SSL)
    dir: str
    proc: subprocess.Popen[bytes] | None = None
    log_file: Any = field(default=None, repr=False)
    starts: int = 0      # how many JVMs start_node started for this node
    log_offset: int = 0  # where the output of the last start begins in node.log
    # kill_node and start_node of one node, one at a time: a kill still running in a worker thread (a test
    # that failed while `await asyncio.to_thread(kill_node)` ran) must not forget the JVM started after it
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None or self.proc.poll() is not None else self.proc.pid

    @property
    def props_path(self) -> str:
        return os.path.join(self.dir, "node.properties")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "node.log")

    @property
    def listen_ports(self) -> tuple[int, ...]:
        """The ports the node's JVM binds (not proxy_port: a TcpProxy binds that one)."""
        return (self.port, self.proxied_listen, self.secure_port, self.controller_port)


class NodeStartError(RuntimeError):
    """A node could not be started or brought back; the message says why, with its log of that start."""


class PortTaken(NodeStartError):
    """A port of the node is bound by another socket (`describe_port` says whose)."""


class KafkaCluster:
    """A KRaft cluster of `n` combined broker+controller nodes that this process started (by PID)."""

    def __init__(self, n: int = 3, *, base_port: int | None = None, heap: str = HEAP,
                 workdir: str | None = None, extra: dict[str, str] | None = None) -> None:
        self.jars = resolve_jars()
        self.n = n
        self.heap = heap
        self.cluster_id = _kafka_cluster_id()
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="kafka-cluster-")
        self._fixed_ports = bool(base_port)
        self.nodes = self._place_nodes(base_port)
        self.ca_file = os.path.join(self.workdir, "ca.pem")           # trust this for SECURE
        self._broker_pem = os.path.join(self.workdir, "broker.pem")   # its key and certificate
        self.extra = dict(extra or {})
        self.start_seconds = 0.0
        self.start_attempts = 0  # how many tries start() took (more than 1: a port was taken)
        #: counts kills and starts of nodes: a caller that checked the cluster can tell whether it changed since
        self.generation = 0

    def _place_nodes(self, base_port: int | None) -> list[KafkaNode]:
        n = self.n
        ports = ([base_port + i for i in range(5 * n)] if base_port else free_ports(5 * n))
        return [KafkaNode(i + 1, ports[i], ports[n + i], ports[2 * n + i], ports[3 * n + i], ports[4 * n + i],
                          os.path.join(self.workdir, f"node-{i + 1}")) for i in range(n)]

    # ------------------------------------------------------------------------------ addresses
    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    @property
    def proxied_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{node.proxy_port}" for node in self.nodes)

    @property
    def secure_bootstrap(self) -> str:
        """The SASL_SSL listeners (trust `ca_file`; users and passwords in SASL_USERS)."""
        return ",".join(f"127.0.0.1:{node.secure_port}" for node in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    # ------------------------------------------------------------------------------ processes
    def _properties(self, node: KafkaNode) -> str:
        voters = ",".join(f"{m.node_id}@127.0.0.1:{m.controller_port}" for m in self.nodes)
        rf = min(3, self.n)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "controller.listener.names": "CONTROLLER",
            "listeners": (f"PLAINTEXT://127.0.0.1:{node.port},PROXIED://127.0.0.1:{node.proxied_listen},"
                          f"SECURE://127.0.0.1:{node.secure_port},CONTROLLER://127.0.0.1:{node.controller_port}"),
            "advertised.listeners": (f"PLAINTEXT://127.0.0.1:{node.port},"
                                     f"PROXIED://127.0.0.1:{node.proxy_port},SECURE://127.0.0.1:{node.secure_port}"),
            "listener.security.protocol.map": ("PLAINTEXT:PLAINTEXT,PROXIED:PLAINTEXT,SECURE:SASL_SSL,"
                                               "CONTROLLER:PLAINTEXT"),
            "inter.broker.listener.name": "PLAINTEXT",
            # SECURE: the broker's key and certificate chain as one PEM file (no JKS, no keytool)
            "listener.name.secure.ssl.keystore.type": "PEM",
            "listener.name.secure.ssl.keystore.location": self._broker_pem,
            "listener.name.secure.sasl.enabled.mechanisms": "PLAIN," + ",".join(SCRAM_MECHANISMS),
            "listener.name.secure.plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                + " ".join(f'user_{user}="{password}"' for user, password in SASL_USERS.items()) + ";"),
            **{f"listener.name.secure.{m.lower()}.sasl.jaas.config":
               "org.apache.kafka.common.security.scram.ScramLoginModule required;" for m in SCRAM_MECHANISMS},
            "log.dirs": os.path.join(node.dir, "data"),
            # topics are created on purpose (a test of an absent topic must find it absent)
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "default.replication.factor": str(rf),
            "min.insync.replicas": str(min(2, rf)),
            "offsets.topic.replication.factor": str(rf),
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": str(rf),
            "transaction.state.log.min.isr": str(min(2, rf)),
            "share.coordinator.state.topic.replication.factor": str(rf),
            "share.coordinator.state.topic.min.isr": str(min(2, rf)),
            "group.initial.rebalance.delay.ms": "0",
            # a killed node is fenced (its partitions led elsewhere) within about 3 s, not 9
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            "replica.lag.time.max.ms": "5000",
            "controller.quorum.fetch.timeout.ms": "2000",
            "controller.quorum.election.timeout.ms": "1000",
            # a 2-core machine: few threads
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        props.update(self.extra)
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self, *args: str, heap: str | None = None) -> list[str]:
        java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else "java"
        opts = [f"-Xmx{heap or self.heap}", "-Xms64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Xss512k", "-Djava.awt.headless=true", "-Dorg.slf4j.simpleLogger.showDateTime=true",
                "-Dorg.slf4j.simpleLogger.log.kafka.request.logger=warn",
                "-Dorg.slf4j.simpleLogger.log.org.apache.kafka.clients=warn"]
        return [java, *opts, "-cp", os.path.join(self.jars, "*"), *args]

    def _format(self, node: KafkaNode) -> None:
        os.makedirs(node.dir, exist_ok=True)
        with open(node.props_path, "w") as f:
            f.write(self._properties(node))
        # SCRAM credentials live in the cluster metadata: written into the bootstrap checkpoint here,
        # so they exist before any broker accepts a client (no admin call, no race at start)
        scram = [arg for m in SCRAM_MECHANISMS for user, password in SASL_USERS.items()
                 for arg in ("--add-scram", f"{m}=[name={user},password={password}]")]
        proc = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", self.cluster_id, "-c", node.props_path,
                       "--ignore-formatted", *scram, heap="128m"),
            stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"formatting node {node.node_id} failed:\n{proc.stdout}{proc.stderr}")

    def start_node(self, node: KafkaNode, *, port_wait: float | None = None) -> None:
        """Start (or restart, same config and log dir) one node; does not wait for it to be ready.

        What is left of an earlier JVM of the node is reaped first (kill_node): its ports and its log dir
        lock are free once it is gone. A listener port still bound by another socket (a process that took
        the port while the node was down) is waited for up to `port_wait` s (PORT_WAIT_S), then PortTaken
        says who holds it. Each start writes a line of its own into node.log, so the log shows every start."""
        with node.lock:
            if node.pid is not None:
                raise RuntimeError(f"node {node.node_id} is running (pid {node.pid})")
            self.kill_node(node)   # an earlier JVM that exited by itself: reaped, its log closed
            self._wait_ports_free(node, PORT_WAIT_S if port_wait is None else port_wait)
            node.log_file = open(node.log_path, "ab")
            node.log_offset = node.log_file.tell()
            node.starts += 1
            stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
            node.log_file.write(f"---- kafka_cluster.py: start {node.starts} of node {node.node_id} "
                                f"at {stamp} ----\n".encode())
            node.log_file.flush()
            self.generation += 1
            node.proc = subprocess.Popen(self._java("kafka.Kafka", node.props_path), stdin=subprocess.DEVNULL,
                                         stdout=node.log_file, stderr=subprocess.STDOUT)

    def _wait_ports_free(self, node: KafkaNode, timeout: float) -> None:
        taken: list[int] = []

        def free() -> bool:
            taken[:] = [port for port in node.listen_ports if not _bindable(port)]
            return not taken

        try:
            wait_until_sync(free, f"the ports of node {node.node_id}", timeout, interval=0.1)
        except AssertionError:
            raise PortTaken(f"node {node.node_id} cannot start: " + "; ".join(
                f"127.0.0.1:{port} is taken ({describe_port(port)})" for port in taken)) from None

    def start(self) -> KafkaCluster:
        """Format and start every node and wait until the cluster is ready. A node that could not bind
        one of its ports (taken since free_ports() found it) makes a new try on fresh ports, up to
        START_ATTEMPTS in all (not with a fixed `base_port`). Until `stop()`, the nodes are also
        stopped when this process exits or gets SIGTERM (`_stop_at_exit`)."""
        started = time.monotonic()
        _stop_at_exit(self)
        for attempt in range(1, START_ATTEMPTS + 1):
            self.start_attempts = attempt
            try:
                self._start_nodes()
                break
            except BaseException as exc:
                clash = isinstance(exc, PortTaken) or (isinstance(exc, Exception) and self._bind_failed())
                if not clash or self._fixed_ports or attempt == START_ATTEMPTS:
                    self.stop()
                    raise
                self._kill_nodes()
                for node in self.nodes:
                    shutil.rmtree(node.dir, ignore_errors=True)
                self.nodes = self._place_nodes(None)
        self.start_seconds = time.monotonic() - started
        return self

    def _start_nodes(self) -> None:
        if not os.path.exists(self._broker_pem):
            write_tls_files(self.ca_file, self._broker_pem)
        formats = [threading.Thread(target=self._format, args=(node,)) for node in self.nodes]
        for t in formats:
            t.start()
        for t in formats:
            t.join()
        for node in self.nodes:
            if not os.path.exists(os.path.join(node.dir, "data", "meta.properties")):
                self._format(node)   # raises with the tool's output
            self.start_node(node, port_wait=0)   # a port taken now: a new try on fresh ports, not a wait
        self.wait_ready()

    def _bind_failed(self) -> bool:
        """Whether a node's log says one of its listeners found its port taken."""
        return any("Address already in use" in self.log_tail(node, 20_000) for node in self.nodes)

    def kill_node(self, node: KafkaNode, sig: int = signal.SIGKILL, timeout: float = 60.0) -> None:
        """Stop one node by its PID (SIGKILL: a crash; SIGTERM: a controlled shutdown) and reap it: when
        this returns, its JVM is gone, with its sockets and its lock on the log dir. A JVM still there
        `timeout` s after the signal gets SIGKILL; one still there 30 s after that raises NodeStartError
        and stays the node's (so that nothing is started over it)."""
        with node.lock:
            proc = node.proc
            if proc is None:
                return
            if proc.poll() is None:
                self.generation += 1
                proc.send_signal(sig)   # not to a pid reaped (and perhaps reused) meanwhile
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        raise NodeStartError(f"node {node.node_id}: its JVM (pid {proc.pid}) is still there 30 s "
                                             f"after SIGKILL ({_proc_state(proc.pid)})") from None
            node.proc = None
            if node.log_file is not None:
                node.log_file.close()
                node.log_file = None

    def restart_node(self, node: KafkaNode, timeout: float | None = None) -> None:
        """Bring one node back (its old JVM killed and reaped first, if any) and wait until the cluster
        is ready with it; see `bring_back`."""
        self.bring_back([node], timeout)

    def whole(self) -> bool:
        """Whether the JVM of every node runs (no request made: a cheap check before each test)."""
        return all(node.pid is not None for node in self.nodes)

    def heal(self, timeout: float | None = None) -> list[int]:
        """Bring back every node that is not running and wait until the cluster is ready with all of
        them (also when none was down); the ids of the nodes brought back."""
        down = [node for node in self.nodes if node.pid is None]
        if down:
            self.bring_back(down, timeout)
        else:
            self.wait_ready(RESTART_TIMEOUT_S if timeout is None else timeout)
        return [node.node_id for node in down]

    def bring_back(self, nodes: list[KafkaNode], timeout: float | None = None, attempts: int | None = None) -> None:
        """Start `nodes` again (all of them before waiting: two nodes of three down have no quorum one at a
        time) and wait until the cluster is ready with them. A try that fails (a port still taken, a JVM
        that exits, not ready in `timeout` s: RESTART_TIMEOUT_S) kills them and starts them again, up to
        `attempts` tries (RESTART_ATTEMPTS); then NodeStartError with each try's reason and the nodes' log
        of the last start."""
        timeout = RESTART_TIMEOUT_S if timeout is None else timeout
        attempts = RESTART_ATTEMPTS if attempts is None else attempts
        reasons: list[str] = []
        for attempt in range(1, attempts + 1):
            try:
                for node in nodes:
                    self.kill_node(node)   # what is left of it: reaped before it starts again
                    self.start_node(node)
                self.wait_ready(timeout)
                return
            except Exception as exc:  # noqa: BLE001 - one more try, then all of them in the error
                reasons.append(f"try {attempt}: {str(exc).splitlines()[0] if str(exc) else repr(exc)}")
        logs = "\n".join(f"--- node {node.node_id}, start {node.starts}:\n{self.log_tail(node, since_start=True)}"
                         for node in nodes)
        for node in nodes:   # left down, not half started: whoever looks next sees them down
            self.kill_node(node)
        ids = ", ".join(str(node.node_id) for node in nodes)
        raise NodeStartError(f"node(s) {ids} did not come back in {attempts} tries: {'; '.join(reasons)}\n{logs}")

    def stop(self) -> None:
        """Kill every node (its data is thrown away with the work dir: no need for a controlled
        shutdown, which takes seconds per node once the quorum shrinks). Idempotent."""
        _running.discard(self)
        self._kill_nodes()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill_nodes(self) -> None:
        for node in self.nodes:
            try:
                self.kill_node(node, signal.SIGKILL)
            except (OSError, subprocess.TimeoutExpired):
                pass

    def rss_mib(self) -> float:
        return sum(rss_kib(node.pid) for node in self.nodes if node.pid) / 1024

    def log_tail(self, node: KafkaNode, chars: int = 4000, *, since_start: bool = False) -> str:
        """The end of the node's log (since_start: of its last start only)."""
        try:
            with open(node.log_path, "rb") as f:
                end = f.seek(0, os.SEEK_END)
                f.seek(max(node.log_offset if since_start else 0, end - 4 * chars))   # UTF-8: <= 4 bytes a char
                return f.read().decode("utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    # ------------------------------------------------------------------------------ readiness
    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every running node answers metadata naming every running broker. Raises NodeStartError
        at once when a node's JVM exits, and at the timeout, with the log of the node(s) concerned."""
        want = [node for node in self.nodes if node.pid is not None]
        ids = {node.node_id for node in want}
        last: list[Any] = [None]

        def ready() -> bool:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise NodeStartError(f"kafka node {node.node_id} exited with {node.proc.returncode} "
                                         f"(start {node.starts}):\n{self.log_tail(node, since_start=True)}")
            deaf = [node for node in want if not _listening(node.port)]
            if deaf:
                last[0] = f"not listening yet: node(s) {[node.node_id for node in deaf]}"
                return False
            try:
                seen = run_async(lambda: self._brokers_seen(want))
            except Exception as exc:  # noqa: BLE001 - not up yet
                last[0] = exc
                return False
            last[0] = f"brokers seen by node(s) {sorted(ids)}: {seen}"
            return all(s == ids for s in seen)

        try:
            wait_until_sync(ready, "the cluster", timeout, interval=0.1)
        except AssertionError:
            logs = "\n".join(f"--- node {node.node_id}, start {node.starts}:\n"
                             f"{self.log_tail(node, 1500, since_start=True)}" for node in want)
            raise NodeStartError(f"kafka cluster not ready in {timeout} s (last: {last[0]!r})\n{logs}") from None

    async def create_topic(self, name: str, partitions: int) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, partitions, min(3, self.n),
                                                topic_configs={"min.insync.replicas": str(min(2, self.n))})])
        finally:
            await admin.close()

    async def _brokers_seen(self, nodes: list[KafkaNode]) -> list[set[int]]:
        from aiokafka.admin import AIOKafkaAdminClient

        out = []
        for node in nodes:
            admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{node.port}", request_timeout_ms=3000)
            await admin.start()
            try:
                desc = await admin.describe_cluster()
                out.append({int(b["node_id"]) for b in desc["brokers"]})
            finally:
                await admin.close()
        return out


#: clusters started and not stopped yet, stopped by `_stop_running` when the process exits
_running: set[KafkaCluster] = set()
_exit_hooks = False


def _stop_running() -> None:
    for cluster in list(_running):
        cluster.stop()


def _stop_at_exit(cluster: KafkaCluster) -> None:
    """Stop `cluster` (its JVMs, by PID) when this process exits, normally or on SIGTERM, if nothing
    stopped it before. SIGTERM needs a handler: by default it ends Python at once, without finally
    blocks, fixture teardowns or atexit, and a SIGTERMed pytest used to leave its brokers running.
    The handler stops the clusters, then does what SIGTERM did before (the previous handler, or the
    default: the process dies of SIGTERM). Installed once, from the main thread only (Python's rule);
    atexit covers a normal exit either way."""
    global _exit_hooks
    _running.add(cluster)
    if _exit_hooks:
        return
    _exit_hooks = True
    atexit.register(_stop_running)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        _stop_running()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def make_ca(common_name: str = "kafka-ws-gateway test CA") -> tuple[Any, Any]:
    """A self-signed CA: (certificate, private key) as `cryptography` objects; valid for 2 days."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_tls_files(ca_path: str, server_pem_path: str) -> None:
    """A new CA (its certificate to `ca_path`) and a server certificate for 127.0.0.1 and localhost
    signed by it: PKCS#8 key, certificate and CA certificate in one PEM file at `server_pem_path`,
    as Kafka's `ssl.keystore.type=PEM` reads it. EC P-256: generated in milliseconds."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = make_ca()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    os.makedirs(os.path.dirname(server_pem_path), exist_ok=True)
    with open(ca_path, "wb") as f:
        f.write(pem(ca_cert))
    fd = os.open(server_pem_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem + pem(cert) + pem(ca_cert))


def is_kafka_jvm(pid: int) -> bool:
    """Whether `pid` is (still) a running Kafka broker JVM (a reused pid or a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kafka.Kafka" in f.read()
    except (OSError, IndexError):
        return False


def _bindable(port: int) -> bool:
    """Whether a listener could bind 127.0.0.1:`port` now (with SO_REUSEADDR, as the JVM binds: a
    connection of the old JVM in TIME_WAIT does not stop it, any live socket on the port does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
               "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
               "0B": "CLOSING"}


def describe_port(port: int) -> str:
    """Who has local port `port` (TCP sockets in /proc/net/tcp and tcp6: their state and the processes
    that hold them), for an error message."""
    found: dict[str, str] = {}   # socket inode -> its state
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in list(f)[1:]:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port:
                        found[fields[9]] = _TCP_STATES.get(fields[3], fields[3])
        except (OSError, ValueError, IndexError):
            continue
    if not found:
        return "no TCP socket on it now"
    holders: dict[str, list[str]] = {inode: [] for inode in found}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in holders:
                    with open(f"/proc/{pid}/comm") as c:
                        holders[target[8:-1]].append(f"pid {pid} ({c.read().strip()})")
        except OSError:
            continue
    return ", ".join(f"{state} held by {' and '.join(holders[inode]) or 'no process (the kernel)'}"
                     for inode, state in found.items())


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((line.strip() for line in f if line.startswith("State:")), "State: ?")
    except OSError:
        return "gone from /proc"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _kafka_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (22 characters), not
    starting with "-" (the storage tool would take it for an option; Kafka's own Uuid avoids it too)."""
    import base64

    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Start a 3-node Apache Kafka (KRaft) cluster on 127.0.0.1 "
                                             "for trying the gateway's Kafka mode; Ctrl-C stops it.")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--base-port", type=int, default=19092,
                    help="PLAINTEXT ports are base..base+nodes-1; PROXIED, its proxies, CONTROLLER and SASL_SSL "
                         "follow in blocks of nodes (base 19092: SASL_SSL on 19104-19106; 0: free ports)")
    ap.add_argument("--heap", default=HEAP, help="-Xmx of each node")
    ap.add_argument("--topics", default="", metavar="NAME:PARTITIONS,...",
                    help="topics to create once the cluster is up (replication factor 3, min.insync.replicas=2)")
    ap.add_argument("--resolve-only", action="store_true", help="resolve the jars with Maven and exit")
    args = ap.parse_args(argv)
    if args.resolve_only:
        print(resolve_jars())
        return 0
    cluster = KafkaCluster(args.nodes, base_port=args.base_port or None, heap=args.heap)
    print(f"starting {args.nodes} Kafka {KAFKA_VERSION} nodes in {cluster.workdir} ...", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cluster.start()
        print(f"ready in {cluster.start_seconds:.1f} s, {cluster.rss_mib():.0f} MiB RSS in all", flush=True)
        for spec in filter(None, args.topics.split(",")):
            name, _, parts = spec.partition(":")
            run_async(lambda: cluster.create_topic(name, int(parts or 1)))  # noqa: B023 (runs at once)
            print(f"created topic {name} ({parts or 1} partitions)", flush=True)
        users = ", ".join(f"{u}/{p}" for u, p in SASL_USERS.items())
        print(f"bootstrap: {cluster.bootstrap}\n"
              f"SASL_SSL bootstrap: {cluster.secure_bootstrap} (CA {cluster.ca_file}; "
              f"PLAIN, SCRAM-SHA-256, SCRAM-SHA-512; users {users})\n"
              "Ctrl-C stops the cluster and deletes its data.", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
