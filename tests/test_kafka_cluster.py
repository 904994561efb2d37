"""The tests' own Apache Kafka cluster (tests/support/kafka_cluster.py), one node each to stay cheap:
its JVMs go when the process that started them exits or gets SIGTERM, and a port taken between
picking it and binding it costs a new try, not the start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SCALE
from support.kafka_cluster import START_TIMEOUT_S, KafkaCluster

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


def _kafka_jvm(pid: int) -> bool:
    """Whether `pid` is (still) a running Kafka broker JVM (a reused pid or a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kafka.Kafka" in f.read()
    except (OSError, IndexError):
        return False


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
            assert pids and all(_kafka_jvm(p) for p in pids)
            if ending == "sigterm":
                os.kill(child.pid, signal.SIGTERM)
            else:
                child.stdin.write("exit\n")
                child.stdin.flush()
            code = child.wait(60 * SCALE)
            assert code == (-signal.SIGTERM if ending == "sigterm" else 0)  # it still ends as it would have
            assert [p for p in pids if _kafka_jvm(p)] == [], "broker JVMs left running"
            assert not os.path.exists(workdir)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            for p in pids:  # whatever the outcome, nothing of this test stays behind
                if _kafka_jvm(p):
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
