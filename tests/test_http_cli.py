"""The operating contract: command line, environment, HTTP endpoints, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import SCALE, ws_url
from gateway import cli, config
from support.metrics import sample
from support.ws import close_code, connected, recv, send


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5 * SCALE) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


async def test_http_endpoints(gateway_factory):
    gw = await gateway_factory()
    base = f"http://127.0.0.1:{gw.port}"
    status, ctype, body = await asyncio.to_thread(_get, base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, ctype, body = await asyncio.to_thread(_get, base + "/")
    assert status == 200 and ctype.startswith("text/html") and b"/client.js" in body
    status, ctype, body = await asyncio.to_thread(_get, base + "/client.js")
    assert status == 200 and "javascript" in ctype and b"export class GatewayClient" in body
    status, ctype, body = await asyncio.to_thread(_get, base + "/client.d.ts")
    assert status == 200 and ctype == "application/typescript; charset=utf-8"
    assert b"export class GatewayClient {" in body and b"export class SubscriptionTracker {" in body
    status, _, _ = await asyncio.to_thread(_get, base + "/nope")
    assert status == 404


async def test_metrics_count_real_traffic(gateway_factory):
    gw = await gateway_factory()
    url = f"http://127.0.0.1:{gw.port}/metrics"
    _, ctype, before = await asyncio.to_thread(_get, url)
    assert ctype.startswith("text/plain")
    before_text = before.decode()
    assert sample(before_text, "gateway_messages_out_total") == 0
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/m/1"}]})
    await recv(ws)
    for i in range(3):
        await send(ws, {"op": "publish", "subject": "/m/1", "content": "x", "id": i})
    for _ in range(6):
        await recv(ws)
    await send(ws, {"op": "nope"})
    await recv(ws)
    _, _, after = await asyncio.to_thread(_get, url)
    text = after.decode()
    assert sample(text, "gateway_connections") == 1
    assert sample(text, "gateway_subscriptions") == 1
    assert sample(text, "gateway_messages_in_total") == 3
    assert sample(text, "gateway_messages_out_total") == 3
    assert sample(text, "gateway_bytes_out_total") > 0
    assert sample(text, "gateway_errors_total", '{code="bad_request"}') == 1


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in config.FIELDS:
        flag = "--" + name.replace("_", "-")
        assert flag in out, flag
        assert config.env_name(name) in out


@pytest.mark.parametrize("argv", [
    ["serve", "--port", "nope"],
    ["serve", "--port", "70000"],
    ["serve", "--no-such-flag"],
    ["serve", "--heartbeat-ms", "0"],
    ["serve", "--topics", "bad topic!", "--kafka", "127.0.0.1:1"],
    ["serve", "--workers", "2"],
    ["serve", "--workers", "2", "--kafka", "127.0.0.1:1", "--topics", "t", "--port", "0"],
    ["serve", "--workers", "0"],
    ["serve", "--workers", "many"],
    ["serve", "--jwt-public-key", "/does/not/exist.pem"],
    ["serve", "--tls-cert", "x.pem"],
    ["serve", "--max-pending-bytes", "2000000"],  # < 2 x --max-message-bytes (1 MiB)
    ["serve", "--allowed-origins", "evil.example"],
    ["serve", "--publish-rate", "fast"],
    # beyond what the settings' users take (C sizes, JSON integers): before, the gateway started and then
    # failed every connection (or every subscribe, publish) with an OverflowError in its log
    ["serve", "--max-pending-bytes", str(2**64)],
    ["serve", "--history", str(2**64)],
    ["serve", "--history-bytes", str(2**64)],
    ["serve", "--heartbeat-ms", str(2**64)],
    ["serve", "--coalesce-min-conns", str(2**64)],
    ["bogus"],
])
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["not-pem", "key-of-another-certificate", "certificate-as-key"])
def test_unusable_tls_certificate_or_key_is_one_line_and_exit_2(tmp_path, capsys, case):
    """Checked with the other settings, like --jwt-public-key: before, the gateway failed later, in
    start(), with exit 1 and OpenSSL's "[SSL] PEM lib (_ssl.c:...)" (and --workers N restarted its
    workers forever, each failing the same way)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from support.fanout_tls import _cert_pem

    cert_pem, key_pem = _cert_pem()
    other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cert, key = {"not-pem": (b"garbage\n", key_pem), "key-of-another-certificate": (cert_pem, other_key),
                 "certificate-as-key": (cert_pem, cert_pem)}[case]
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    code = cli.main(["serve", "--port", "0", "--tls-cert", str(tmp_path / "cert.pem"),
                     "--tls-key", str(tmp_path / "key.pem")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "--tls-cert" in err[0] and "Traceback" not in err[0], err


def test_largest_integer_settings_are_refused_from_the_environment_and_the_file_too(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text(f"history = {2**63 - 1}\n")
    with pytest.raises(config.ConfigError, match="--config .*history.* must be <="):
        config.load({}, env={}, file=str(f))
    with pytest.raises(config.ConfigError, match="GATEWAY_MAX_PENDING_BYTES.* must be <="):
        config.load({}, env={"GATEWAY_MAX_PENDING_BYTES": str(2**53)})
    assert config.load({"max_pending_bytes": str(config.MAX_INT)}, env={}).max_pending_bytes == config.MAX_INT


@pytest.mark.parametrize("name", ["kafka_fetch_wait_ms", "kafka_publish_timeout_ms"])
def test_kafka_times_beyond_the_protocols_int32_are_refused(name):
    """Kafka requests carry these in 32-bit fields (a fetch's max wait; the producer's request timeout).
    Before: accepted, then aiokafka's fetcher (or sender) died on its first request, so every publish was
    acked and no subscriber ever got a message (or every publish was `unavailable`)."""
    kafka = {"kafka": "127.0.0.1:1", "topics": "t"}
    with pytest.raises(config.ConfigError, match=f"{config.flag_name(name)}.* must be <= {2**31 - 1}"):
        config.load({name: str(2**31), **kafka}, env={})
    assert getattr(config.load({name: str(2**31 - 1), **kafka}, env={}), name) == 2**31 - 1


async def test_a_gateway_with_the_largest_integer_settings_serves(gateway_factory):
    big = config.MAX_INT
    gw = await gateway_factory(max_pending_bytes=big, history=big, history_bytes=big, history_total_bytes=big,
                               heartbeat_ms=big, coalesce_min_conns=big, max_subscriptions=big,
                               max_inflight_publishes=big, connect_timeout_ms=big, jwt_leeway_ms=big)
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/m/1"}]})
    assert (await recv(ws))["op"] == "subscribed"
    await send(ws, {"op": "publish", "subject": "/m/1", "content": "x", "id": 1})
    got = [await recv(ws), await recv(ws)]
    assert sorted(f["op"] for f in got) == ["ack", "msg"], got


def test_config_file_from_the_environment(tmp_path):
    """GATEWAY_CONFIG names the file as --config does (every flag reads GATEWAY_<FLAG>); --config wins.
    Before: GATEWAY_CONFIG was ignored, and the gateway started on the defaults without a word."""
    f = tmp_path / "gw.toml"
    f.write_text("workers = 2\n")  # without kafka: refused, so the file was read
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0"], capture_output=True, text=True,
                          cwd="/", env={**os.environ, "GATEWAY_CONFIG": str(f)}, timeout=60 * SCALE)
    assert proc.returncode == 2, proc.stderr
    assert "--workers > 1 needs --kafka" in proc.stderr
    other = tmp_path / "other.toml"
    other.write_text("max_pending_bytes = 1\n")  # --config wins over GATEWAY_CONFIG: this file is the one read
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--config", str(other)],
                          capture_output=True, text=True, cwd="/", env={**os.environ, "GATEWAY_CONFIG": str(f)},
                          timeout=60 * SCALE)
    assert proc.returncode == 2 and "--max-pending-bytes (1) must be at least" in proc.stderr, proc.stderr


def test_flags_win_over_environment_over_file(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text('heartbeat_ms = 111\nhistory = 7\nport = 1234\n')
    env = {"GATEWAY_HEARTBEAT_MS": "222", "GATEWAY_PORT": "2345", "GATEWAY_TOPICS": "a,b"}
    c = config.load({"port": "3456"}, env=env, file=str(f))
    assert (c.port, c.heartbeat_ms, c.history, c.topics) == (3456, 222, 7, ("a", "b"))


def test_workers_auto_is_the_cpus_this_process_may_use_with_kafka_and_one_without(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    kafka = {"kafka": "127.0.0.1:1", "topics": "t"}
    assert config.load({"workers": "auto", **kafka}, env={}).workers == cpus
    assert config.load({**kafka}, env={"GATEWAY_WORKERS": "AUTO"}).workers == cpus
    f = tmp_path / "gw.toml"
    f.write_text('workers = "auto"\n')
    assert config.load(kafka, env={}, file=str(f)).workers == cpus
    assert config.load({"workers": "auto"}, env={}).workers == 1  # standalone: one process holds the state
    assert config.load({"workers": "3", **kafka}, env={}).workers == 3


def test_workers_auto_follows_the_affinity_mask_not_the_machine():
    """taskset / cgroup cpusets: a process allowed on one CPU gets one worker, whatever os.cpu_count() says."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        assert config.load({"workers": "auto", "kafka": "127.0.0.1:1", "topics": "t"}, env={}).workers == 1
    finally:
        os.sched_setaffinity(0, before)


def _start_cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd="/",  # never import the source tree instead of the installed package
                            env={**os.environ, **(env or {})})
    line = proc.stdout.readline()  # type: ignore[union-attr]
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        proc.kill()
        raise AssertionError(f"no start-up line: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
    return proc, int(m.group(1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_clients_1001_and_exits_0(sig):
    proc, port = await asyncio.to_thread(_start_cli, env={"GATEWAY_NODE_ID": "from-env"})
    try:
        ws = await connected(f"ws://127.0.0.1:{port}/ws")
        await send(ws, {"op": "ping", "id": 1})
        assert (await recv(ws))["op"] == "pong"
        status, _, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
        assert json.loads(body)["node"] == "from-env"
        os.kill(proc.pid, sig)
        assert await close_code(ws) == 1001
        rc = await asyncio.to_thread(proc.wait, 5 * SCALE)
        assert rc == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def _raw_http(port: int, request: bytes, timeout: float = 5 * SCALE) -> bytes:
    """Send `request` as is, read until the server closes."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


_UPGRADE = ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n\r\n")


@pytest.mark.parametrize("request_bytes,status,must_contain", [
    pytest.param(_UPGRADE.format(key="dGhlIHNhbXBsZSBub25jZQ==", version="8").encode(), 426,
                 b"Sec-WebSocket-Version: 13", id="version-8"),
    pytest.param(_UPGRADE.format(key="short", version="13").encode(), 400, b"Sec-WebSocket-Key", id="bad-key"),
    pytest.param(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426, b"Upgrade: websocket", id="plain-get-on-ws"),
    pytest.param(b"\x16\x03\x01 not http at all\r\n\r\n", 400, b"bad request", id="garbage"),
    pytest.param(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431, b"too large", id="huge-head"),
    pytest.param(_UPGRADE.format(key="dGhlIHNhbXBsZSBub25jZQ==", version="13").replace(
        "\r\n\r\n", "\r\nContent-Length: 5\r\n\r\nhello").encode(), 400, b"body", id="upgrade-with-a-body"),
    pytest.param(_UPGRADE.format(key="dGhlIHNhbXBsZSBub25jZQ==", version="13").replace("Host: x\r\n", "").encode(),
                 400, b"one Host", id="upgrade-without-host"),
    pytest.param(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, b"Allow: GET, HEAD",
                 id="post"),
])
async def test_bad_http_gets_a_clear_status_and_the_gateway_stays_up(gateway_factory, request_bytes, status,
                                                                    must_contain):
    gw = await gateway_factory()
    answer = await asyncio.to_thread(_raw_http, gw.port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert must_contain in answer
    ws = await connected(ws_url(gw))  # and everyone else is still served
    await send(ws, {"op": "ping", "id": 1})
    assert await recv(ws) == {"op": "pong", "id": 1}
    _, _, metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{gw.port}/metrics")
    if status != 405:
        assert f'gateway_http_rejected_total{{status="{status}"}} 1.0' in metrics.decode()


async def test_absolute_form_request_targets_are_served(gateway_factory):
    gw = await gateway_factory()
    answer = await asyncio.to_thread(_raw_http, gw.port, f"GET http://127.0.0.1:{gw.port}/healthz HTTP/1.1\r\n"
                                     f"Host: 127.0.0.1:{gw.port}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in answer, answer[:200]
    from support.ws import read_head

    def upgrade() -> bytes:
        import socket

        with socket.create_connection(("127.0.0.1", gw.port), timeout=5 * SCALE) as sock:
            sock.sendall(_UPGRADE.format(key="dGhlIHNhbXBsZSBub25jZQ==", version="13").replace(
                "GET /ws", f"GET http://127.0.0.1:{gw.port}/ws").encode())
            return read_head(sock)

    head = await asyncio.to_thread(upgrade)
    assert head.startswith(b"HTTP/1.1 101 "), head


async def test_head_request_and_unknown_path(gateway_factory):
    gw = await gateway_factory()
    answer = await asyncio.to_thread(_raw_http, gw.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: " in head and body == b""
    answer = await asyncio.to_thread(_raw_http, gw.port, b"GET /x?y HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ")


async def test_unfinished_request_head_is_dropped_after_the_connect_timeout(gateway_factory):
    gw = await gateway_factory(connect_timeout_ms=300)
    answer = await asyncio.to_thread(_raw_http, gw.port, b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # never ends
    assert answer == b""  # closed without a response
    assert not gw._unconnected


async def test_connections_that_leave_during_the_request_are_forgotten(gateway_factory):
    import socket

    from support.waits import wait_until

    gw = await gateway_factory()
    socks = []
    for i in range(20):
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5 * SCALE)
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n"[: 5 + i])  # each stops somewhere in the head
        socks.append(sock)
    await wait_until(lambda: len(gw._unconnected) == 20, "the gateway saw the 20 connections")
    assert len(gw.sessions) == 0  # not WebSocket sessions (yet): not counted as connections
    for sock in socks:
        sock.close()
    await wait_until(lambda: not gw._unconnected, "every half-open request forgotten")
    ws = await connected(ws_url(gw))
    assert len(gw.sessions) == 1
    await ws.close()


def test_kafka_unreachable_at_start_is_one_line_and_exit_1():
    """Before: EngineUnavailable escaped main() as a traceback."""
    from support.ports import free_port

    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0",
                           "--kafka", f"127.0.0.1:{free_port()}", "--topics", "t"],
                          capture_output=True, text=True, cwd="/", timeout=60 * SCALE)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("python -m gateway: error:")]
    assert len(errors) == 1 and "Kafka" in errors[0], proc.stderr
