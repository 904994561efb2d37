"""atheris harness: the HTTP request head parser and the upgrade checks (gateway/http.py).

Input: one byte k (0..7 used), k big-endian u16 cut positions, then the bytes a client sends. Oracle:
support.fuzz_targets.check_http (a complete request, HttpError 400/431 with a well-formed response, or
a wait for more; the same outcome however the bytes are cut; a 101 only for a valid RFC 6455 upgrade
with the right accept key).
"""

from __future__ import annotations

import _harness

from support.fuzz_targets import check_http


def test_one_input(data: bytes) -> None:
    if not data:
        return
    cuts, rest = _harness.u16_cuts(data[1:], data[0] & 7)
    check_http(_harness.cut(rest, cuts))


def seeds() -> list[bytes]:
    upgrades = [
        # what the websockets library sends (tests/support/ws.py uses it)
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8800\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: p0MftcLmRN8flCUiIszq6g==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        # a browser's upgrade (Chromium), with extensions offered and an Origin
        b"GET /ws?token=abc HTTP/1.1\r\nHost: localhost:8800\r\nConnection: Upgrade\r\nPragma: no-cache\r\n"
        b"Cache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0\r\n"
        b"Upgrade: websocket\r\nOrigin: http://localhost:8800\r\nSec-WebSocket-Version: 13\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    ]
    plain = [b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", b"HEAD / HTTP/1.0\r\n\r\n",
             b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
             b"POST /ws HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
             b"GET /ws HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"]
    frame = b"\x81\x85abcd" + bytes(b ^ k for b, k in zip(b"hello", b"abcdabcd"))
    out = [b"\x00" + u for u in upgrades] + [b"\x00" + p for p in plain]
    out += [b"\x02" + _harness.encode_cuts([5, 40]) + upgrades[0] + frame,
            b"\x01" + _harness.encode_cuts([len(upgrades[1]) - 3]) + upgrades[1]]
    return out


if __name__ == "__main__":
    _harness.main(test_one_input, seeds)
