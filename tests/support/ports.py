"""Listening ports for the servers the tests start on a port number they pick first (Kafka nodes, Tansu,
gateway subprocesses, TCP proxies), picked outside the kernel's ephemeral port range.

A port that bind(("127.0.0.1", 0)) hands out is an ephemeral one, the range the kernel also takes the
source port of every outgoing connection from. While such a server is down (a Kafka node killed by a
failover test, until it is started again), any client connection of the machine may get its port as
its source port, and then holds it for as long as it lives: a gateway's connection to another broker
lives for the whole test, and the node cannot bind its own port again. (The likely cause of a CI run in
which a node killed by test_kafka_failover never came back, and the Kafka tests after it failed; inferred
from the node's log, not caught in the act.) A client retrying the dead
port can even connect to itself (TCP simultaneous open). Outside the ephemeral range, no connect()
ever takes the port: only another bind() can, which free_ports() checks for and the callers retry on.
"""

from __future__ import annotations

import random
import socket

#: the lowest port handed out: above the registered services' usual ports
LOWEST = 10_000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for source ports (net.ipv4.ip_local_port_range), both ends included."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999   # Linux's default


def pool() -> range:
    """The ports free_ports() picks from: below the ephemeral range, or above it when too little is below."""
    low, high = ephemeral_range()
    if low - LOWEST >= 4096:
        return range(LOWEST, low)
    if 65535 - high >= 4096:
        return range(high + 1, 65536)
    return range(max(1024, LOWEST // 2), low)   # a range over almost every port: what is left below it


def free_ports(n: int) -> list[int]:
    """n distinct ports outside the ephemeral range that 127.0.0.1 could bind just now (all bound at
    once, then released: another process may still take one before its server binds it, which the
    caller handles by trying again on fresh ports)."""
    candidates = pool()
    socks: list[socket.socket] = []
    try:
        for port in random.sample(candidates, min(len(candidates), 64 * n + 256)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))   # no SO_REUSEADDR: a port with a connection in TIME_WAIT is skipped
            except OSError:
                s.close()
                continue
            socks.append(s)
            if len(socks) == n:
                return [int(s.getsockname()[1]) for s in socks]
        raise RuntimeError(f"no {n} free ports in {candidates}")
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One port of free_ports()."""
    return free_ports(1)[0]
