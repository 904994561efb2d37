"""The Kafka engine on a secured cluster: TLS and SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).

Integration tests (marker kafka) use the SECURE listener (SASL_SSL) of the 3-node Apache Kafka
cluster that tests/support/kafka_cluster.py starts: its own CA, users in SASL_USERS. They need that
cluster (Tansu and KAFKA_BOOTSTRAP have no such listener) and say so when it is not the one running.
Outside producers and consumers of the tests use the PLAINTEXT listener of the same brokers.

Unit tests check the settings (gateway/config.py) without a broker.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

from conftest import SCALE, ws_url
from gateway import cli
from gateway import config as cfg
from gateway.config import ConfigError
from gateway.engines.base import EngineUnavailable
from gateway.engines.kafka_security import KafkaSecurity
from support.kafka_broker import KafkaBroker, read_after
from support.kafka_cluster import (
    SASL_USERS,
    KafkaCluster,
    make_ca,
    pem,
    write_tls_files,
)
from support.ports import free_port
from support.waits import wait_until
from support.ws import connected, recv, recv_until, send

WAIT = 10.0 * SCALE
USER, PASSWORD = "alice", SASL_USERS["alice"]


# ------------------------------------------------------------------------------------------ helpers

@pytest.fixture
def secure_cluster(kafka_broker: KafkaBroker) -> KafkaCluster:
    if kafka_broker.cluster is None:
        pytest.skip("needs the Apache Kafka cluster the tests start (its SASL_SSL listener); "
                    "Tansu and KAFKA_BOOTSTRAP have none")
    return kafka_broker.cluster


def secure_settings(cluster: KafkaCluster, mechanism: str, **kw: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "kafka": cluster.secure_bootstrap, "kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": mechanism,
        "kafka_sasl_username": USER, "kafka_sasl_password": PASSWORD, "kafka_ssl_cafile": cluster.ca_file,
        "kafka_idempotence": "on"}
    settings.update(kw)
    return settings


def serve_command(bootstrap: str, topics: list[str], port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--kafka", bootstrap, "--topics", ",".join(topics),
            "--port", str(port), "--kafka-idempotence", "on", "--log-level", "warning", *extra]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without GATEWAY_* settings of its own, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


def start_process(argv: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
    """Not from the checkout (cwd /): the installed package, with its compiled fanout, runs."""
    with open(log_path, "wb") as out:
        return subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


async def healthz(port: int) -> int | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    except OSError:
        return None
    try:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), WAIT)
        return int(line.split()[1]) if line else None
    finally:
        writer.close()


async def pub_sub_round(url: str, broker: KafkaBroker, t: str) -> None:
    """Two WebSocket subscribers of /t/k; one publishes (acked, delivered to both), an outside
    producer writes a record (delivered to both); the published records are in Kafka."""
    subject = f"/{t}/k"
    a, b = await connected(url), await connected(url)
    try:
        for ws in (a, b):
            await send(ws, {"op": "subscribe", "subjects": [{"subject": subject}]})
            sub = await recv_until(ws, "subscribed")
            assert sub["subject"] == subject
        await send(a, {"op": "publish", "subject": subject, "content": "from a websocket", "id": "p1"})
        # the ack and the publisher's own copy of the message come in either order
        frames = {f["op"]: f for f in [await recv(a), await recv(a)]}
        assert set(frames) == {"ack", "msg"}, frames
        ack = frames["ack"]
        assert ack["id"] == "p1" and frames["msg"]["seq"] == ack["seq"]
        (meta,) = await broker.produce(t, [(b"k", b"from an outside producer")])
        got_a = [frames["msg"], await recv_until(a, "msg")]
        got_b = [await recv_until(b, "msg") for _ in range(2)]
        for got in (got_a, got_b):
            assert [(m["seq"], m["content"]) for m in got] == [
                (ack["seq"], "from a websocket"), (meta.offset + 1, "from an outside producer")]
        records = await broker.read_topic(t, 1)
        assert [(r.key, r.value, r.offset + 1) for r in records if r.key == b"k"] == [
            (b"k", b"from a websocket", ack["seq"]), (b"k", b"from an outside producer", meta.offset + 1)]
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------------------- integration: SASL_SSL

@pytest.mark.kafka
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_scram_over_tls_end_to_end(mechanism: str, secure_cluster: KafkaCluster, kafka_broker: KafkaBroker,
                                         gateway_factory: Any, topic: Callable[[str], str]) -> None:
    """Every client of the engine talks SASL_SSL (it is given only the SECURE listener): the warmup
    and live consumer, the producer (publish acked), the metadata client, and the replay reader
    (a recovery deeper than the in-memory ring is read from Kafka). The replay reader is stopped
    without waiting for the broker's answer to TLS close_notify (engines/kafka.py _close_reader):
    waiting for it stalled one replay in four until the replay's timeout."""
    t = topic()
    await kafka_broker.create_topic(t, 1)
    old = await kafka_broker.produce(t, [(b"old", str(i).encode()) for i in range(40)])
    gw = await gateway_factory(**secure_settings(secure_cluster, mechanism), topics=(t,), history=5,
                               warmup_records=40)
    await wait_until(lambda: gw.engine.ready, "the Kafka engine caught up over SASL_SSL")
    assert gw.engine.idempotent
    assert gw.hub.get(f"/{t}/old") is not None   # the warmup read the old records over SASL_SSL
    # A replay opens connections of its own (TLS and SCRAM handshakes with each broker it needs); the
    # engine gives it 10 s, which a shared 2-core box under a load of 50 can exceed: scaled here.
    gw.engine._replay_timeout = 3 * WAIT
    await pub_sub_round(ws_url(gw), kafka_broker, t)

    # Three recoveries 30 records back: beyond the ring of 5, so the replay consumer reads them from Kafka.
    replays = gw.engine.stats()["replays"]
    ws = await connected(ws_url(gw))
    try:
        await send(ws, {"op": "subscribe", "subjects": [{"subject": f"/{t}/old"}]})
        fresh = await recv_until(ws, "subscribed")
        snap = await recv_until(ws, "msg")
        assert (snap["snapshot"], snap["seq"]) == (True, old[-1].offset + 1)
        after = old[9].offset + 1
        for _ in range(3):
            await send(ws, {"op": "unsubscribe", "subjects": [f"/{t}/old"]})
            await recv_until(ws, "unsubscribed")
            await send(ws, {"op": "subscribe",
                            "subjects": [{"subject": f"/{t}/old", "epoch": fresh["epoch"], "seq": after}]})
            sub = await recv_until(ws, "subscribed", timeout=3 * WAIT)
            assert sub["recovered"] is True, sub
            got = [await recv_until(ws, "msg") for _ in range(30)]
            assert [(m["seq"], m["content"], m.get("snapshot")) for m in got] == [
                (r.offset + 1, str(i), None) for i, r in enumerate(old) if i >= 10]
    finally:
        await ws.close()
    assert gw.engine.stats()["replays"] == replays + 3


@pytest.mark.kafka
async def test_plain_over_tls_through_the_command_line(secure_cluster: KafkaCluster, kafka_broker: KafkaBroker,
                                                      topic: Callable[[str], str], tmp_path: Any) -> None:
    """`serve` as an operator runs it: flags, the user name from the environment, the password from
    a file (with a trailing newline, as editors write it)."""
    t = topic()
    await kafka_broker.create_topic(t, 1)
    secret = tmp_path / "kafka-password"
    secret.write_text(PASSWORD + "\n")
    port = free_port()
    log = tmp_path / "gateway.log"
    proc = start_process(
        serve_command(secure_cluster.secure_bootstrap, [t], port, "--kafka-security-protocol", "SASL_SSL",
                      "--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-password-file", str(secret),
                      "--kafka-ssl-cafile", secure_cluster.ca_file),
        clean_env(GATEWAY_KAFKA_SASL_USERNAME=USER), str(log))
    try:
        async def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            return await healthz(port) == 200

        for _ in range(int(30 * WAIT)):
            if await healthy():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the gateway never became healthy: {log.read_text()}")
        await pub_sub_round(f"ws://127.0.0.1:{port}/ws", kafka_broker, t)
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.kafka
async def test_wrong_password_fails_start_with_a_clear_message(secure_cluster: KafkaCluster,
                                                              topic: Callable[[str], str], tmp_path: Any) -> None:
    """The engine cannot start without Kafka: the process exits 1 with one line naming the SASL
    failure and where the credentials come from, and never prints the password it was given."""
    wrong = "not-the-password-4711"
    proc = await asyncio.to_thread(
        subprocess.run,
        serve_command(secure_cluster.secure_bootstrap, [topic()], free_port(), "--kafka-security-protocol",
                      "SASL_SSL", "--kafka-sasl-mechanism", "SCRAM-SHA-256", "--kafka-sasl-username", USER,
                      "--kafka-ssl-cafile", secure_cluster.ca_file),
        env=clean_env(GATEWAY_KAFKA_SASL_PASSWORD=wrong), cwd="/", stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60 * SCALE)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("python -m gateway: error:")]
    assert len(error) == 1, proc.stderr
    assert "SaslAuthenticationFailed" in error[0] and "SCRAM-SHA-256" in error[0], error[0]
    assert "SASL_SSL, SCRAM-SHA-256 as alice" in error[0], error[0]
    assert "GATEWAY_KAFKA_SASL_PASSWORD" in error[0], error[0]
    assert wrong not in proc.stdout + proc.stderr


@pytest.mark.kafka
async def test_unknown_ca_fails_start_with_a_tls_error(secure_cluster: KafkaCluster, gateway_factory: Any,
                                                      topic: Callable[[str], str], tmp_path: Any) -> None:
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(pem(make_ca("some other CA")[0]))
    with pytest.raises(EngineUnavailable) as info:
        await gateway_factory(**secure_settings(secure_cluster, "SCRAM-SHA-512", kafka_ssl_cafile=str(other_ca)),
                              topics=(topic(),))
    text = str(info.value)
    assert "SSLCertVerificationError" in text and "certificate verify failed" in text, text
    assert "--kafka-ssl-cafile" in text, text


@pytest.mark.kafka
async def test_unknown_user_and_wrong_mechanism_fail_start(secure_cluster: KafkaCluster, gateway_factory: Any,
                                                          topic: Callable[[str], str]) -> None:
    with pytest.raises(EngineUnavailable, match="SaslAuthenticationFailed.*SCRAM-SHA-512"):
        await gateway_factory(**secure_settings(secure_cluster, "SCRAM-SHA-512", kafka_sasl_username="mallory"),
                              topics=(topic(),))
    # a TLS client that does not speak SASL on a SASL_SSL listener: refused, and said so
    with pytest.raises(EngineUnavailable) as info:
        await gateway_factory(kafka=secure_cluster.secure_bootstrap, kafka_security_protocol="SSL",
                              kafka_ssl_cafile=secure_cluster.ca_file, kafka_idempotence="on",
                              topics=(topic(),))
    assert "(SSL)" in str(info.value), info.value


@pytest.mark.kafka
async def test_demo_feed_into_a_secured_cluster(secure_cluster: KafkaCluster, kafka_broker: KafkaBroker) -> None:
    """`demo-feed --kafka` with the gateway's security flags and password variable: the records land
    in topic matches (read after the end offsets seen before, through the PLAINTEXT listener)."""
    await kafka_broker.create_topic("matches", 3)
    consumer = kafka_broker.consumer()
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition("matches", p) for p in sorted(consumer.partitions_for_topic("matches") or [])]
        assert tps
        start = await consumer.end_offsets(tps)
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "demo-feed", "--kafka", secure_cluster.secure_bootstrap,
             "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-mechanism", "SCRAM-SHA-256",
             "--kafka-sasl-username", USER, "--kafka-ssl-cafile", secure_cluster.ca_file,
             "--count", "12", "--rate", "20", "--seed", "3"],
            env=clean_env(GATEWAY_KAFKA_SASL_PASSWORD=PASSWORD), cwd="/", stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=60 * SCALE)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "12 updates published, 0 failed" in proc.stdout
        records = await read_after(consumer, start, 12)
    finally:
        await consumer.stop()
    assert len(records) == 12
    assert all(re.fullmatch(rb"football/([1-9]|10)", r.key) for r in records)


# ------------------------------------------------------------------------------------------ unit: settings

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    d = tmp_path_factory.mktemp("kafka-tls")
    ca, server = str(d / "ca.pem"), str(d / "server.pem")
    write_tls_files(ca, server)
    garbage = d / "garbage.pem"
    garbage.write_text("not a certificate\n")
    yield {"ca": ca, "server": server, "garbage": str(garbage), "dir": str(d)}


def load(flags: dict[str, Any] | None = None, **env: str) -> cfg.Config:
    return cfg.load(flags or {}, env=env)


SASL_ENV = {"GATEWAY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "GATEWAY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "GATEWAY_KAFKA_SASL_USERNAME": "alice", "GATEWAY_KAFKA_SASL_PASSWORD": "s3cret"}


def test_default_is_plaintext_without_credentials() -> None:
    config = load()
    assert config.kafka_security_protocol == "PLAINTEXT"
    assert KafkaSecurity.from_config(config).client_options() == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_from_the_environment_gives_every_client_tls_and_credentials() -> None:
    config = load(**{**SASL_ENV, "GATEWAY_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
                     "GATEWAY_KAFKA_SASL_MECHANISM": "scram-sha-256"})
    assert (config.kafka_security_protocol, config.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")
    options = KafkaSecurity.from_config(config).client_options()
    assert isinstance(options.pop("ssl_context"), ssl.SSLContext)
    assert options == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
                       "sasl_plain_username": "alice", "sasl_plain_password": "s3cret"}
    # the password is in no repr (a logged config, a traceback's locals)
    assert "s3cret" not in repr(config) and "s3cret" not in repr(KafkaSecurity.from_config(config))
    assert KafkaSecurity.from_config(config).describe() == "SASL_SSL, SCRAM-SHA-256 as alice"


def test_password_is_refused_on_the_command_line_and_never_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="--kafka-sasl-password: not accepted on the command line.*"
                                          "GATEWAY_KAFKA_SASL_PASSWORD.*--kafka-sasl-password-file"):
        load({"kafka_sasl_password": "hunter2"}, **SASL_ENV)
    assert cli.main(["serve", "--kafka-sasl-password", "hunter2"]) == 2
    err = capsys.readouterr().err
    assert "`ps`" in err and "hunter2" not in err


def test_help_says_where_the_password_may_come_from(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--kafka-security-protocol", "--kafka-sasl-mechanism", "--kafka-sasl-username",
                 "--kafka-sasl-password-file", "--kafka-ssl-cafile", "--kafka-ssl-certfile", "--kafka-ssl-keyfile"):
        assert flag in out
    assert "env GATEWAY_KAFKA_SASL_PASSWORD" in out and "`ps`" in out


@pytest.mark.parametrize("env, message", [
    ({"GATEWAY_KAFKA_SECURITY_PROTOCOL": "TLS"}, (r"GATEWAY_KAFKA_SECURITY_PROTOCOL: bad value 'TLS': must be one "
                                                  r"of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL")),
    ({**SASL_ENV, "GATEWAY_KAFKA_SASL_MECHANISM": "GSSAPI"}, r"GATEWAY_KAFKA_SASL_MECHANISM: bad value 'GSSAPI'"),
    ({"GATEWAY_KAFKA_SASL_MECHANISM": "PLAIN"}, (r"--kafka-sasl-mechanism \(GATEWAY_KAFKA_SASL_MECHANISM\) is PLAIN, "
                                                 r"but --kafka-security-protocol \(GATEWAY_KAFKA_SECURITY_PROTOCOL\) "
                                                 r"is PLAINTEXT: SASL needs SASL_SSL or SASL_PLAINTEXT")),
    ({"GATEWAY_KAFKA_SASL_USERNAME": "alice"}, r"--kafka-sasl-username .* is set, but .* is PLAINTEXT"),
    ({**SASL_ENV, "GATEWAY_KAFKA_SASL_MECHANISM": ""}, r"SASL_SSL needs --kafka-sasl-mechanism"),
    ({**SASL_ENV, "GATEWAY_KAFKA_SASL_USERNAME": ""}, r"SASL_SSL needs a user name: --kafka-sasl-username"),
    ({**SASL_ENV, "GATEWAY_KAFKA_SASL_PASSWORD": ""}, (r"needs a password: set GATEWAY_KAFKA_SASL_PASSWORD or "
                                                       r"--kafka-sasl-password-file")),
    ({"GATEWAY_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "GATEWAY_KAFKA_SSL_CAFILE": "/x"},
     r"--kafka-ssl-cafile .* is set, but .* is SASL_PLAINTEXT: TLS settings need SSL or SASL_SSL"),
    ({"GATEWAY_KAFKA_SECURITY_PROTOCOL": "SSL", "GATEWAY_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
     r"--kafka-ssl-cafile: no such file: /nonexistent/ca.pem"),
    ({"GATEWAY_KAFKA_SECURITY_PROTOCOL": "SSL", "GATEWAY_KAFKA_SSL_KEYFILE": "/x"},
     r"--kafka-ssl-keyfile .* needs --kafka-ssl-certfile"),
])
def test_bad_combinations_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(**env)


def test_bad_values_exit_2_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--kafka", "127.0.0.1:1", "--topics", "t", "--kafka-security-protocol", "SASL_SSL",
                     "--kafka-sasl-mechanism", "PLAIN"]) == 2
    assert "needs a user name" in capsys.readouterr().err


def test_password_file(tmp_path: Any) -> None:
    f = tmp_path / "pw"
    f.write_text("from a file\r\n")
    env = {k: v for k, v in SASL_ENV.items() if k != "GATEWAY_KAFKA_SASL_PASSWORD"}
    config = load({"kafka_sasl_password_file": str(f)}, **env)
    assert config.kafka_sasl_password == "from a file"
    with pytest.raises(ConfigError, match="GATEWAY_KAFKA_SASL_PASSWORD and --kafka-sasl-password-file .* exclude"):
        load({"kafka_sasl_password_file": str(f)}, **SASL_ENV)
    with pytest.raises(ConfigError, match=r"--kafka-sasl-password-file: cannot read .*/missing: No such file"):
        load({"kafka_sasl_password_file": str(tmp_path / "missing")}, **env)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"--kafka-sasl-password-file: .*/empty is empty"):
        load({"kafka_sasl_password_file": str(tmp_path / "empty")}, **env)
    # in the TOML file the password is allowed (a file with its own permissions, like the password file)
    toml = tmp_path / "gateway.toml"
    toml.write_text('kafka_security_protocol = "SASL_PLAINTEXT"\nkafka_sasl_mechanism = "PLAIN"\n'
                    'kafka_sasl_username = "u"\nkafka_sasl_password = "p"\n')
    assert cfg.load({}, env={}, file=str(toml)).kafka_sasl_password == "p"


def test_tls_files_are_checked_at_start(tls_files: dict[str, str]) -> None:
    ssl_env = {"GATEWAY_KAFKA_SECURITY_PROTOCOL": "SSL"}
    config = load(**ssl_env, GATEWAY_KAFKA_SSL_CAFILE=tls_files["ca"])
    assert config.kafka_ssl_cafile == tls_files["ca"]
    # without a CA file: the system's trusted CAs (a managed service's public certificate)
    assert load(**ssl_env).kafka_ssl_cafile is None
    with pytest.raises(ConfigError, match=r"--kafka-ssl-cafile .*garbage.pem: not usable for TLS"):
        load(**ssl_env, GATEWAY_KAFKA_SSL_CAFILE=tls_files["garbage"])
    # mutual TLS: a certificate with its key in one PEM file is usable; a CA certificate without
    # its key is not
    load(**ssl_env, GATEWAY_KAFKA_SSL_CERTFILE=tls_files["server"])
    with pytest.raises(ConfigError, match=r"--kafka-ssl-certfile .*ca.pem: not usable for TLS"):
        load(**ssl_env, GATEWAY_KAFKA_SSL_CERTFILE=tls_files["ca"])
