"""A deliberately tiny, independent decoder of server-to-client WebSocket frames (RFC 6455 5.2)."""

from __future__ import annotations

from typing import NamedTuple


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes


def decode_stream(data: bytes) -> tuple[list[Frame], bytes]:
    """All complete frames at the start of ``data`` and the incomplete rest."""
    frames: list[Frame] = []
    pos = 0
    while True:
        if len(data) - pos < 2:
            break
        b0, b1 = data[pos], data[pos + 1]
        assert b0 & 0x70 == 0, "RSV bits set"
        assert b1 & 0x80 == 0, "server frames must not be masked"
        size = b1 & 0x7F
        hlen = 2
        if size == 126:
            hlen = 4
            if len(data) - pos < hlen:
                break
            size = int.from_bytes(data[pos + 2:pos + 4], "big")
            assert size > 125, "16-bit length form used for a short payload"
        elif size == 127:
            hlen = 10
            if len(data) - pos < hlen:
                break
            size = int.from_bytes(data[pos + 2:pos + 10], "big")
            assert 0xFFFF < size < 2**63, "64-bit length form misused"
        if len(data) - pos < hlen + size:
            break
        frames.append(Frame(bool(b0 & 0x80), b0 & 0x0F, bytes(data[pos + hlen:pos + hlen + size])))
        pos += hlen + size
    return frames, bytes(data[pos:])


def decode_all(data: bytes) -> list[Frame]:
    frames, rest = decode_stream(data)
    assert rest == b"", f"{len(rest)} trailing bytes: the stream ends inside a frame"
    return frames
