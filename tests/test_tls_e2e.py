"""wss:// and https:// when the gateway is given a certificate (fanout writes through the TLS transport)."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request

import pytest

from conftest import SCALE
from support.fanout_tls import _cert_pem, contexts
from support.ws import connected, recv, recv_until, send

pytestmark = pytest.mark.both_loops


async def _seqs(ws, n: int) -> list[int]:
    return [(await recv_until(ws, "msg", timeout=10 * SCALE))["seq"] for _ in range(n)]


async def test_tls_publish_subscribe_and_https(gateway_factory, tmp_path):
    cert_pem, key_pem = _cert_pem()
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    gw = await gateway_factory(tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem"))
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
