"""wss:// and https:// when the gateway is given a certificate (fanout writes through the TLS transport)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import urllib.error
import urllib.request

import pytest

from conftest import SCALE
from support.fanout_tls import _cert_pem, contexts
from support.waits import wait_until
from support.ws import WAIT, connected, read_head, recv, recv_until, send, upgrade_request

pytestmark = pytest.mark.both_loops


def _tls_files(tmp_path) -> dict[str, str]:
    """A certificate and key for 127.0.0.1 in `tmp_path`, as the gateway's --tls-cert / --tls-key."""
    cert_pem, key_pem = _cert_pem()
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    return {"tls_cert": str(tmp_path / "cert.pem"), "tls_key": str(tmp_path / "key.pem")}


async def _seqs(ws, n: int) -> list[int]:
    return [(await recv_until(ws, "msg", timeout=10 * SCALE))["seq"] for _ in range(n)]


async def test_tls_publish_subscribe_and_https(gateway_factory, tmp_path):
    gw = await gateway_factory(**_tls_files(tmp_path))
    _, client_ctx = contexts()
    url = f"wss://127.0.0.1:{gw.port}/ws"
    sub = await connected(url, ssl=client_ctx, max_queue=None)
    pub = await connected(url, ssl=client_ctx)
    await send(sub, {"op": "subscribe", "subjects": [{"subject": "/tls/1"}]})
    await recv(sub)
    big = "y" * 200_000  # larger than one TLS record and the socket buffer: partial writes through TLS
    reader = asyncio.create_task(_seqs(sub, 20))
    for i in range(20):
        await send(pub, {"op": "publish", "subject": "/tls/1", "content": f"{i}{big}", "id": i})
        assert (await recv_until(pub, "ack", timeout=10 * SCALE))["id"] == i
    assert await reader == list(range(1, 21))

    def https_get() -> bytes:
        with urllib.request.urlopen(f"https://127.0.0.1:{gw.port}/healthz", context=client_ctx,
                                    timeout=5 * SCALE) as resp:
            return resp.read()

    assert b'"ok"' in await asyncio.to_thread(https_get)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"https://127.0.0.1:{gw.port}/healthz", context=ssl.create_default_context(), timeout=5 * SCALE))


def _tcp(port: int, source: str) -> socket.socket:
    """A TCP connection from `source` that has not begun its TLS handshake."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", port))
    return sock


def _wss_upgrade(port: int, source: str) -> bytes:
    """A whole TLS handshake and WebSocket upgrade request from `source`; the response head (then closed)."""
    _, client_ctx = contexts()
    with client_ctx.wrap_socket(_tcp(port, source), server_hostname="127.0.0.1") as tls:
        tls.sendall(upgrade_request(port))
        head = read_head(tls)
    return head


async def test_tls_connections_count_toward_the_connection_limits_from_their_accept(gateway_factory, tmp_path):
    """A TLS connection obeys --max-connections and --max-connections-per-address from its TCP accept on,
    like a plain one, not only once its handshake is done: connections that never finish a handshake
    hold their place, and give it back when they go (a failed handshake too)."""
    gw = await gateway_factory(**_tls_files(tmp_path), max_connections=3, max_connections_per_address=2)
    port = gw.port
    stuck = [await asyncio.to_thread(_tcp, port, "127.0.0.2") for _ in range(2)]
    await wait_until(lambda: gw.admission.by_address.get("127.0.0.2") == 2,
                     lambda: f"2 connections in their handshake counted, not {dict(gw.admission.by_address)}")
    head = await asyncio.to_thread(_wss_upgrade, port, "127.0.0.2")
    assert head.startswith(b"HTTP/1.1 429 "), head  # the per-address cap, reached by handshaking ones
    await wait_until(lambda: gw.admission.open == 2, "the refused connection counted out")
    assert (await asyncio.to_thread(_wss_upgrade, port, "127.0.0.3")).startswith(b"HTTP/1.1 101")
    await wait_until(lambda: gw.admission.open == 2, "the upgraded one's close counted out")
    kept = _tcp(port, "127.0.0.4")  # the third connection: at --max-connections, none over it
    await wait_until(lambda: gw.admission.open == 3, "the third connection counted")
    head = await asyncio.to_thread(_wss_upgrade, port, "127.0.0.3")
    assert head.startswith(b"HTTP/1.1 503 "), head  # --max-connections, reached by handshaking ones
    assert gw.admission.hits["max_connections"] == 1 and gw.admission.hits["max_connections_per_address"] == 1
    # their places come back: one closes before its handshake, one fails it with bytes that are not TLS
    stuck[0].close()
    stuck[1].sendall(b"GET / HTTP/1.1\r\n\r\n")
    await wait_until(lambda: "127.0.0.2" not in gw.admission.by_address,
                     lambda: f"the failed handshakes counted out, not {dict(gw.admission.by_address)}")
    assert stuck[1].recv(4096) == b""  # closed without an HTTP answer in plain text
    kept.close()
    await wait_until(lambda: gw.admission.open == 0, lambda: f"every connection counted out ({gw.admission.open})")
    assert (await asyncio.to_thread(_wss_upgrade, port, "127.0.0.2")).startswith(b"HTTP/1.1 101")
    stuck[1].close()
    # and a well-behaved TLS client is served end to end meanwhile
    _, client_ctx = contexts()
    ws = await connected(f"wss://127.0.0.1:{port}/ws", ssl=client_ctx)
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/tls/limits"}]})
    assert (await recv_until(ws, "subscribed"))["seq"] == 0
    await ws.close()


async def test_tls_handshake_that_never_starts_gets_the_handshake_timeout(gateway_factory, tmp_path):
    """A TCP connection to the TLS port that sends nothing is closed by the same handshake timeout as a
    plain connection whose HTTP request never ends, and counted as such."""
    gw = await gateway_factory(**_tls_files(tmp_path), handshake_timeout_ms=300)
    sock = await asyncio.to_thread(_tcp, gw.port, "127.0.0.1")
    await wait_until(lambda: gw.admission.open == 1, "the connection counted")
    assert await asyncio.to_thread(sock.recv, 4096) == b""  # closed by the gateway, no answer
    sock.close()
    await wait_until(lambda: gw.admission.open == 0, "the connection counted out")
    assert gw.admission.hits["handshake_timeout"] == 1


async def test_tls_request_head_that_never_ends_is_dropped_at_the_handshake_timeout(gateway_factory, tmp_path):
    """TLS done, then an HTTP request head that never ends (a slowloris over TLS): dropped without an
    answer at the handshake timeout, and its place under the connection limits given back then. Before:
    the gateway closed it politely, a TLS close_notify awaiting the peer's, so the connection stayed
    open and counted for the TLS layer's shutdown timeout (30 s) past the handshake timeout."""
    gw = await gateway_factory(**_tls_files(tmp_path), handshake_timeout_ms=300)
    _, client_ctx = contexts()

    def slowloris() -> ssl.SSLSocket:
        tls = client_ctx.wrap_socket(_tcp(gw.port, "127.0.0.1"), server_hostname="127.0.0.1")
        tls.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
        return tls

    tls = await asyncio.to_thread(slowloris)
    try:
        await wait_until(lambda: gw.admission.hits["handshake_timeout"] == 1, "the handshake timeout")
        await wait_until(lambda: gw.admission.open == 0, lambda: f"the connection counted out ({gw.admission.open})")
        assert gw._unconnected == {} and gw.sessions == set()

        def read_all() -> bytes:
            got = b""
            try:
                while chunk := tls.recv(4096):
                    got += chunk
            except (ssl.SSLError, ConnectionResetError):
                pass
            return got

        assert await asyncio.to_thread(read_all) == b""  # no answer
    finally:
        tls.close()


async def test_tls_client_that_keeps_the_connection_after_an_answer_is_dropped(gateway_factory, tmp_path):
    """A TLS client that gets a plain answer (here /healthz) and then neither closes nor answers the
    gateway's close_notify: its connection is aborted `close_grace` after the answer, as a WebSocket is
    after its close frame. Before: it stayed open, and counted under the connection limits, for the TLS
    layer's shutdown timeout (30 s); a client could hold a place that long for each request."""
    gw = await gateway_factory(**_tls_files(tmp_path))
    gw.close_grace = 0.2
    _, client_ctx = contexts()

    def ask() -> tuple[ssl.SSLSocket, bytes]:
        tls = client_ctx.wrap_socket(_tcp(gw.port, "127.0.0.1"), server_hostname="127.0.0.1")
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return tls, read_head(tls)

    tls, head = await asyncio.to_thread(ask)
    try:
        assert head.startswith(b"HTTP/1.1 200 "), head
        await wait_until(lambda: gw.admission.open == 0, lambda: f"the connection counted out ({gw.admission.open})")
    finally:
        tls.close()
