"""Shared fixtures: event loops (uvloop, and plain asyncio where marked), a gateway on 127.0.0.1:0,
third-party WebSocket clients. (Which fanout runs, compiled or its twins, and from where: test_installed_package.py.)"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import hypothesis
import pytest
import uvloop

#: one unit for every wait in the suite; raise it on a slow machine (TEST_TIMEOUT_SCALE=3)
SCALE = float(os.environ.get("TEST_TIMEOUT_SCALE", "1"))

# Hypothesis judges each example by its result, never by how long it took: a per-example deadline is
# a timing threshold, and it fails on a loaded machine (seen under scripts/stress.sh).
hypothesis.settings.register_profile("gateway", deadline=None,
                                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("gateway")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_loops: run on uvloop and on plain asyncio")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    if item.get_closest_marker("both_loops"):
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def gateway_factory() -> AsyncIterator[Any]:
    """Start gateways in the test's loop: `gw = await gateway_factory(heartbeat_ms=200)`."""
    from gateway.config import Config, validate
    from gateway.server import Gateway

    started: list[Gateway] = []

    async def make(engine: Any = None, **settings: Any) -> Gateway:
        settings.setdefault("port", 0)
        settings.setdefault("node_id", f"test-{len(started)}")
        if settings.get("kafka"):
            for key, value in tansu_fetch_wait().items():   # a short fetch wait on Tansu only
                settings.setdefault("kafka_" + key, value)
        gw = Gateway(validate(Config(**settings)), engine=engine)
        await gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        await gw.stop()


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """topic("a") -> a topic name unique to this test run."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    run = uuid.uuid4().hex[:6]
    return lambda suffix="": f"{base}-{suffix}-{run}"


def ws_url(gw: Any) -> str:
    return f"ws://127.0.0.1:{gw.port}/ws"


@pytest.fixture
async def gateway_processes() -> AsyncIterator[list[Any]]:
    """A list the test appends its gateway subprocesses to (support.kafka_gateway.GatewayProcess); each is
    closed (SIGTERM, by its own PID) at the end of the test."""
    procs: list[Any] = []
    yield procs
    for p in procs:
        p.close()


# One Kafka-protocol broker per session (Tansu started on a free port, or KAFKA_BOOTSTRAP): only the
# tests that ask for it start it. Each test gives its topics names of its own.
from support.kafka_broker import kafka_broker_fixture, tansu_fetch_wait  # noqa: E402

kafka_broker = pytest.fixture(scope="session")(kafka_broker_fixture)


@pytest.fixture(autouse=True)
def _whole_kafka_cluster(request: pytest.FixtureRequest) -> None:
    """Each test that uses the session's broker starts on a whole cluster (KafkaBroker.ensure_whole): one
    that killed a broker and could not bring it back does not fail every Kafka test after it. What was
    done goes to the terminal (it is worth knowing in a CI log)."""
    if "kafka_broker" not in request.fixturenames:
        return
    done = request.getfixturevalue("kafka_broker").ensure_whole()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if done and reporter is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            reporter.write_line(f"\n{request.node.nodeid}: before it, the Kafka cluster was not whole: {done}")


# The hard limit of every test, setup to teardown (pytest-timeout's is only a soft one), and of the exit
# after the last: support/hard_timeout.py
from support.hard_timeout import (  # noqa: E402, F401 (hooks of this conftest)
    pytest_runtest_logreport,
    pytest_runtest_protocol,
    pytest_sessionfinish,
    pytest_unconfigure,
)
