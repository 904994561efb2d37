"""The tests' own Apache Kafka cluster (tests/support/kafka_cluster.py), one node each to stay cheap:
its JVMs go when the process that started them exits or gets SIGTERM (test_hard_timeout.py: or hangs); a port
taken between picking it and binding it costs a new try, not the start; a killed node comes back
(at once, again and again, after a port it needs was held for a while); and the session's broker
(support/kafka_broker.py) is whole before each test: a node left down is brought back, a cluster that
cannot be healed is replaced, and one that cannot be replaced fails the tests at once, with the reason."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import support.kafka_broker as kafka_broker_module
import support.kafka_cluster as kafka_cluster_module
from conftest import SCALE
from support.kafka_broker import KafkaBroker, start_apache_kafka
from support.kafka_cluster import START_TIMEOUT_S, KafkaCluster, NodeStartError, PortTaken, is_kafka_jvm
from support.ports import ephemeral_range

pytestmark = pytest.mark.kafka

TESTS = Path(__file__).resolve().parent

#: starts a 1-node cluster, prints its JVM pids and work dir, then exits (without stop()) when told
#: to on stdin, or waits there until signalled
CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from support.kafka_cluster import KafkaCluster
c = KafkaCluster(1).start()
print(" ".join(str(n.pid) for n in c.nodes), c.workdir, flush=True)
sys.stdin.readline()
sys.exit(0)
"""


@pytest.mark.parametrize("ending", ["sigterm", "exit"])
def test_the_cluster_jvms_stop_when_the_process_that_started_them_ends(ending: str) -> None:
    """SIGTERM used to end the test process without any cleanup, leaving the brokers running; a
    normal exit without stop() did too."""
    pids: list[int] = []
    with subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdin is not None and child.stdout is not None and child.stderr is not None
            line = child.stdout.readline()  # the cluster is ready (or the child failed: EOF)
            assert line, f"the child exited {child.wait(10)}: {child.stderr.read()}"
            *jvms, workdir = line.split()
            pids = [int(p) for p in jvms]
            assert pids and all(is_kafka_jvm(p) for p in pids)
            if ending == "sigterm":
                os.kill(child.pid, signal.SIGTERM)
            else:
                child.stdin.write("exit\n")
                child.stdin.flush()
            code = child.wait(60 * SCALE)
            assert code == (-signal.SIGTERM if ending == "sigterm" else 0)  # it still ends as it would have
            assert [p for p in pids if is_kafka_jvm(p)] == [], "broker JVMs left running"
            assert not os.path.exists(workdir)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            for p in pids:  # whatever the outcome, nothing of this test stays behind
                if is_kafka_jvm(p):
                    os.kill(p, signal.SIGKILL)


def test_a_port_taken_before_the_node_binds_it_costs_a_new_try_on_fresh_ports() -> None:
    cluster = KafkaCluster(1)
    taken = cluster.nodes[0].port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", taken))  # as a parallel cluster would, after free_ports() let it go
        squatter.listen()
        try:
            cluster.start()
            assert cluster.start_attempts == 2
            assert taken not in {cluster.nodes[0].port, cluster.nodes[0].controller_port}
            with socket.create_connection(("127.0.0.1", cluster.nodes[0].port), timeout=START_TIMEOUT_S):
                pass
        finally:
            cluster.stop()
    assert not os.path.exists(cluster.workdir)


@pytest.fixture
def one_node() -> Iterator[KafkaCluster]:
    cluster = KafkaCluster(1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _squat(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:`port`, as a process that took a port of a node while it was down."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # the killed node's connections are in TIME_WAIT
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def _starts_logged(cluster: KafkaCluster) -> int:
    with open(cluster.nodes[0].log_path, encoding="utf-8", errors="replace") as f:
        return f.read().count("---- kafka_cluster.py: start ")


def test_a_node_comes_back_right_after_a_sigkill_again_and_again(one_node: KafkaCluster) -> None:
    """SIGKILL sent from outside kill_node (the JVM neither reaped nor, perhaps, dead yet), then at once
    a restart: the restart reaps the old JVM before it starts the new one, which serves again."""
    node = one_node.nodes[0]
    for i in range(3):
        assert node.proc is not None
        old = node.proc.pid
        os.kill(old, signal.SIGKILL)
        one_node.restart_node(node)   # waits until the cluster answers metadata with the node in it
        assert node.pid is not None and node.pid != old
        assert not is_kafka_jvm(old)
        assert node.starts == i + 2 and _starts_logged(one_node) == i + 2   # one JVM per restart, each logged
        with socket.create_connection(("127.0.0.1", node.port), timeout=10 * SCALE):
            pass


def test_a_restart_waits_for_a_port_held_by_another_socket_then_names_who_holds_it(
        one_node: KafkaCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    node = one_node.nodes[0]
    one_node.kill_node(node)
    squatter = _squat(node.secure_port)
    try:
        # held for longer than the wait: PortTaken names the port and the process holding it (this one)
        with pytest.raises(PortTaken, match=f"127.0.0.1:{node.secure_port} is taken \\(LISTEN held by "
                                            f"pid {os.getpid()} "):
            one_node.start_node(node, port_wait=0.3)
        assert node.proc is None and node.starts == 1   # no JVM started over the taken port

        # held for a while: the restart waits (seen through the port check) and starts once it is free
        seen_taken = threading.Event()
        real = kafka_cluster_module._bindable

        def bindable(port: int) -> bool:
            ok = real(port)
            if port == node.secure_port and not ok:
                seen_taken.set()
            return ok

        monkeypatch.setattr(kafka_cluster_module, "_bindable", bindable)
        errors: list[BaseException] = []

        def restart() -> None:
            try:
                one_node.restart_node(node)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        restarter = threading.Thread(target=restart)
        restarter.start()
        try:
            assert seen_taken.wait(kafka_cluster_module.PORT_WAIT_S), "the restart never found the port taken"
        finally:
            squatter.close()
            restarter.join(START_TIMEOUT_S)
    finally:
        squatter.close()
    assert not restarter.is_alive() and errors == []
    assert node.pid is not None and node.starts == 2   # one JVM for the restart, started after the port was free
    assert "Address already in use" not in one_node.log_tail(node, 100_000, since_start=True)


def test_a_node_that_cannot_come_back_fails_with_every_try_and_its_log(
        one_node: KafkaCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    node = one_node.nodes[0]
    one_node.kill_node(node)
    monkeypatch.setattr(kafka_cluster_module, "PORT_WAIT_S", 0.3)
    with _squat(node.controller_port), pytest.raises(NodeStartError) as failed:
        one_node.restart_node(node)
    message = str(failed.value)
    assert "node(s) 1 did not come back in 2 tries" in message
    assert message.count(f"127.0.0.1:{node.controller_port} is taken") == 2
    assert "--- node 1, start 1:" in message   # the log of the node's last start (its first: no other)
    assert node.proc is None   # left down, not half started


@pytest.fixture
def session_like_broker() -> Iterator[KafkaBroker]:
    """A KafkaBroker over a 1-node cluster, as the session's kafka_broker fixture makes (3 nodes there)."""
    broker = start_apache_kafka(1)
    try:
        yield broker
    finally:
        broker.stop()


def test_a_node_left_down_is_brought_back_before_the_next_test(session_like_broker: KafkaBroker) -> None:
    broker = session_like_broker
    assert broker.ensure_whole() is None   # whole, and checked: nothing to do
    cluster = broker.cluster
    assert cluster is not None
    bootstrap = broker.bootstrap
    cluster.kill_node(cluster.nodes[0])   # as a failover test that failed before its restart
    assert broker.ensure_whole() == "brought back node(s) [1]"
    assert broker.cluster is cluster and broker.bootstrap == bootstrap and broker.replaced == 0
    assert cluster.whole() and broker.ensure_whole() is None


def test_a_cluster_that_cannot_be_healed_is_replaced_and_one_that_cannot_be_replaced_fails_fast(
        session_like_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = session_like_broker
    old = broker.cluster
    assert old is not None
    node = old.nodes[0]
    old.kill_node(node)
    monkeypatch.setattr(kafka_cluster_module, "PORT_WAIT_S", 0.3)
    with _squat(node.port):   # node 1 cannot come back: a fresh cluster (fresh ports) takes its place
        done = broker.ensure_whole()
    assert done is not None and done.startswith("replaced the cluster by a fresh one (node(s) [1] down")
    fresh = broker.cluster
    assert fresh is not None and fresh is not old and broker.replaced == 1
    assert broker.bootstrap == fresh.bootstrap != old.bootstrap and not os.path.exists(old.workdir)
    assert fresh.whole()
    with socket.create_connection(("127.0.0.1", fresh.nodes[0].port), timeout=10 * SCALE):
        pass

    class NoRoom(KafkaCluster):
        def start(self) -> KafkaCluster:
            self.stop()   # its work dir
            raise RuntimeError("no room for a fresh cluster")

    monkeypatch.setattr(kafka_broker_module, "KafkaCluster", NoRoom)
    node = fresh.nodes[0]
    fresh.kill_node(node)
    with _squat(node.port), pytest.raises(RuntimeError, match="no room for a fresh cluster"):
        broker.ensure_whole()
    assert broker.broken is not None
    # every later test that needs the cluster fails at once, with the same reason (no new try)
    with pytest.raises(RuntimeError, match="(?s)broken: node\\(s\\) \\[1\\] down.*no room for a fresh cluster"):
        broker.ensure_whole()


def test_a_heal_cut_short_once_is_tried_again_twice_in_a_row_fails_fast(
        session_like_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test's timeout (a BaseException, as pytest-timeout's) that cuts a heal short leaves the next test a
    try of its own; only INTERRUPTIONS in a row make the cluster broken."""
    broker = session_like_broker
    cluster = broker.cluster
    assert cluster is not None

    class TimedOut(BaseException):
        pass

    cuts = [TimedOut("the test's time ran out")]

    def heal(timeout: float | None = None) -> list[int]:
        if cuts:
            raise cuts.pop()
        return real_heal(timeout)

    real_heal = cluster.heal
    monkeypatch.setattr(cluster, "heal", heal)
    cluster.kill_node(cluster.nodes[0])
    with pytest.raises(TimedOut):
        broker.ensure_whole()
    assert broker.broken is None and broker.interruptions == 1
    assert broker.ensure_whole() == "brought back node(s) [1]" and broker.interruptions == 0   # the next try

    cuts[:] = [TimedOut("again"), TimedOut("and again")]
    cluster.kill_node(cluster.nodes[0])
    for _ in range(kafka_broker_module.INTERRUPTIONS):
        with pytest.raises(TimedOut):
            broker.ensure_whole()
    assert broker.broken is not None and "interrupted" in broker.broken
    with pytest.raises(RuntimeError, match="broken: node\\(s\\) \\[1\\] down, and bringing them back was interrupted"):
        broker.ensure_whole()


def test_node_ports_are_outside_the_ephemeral_range_so_no_client_connection_takes_one() -> None:
    """A client's connect() takes its source port from the ephemeral range, and keeps it as long as it lives:
    a node's port from that range could be taken while the node is down (support/ports.py)."""
    low, high = ephemeral_range()
    cluster = KafkaCluster(3)   # places its nodes on ports; starts nothing
    try:
        ports = [port for node in cluster.nodes
                 for port in (node.port, node.proxied_listen, node.proxy_port, node.controller_port, node.secure_port)]
    finally:
        cluster.stop()
    assert len(set(ports)) == len(ports) == 15
    assert not [port for port in ports if low <= port <= high], (ports, (low, high))
    # and the kernel agrees: a connection's source port is never one of them
    with socket.create_server(("127.0.0.1", 0), backlog=256) as server:   # connected, never accepted
        clients = [socket.create_connection(server.getsockname()) for _ in range(200)]
        try:
            assert all(low <= c.getsockname()[1] <= high for c in clients)
        finally:
            for c in clients:
                c.close()
