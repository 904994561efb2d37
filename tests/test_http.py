"""gateway.http, sans-I/O: the request that opens a connection, fed in any pieces; upgrade checks."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import http

UPGRADE = (b"GET /ws?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def feed_all(data: bytes, cuts: list[int]) -> http.Request:
    req = http.Request()
    pos = 0
    done = False
    for cut in sorted(set(cuts)) + [len(data)]:
        if pos < cut <= len(data):
            assert not done, "complete before the last piece"
            done = req.feed(data[pos:cut])
            pos = cut
    assert done
    return req


@given(cuts=st.lists(st.integers(1, len(UPGRADE) + 20), max_size=15))
def test_upgrade_in_any_pieces_with_frames_behind_it(cuts):
    frames = b"\x81\x85abcd" + bytes(b ^ k for b, k in zip(b"hello", b"abcdabcd"))
    req = feed_all(UPGRADE + frames, [c for c in cuts if c < len(UPGRADE)])
    assert req.upgrade and req.method == b"GET" and req.path == b"/ws"
    assert req.rest == frames
    answer = http.check_upgrade(req)
    # RFC 6455 section 1.3's example key and accept value
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert answer.endswith(b"\r\n\r\n")


def test_accept_key_matches_the_rfc_formula():
    key = base64.b64encode(b"0123456789abcdef")
    want = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert http.accept_key(key) == want


def _req(raw: bytes) -> http.Request:
    req = http.Request()
    assert req.feed(raw)
    return req


@pytest.mark.parametrize("raw,status", [
    (UPGRADE.replace(b"Version: 13", b"Version: 8"), 426),
    (UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ="), 400),   # 5 bytes, not 16
    (UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"!!!"), 400),
    (UPGRADE.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""), 400),
    (UPGRADE.replace(b"GET", b"PUT"), 400),
    (UPGRADE.replace(b"Upgrade: WebSocket", b"Upgrade: h2c"), 426),
    (b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n", 426),
    # a body: its bytes would be read as the first WebSocket frames (a proxy that forwards it as the
    # request's body and the gateway would disagree on where the frames start)
    (UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello"), 400),
    (UPGRADE.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), 400),
    # RFC 6455 4.2.1: an HTTP/1.1 (or higher) GET with a Host (RFC 9112 3.2: exactly one)
    (UPGRADE.replace(b"Host: a\r\n", b""), 400),
    (UPGRADE.replace(b"Host: a\r\n", b"Host: a\r\nHost: b\r\n"), 400),
    (UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"), 400),
])
def test_bad_upgrades(raw, status):
    with pytest.raises(http.HttpError) as info:
        http.check_upgrade(_req(raw))
    assert info.value.status == status
    answer = info.value.response()
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close\r\n" in answer


def test_upgrade_with_an_empty_body_is_accepted():
    req = _req(UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"))
    assert http.check_upgrade(req).startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize("target,path", [(b"http://gw.example:8800/ws?x=1", b"/ws"), (b"HTTPS://gw.example/ws", b"/ws"),
                                         (b"http://gw.example", b"/"), (b"http://gw.example?x", b"/"),
                                         (b"/ws?http://a/b", b"/ws")])
def test_absolute_form_request_target_has_the_path_of_its_url(target, path):
    """RFC 9112 3.2.2: a server MUST accept the absolute-form (what a client sends to a proxy; some send
    it to the server itself). Before: its path was the whole URL, so `GET http://host/ws` got 404."""
    req = _req(UPGRADE.replace(b"/ws?x=1", target))
    assert req.path == path


def test_garbage_and_oversized_heads():
    with pytest.raises(http.HttpError) as info:
        http.Request().feed(b"\x16\x03\x01\x02\x00 hello\r\n\r\n")  # a TLS ClientHello on a plain port
    assert info.value.status == 400
    req = http.Request()
    assert not req.feed(b"GET /ws HTTP/1.1\r\n")
    with pytest.raises(http.HttpError) as info:
        for _ in range(100):
            req.feed(b"X-Pad: " + b"a" * 500 + b"\r\n")  # never-ending headers, in pieces
    assert info.value.status == 431


def test_plain_request_and_responses():
    req = _req(b"HEAD /healthz?verbose HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert (req.method, req.path, req.upgrade) == (b"HEAD", b"/healthz", False)
    assert req.header(b"x-a") == b"1, 2"  # repeated headers are joined
    full = http.response(200, b"{}", "application/json")
    head = http.response(200, b"{}", "application/json", head_only=True)
    assert full == head + b"{}" and b"Content-Length: 2\r\n" in head


@pytest.mark.parametrize("second", [b"GET /metrics HTTP/1.1\r\nHost: b\r\n\r\n", b"NOT HTTP AT ALL\r\n\r\n",
                                    b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"])
def test_pipelined_requests_parse_only_the_first(second):
    """A second request in the same piece is not merged into the first (its URL appended to ours) nor
    judged: the first is answered and the connection closed (no keep-alive)."""
    req = http.Request()
    assert req.feed(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n" + second)
    assert (req.method, req.path, req.upgrade, req.header(b"host")) == (b"GET", b"/healthz", False, b"a")
    assert req.feed(b"GET /more HTTP/1.1\r\n\r\n") and req.path == b"/healthz"
