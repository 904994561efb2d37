"""Server frame encoding (RFC 6455 5.2), checked against the spec's own examples and two independent decoders."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from support import fanout_impls
from support.fanout_ws import Frame, decode_all


@pytest.fixture(scope="module", params=fanout_impls.IMPL_PARAMS)
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    return fanout_impls.load(request.param)


def wsproto_frames(data: bytes) -> list[Any]:
    """Decode as a client would, with wsproto (which also validates UTF-8 and close codes)."""
    proto = FrameProtocol(client=True, extensions=[])
    proto.receive_bytes(data)
    return list(proto.received_frames())


# RFC 6455 section 5.7, the unmasked examples (a server never masks).
@pytest.mark.parametrize(
    ("opcode_name", "payload", "expected"),
    [
        ("OP_TEXT", b"Hello", "810548656c6c6f"),
        ("OP_PING", b"Hello", "890548656c6c6f"),
        ("OP_PONG", b"Hello", "8a0548656c6c6f"),
        ("OP_BINARY", bytes(256), "827e0100" + "00" * 256),
        ("OP_BINARY", bytes(65536), "827f0000000000010000" + "00" * 65536),
    ],
)
def test_rfc6455_examples(impl: SimpleNamespace, opcode_name: str, payload: bytes, expected: str) -> None:
    assert impl.encode_frame(getattr(impl, opcode_name), payload).hex() == expected


def test_opcode_values(impl: SimpleNamespace) -> None:
    ops = (impl.OP_CONT, impl.OP_TEXT, impl.OP_BINARY, impl.OP_CLOSE, impl.OP_PING, impl.OP_PONG)
    assert ops == (0, 1, 2, 8, 9, 10)


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, "8100"),
        (1, "8101"),
        (125, "817d"),
        (126, "817e007e"),
        (127, "817e007f"),
        (65535, "817effff"),
        (65536, "817f0000000000010000"),
        (65537, "817f0000000000010001"),
        (1 << 20, "817f0000000000100000"),
    ],
)
def test_length_forms_at_the_boundaries(impl: SimpleNamespace, size: int, header: str) -> None:
    payload = bytes(i % 251 for i in range(size))
    frame = impl.encode_text(payload)
    assert frame[: len(header) // 2].hex() == header
    assert frame[len(header) // 2:] == payload
    assert decode_all(frame) == [Frame(True, 1, payload)]
    assert frame == impl.encode_frame(impl.OP_TEXT, payload)


def test_wsproto_reads_what_we_write(impl: SimpleNamespace) -> None:
    stream = (
        impl.encode_text("héllo".encode())
        + impl.encode_frame(impl.OP_BINARY, b"\x00\xff" * 40000)
        + impl.encode_frame(impl.OP_PING, b"p")
        + impl.encode_close(4000, b"slow consumer")
    )
    frames = wsproto_frames(stream)
    assert [(f.opcode, f.frame_finished, f.message_finished) for f in frames] == [
        (Opcode.TEXT, True, True),
        (Opcode.BINARY, True, True),
        (Opcode.PING, True, True),
        (Opcode.CLOSE, True, True),
    ]
    assert frames[0].payload == "héllo"
    assert frames[1].payload == b"\x00\xff" * 40000
    assert frames[2].payload == b"p"
    assert tuple(frames[3].payload) == (4000, "slow consumer")


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (1000, b"", "880203e8"),
        (1001, b"", "880203e9"),
        (4000, b"", "88020fa0"),
        (1008, b"bad", "880503f0626164"),
        (1011, b"x" * 123, "887d03f3" + "78" * 123),
    ],
)
def test_close_frames(impl: SimpleNamespace, code: int, reason: bytes, expected: str) -> None:
    frame = impl.encode_close(code, reason)
    assert frame.hex() == expected
    (parsed,) = wsproto_frames(frame)
    assert tuple(parsed.payload) == (code, reason.decode())


def test_close_default_reason_is_empty(impl: SimpleNamespace) -> None:
    assert impl.encode_close(1000) == bytes.fromhex("880203e8")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 5000, 65535, -1])
def test_close_codes_that_must_not_be_sent(impl: SimpleNamespace, code: int) -> None:
    with pytest.raises(ValueError, match="close code"):
        impl.encode_close(code)


def test_close_reason_limits(impl: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="123"):
        impl.encode_close(1000, b"x" * 124)
    with pytest.raises(UnicodeDecodeError):
        impl.encode_close(1000, b"\xff")


@pytest.mark.parametrize("opcode", [3, 7, 11, 15, 16, -1])
def test_reserved_opcodes_refused(impl: SimpleNamespace, opcode: int) -> None:
    with pytest.raises(ValueError, match="opcode"):
        impl.encode_frame(opcode, b"")


@pytest.mark.parametrize("name", ["OP_CLOSE", "OP_PING", "OP_PONG"])
def test_control_frames_at_most_125_bytes(impl: SimpleNamespace, name: str) -> None:
    assert len(impl.encode_frame(getattr(impl, name), bytes(125))) == 127
    with pytest.raises(ValueError, match="125"):
        impl.encode_frame(getattr(impl, name), bytes(126))


def test_bytes_like_payloads(impl: SimpleNamespace) -> None:
    expected = impl.encode_text(b"abc")
    assert impl.encode_text(bytearray(b"abc")) == expected
    assert impl.encode_text(memoryview(b"xabcx")[1:4]) == expected
    assert impl.encode_frame(impl.OP_TEXT, bytearray(b"abc")) == expected
    assert impl.encode_close(1000, bytearray(b"ok")) == impl.encode_close(1000, b"ok")


def test_non_bytes_payloads_refused(impl: SimpleNamespace) -> None:
    with pytest.raises(TypeError):
        impl.encode_text("text")
    with pytest.raises(TypeError):
        impl.encode_text(None)
    with pytest.raises(TypeError):
        impl.encode_frame(1.0, b"")
    with pytest.raises(BufferError):
        impl.encode_text(memoryview(b"abcdef")[::2])


data_opcodes = st.sampled_from([0, 1, 2])


@given(opcode=data_opcodes, payload=st.binary(max_size=300), pad=st.sampled_from([0, 65300, 70000]))
def test_round_trip(impl: SimpleNamespace, opcode: int, payload: bytes, pad: int) -> None:
    payload += b"\x5a" * pad
    frame = impl.encode_frame(opcode, payload)
    assert decode_all(frame) == [Frame(True, opcode, payload)]
    assert decode_all(frame * 3) == [Frame(True, opcode, payload)] * 3


@given(text=st.text(max_size=200))
def test_text_round_trip_through_wsproto(impl: SimpleNamespace, text: str) -> None:
    (frame,) = wsproto_frames(impl.encode_text(text.encode()))
    assert frame.opcode is Opcode.TEXT and frame.payload == text and frame.message_finished


@given(code=st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 3000, 4000, 4999]),
       reason=st.text(max_size=30))
def test_close_round_trip(impl: SimpleNamespace, code: int, reason: str) -> None:
    (frame,) = wsproto_frames(impl.encode_close(code, reason.encode()))
    assert tuple(frame.payload) == (code, reason)


reference = fanout_impls.load("reference")


@pytest.mark.skipif(fanout_impls.NO_EXTENSIONS, reason="FANOUT_NO_EXTENSIONS=1")
@given(opcode=st.integers(-2, 17), payload=st.binary(max_size=200), pad=st.sampled_from([0, 65400]))
def test_parity_with_reference(opcode: int, payload: bytes, pad: int) -> None:
    compiled = fanout_impls.load("compiled")
    payload += b"\x01" * pad

    def outcome(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # the same exception type is part of the contract
            return type(exc)

    assert outcome(compiled.encode_frame, opcode, payload) == outcome(reference.encode_frame, opcode, payload)
    assert outcome(compiled.encode_text, payload) == outcome(reference.encode_text, payload)
    code = 1000 + opcode * 250
    assert outcome(compiled.encode_close, code, payload[:130]) == outcome(reference.encode_close, code, payload[:130])
