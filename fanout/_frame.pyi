from typing import Final

__all__ = ["OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG", "encode_frame", "encode_text",
           "encode_close"]

OP_CONT: Final[int]
OP_TEXT: Final[int]
OP_BINARY: Final[int]
OP_CLOSE: Final[int]
OP_PING: Final[int]
OP_PONG: Final[int]

_BytesLike = bytes | bytearray | memoryview

def encode_frame(opcode: int, payload: _BytesLike) -> bytes:
    """One complete server frame (FIN set, unmasked) carrying ``payload``.

    Args:
        opcode: one of the OP_* constants (any integer with ``__index__``).
        payload: the frame's payload, copied once into the result.
    Returns:
        The frame: header and payload in one bytes object, ready to be shared by many queues.
    Raises:
        ValueError: ``opcode`` is not a WebSocket opcode, or a control frame's payload is over 125 bytes.
        TypeError: ``opcode`` is not an integer, or ``payload`` is not bytes-like.
        BufferError: ``payload`` is a non-contiguous memoryview.
    """

def encode_text(payload: _BytesLike) -> bytes:
    """``encode_frame(OP_TEXT, payload)``; ``payload`` must already be UTF-8 (it is not checked).

    Args:
        payload: the text message as UTF-8 bytes.
    Returns:
        The text frame.
    Raises:
        TypeError: ``payload`` is not bytes-like.
        BufferError: ``payload`` is a non-contiguous memoryview.
    """

def encode_close(code: int, reason: _BytesLike = b"") -> bytes:
    """A close frame with status ``code`` and a UTF-8 ``reason``.

    Args:
        code: a close code that may be sent (1000-4999 except 1004, 1005, 1006 and 1015).
        reason: at most 123 bytes of UTF-8.
    Returns:
        The close frame.
    Raises:
        ValueError: the code may not be sent, or the reason is longer than 123 bytes.
        UnicodeDecodeError: the reason is not valid UTF-8 (a peer would fail the connection with 1007).
        TypeError: ``code`` is not an integer, or ``reason`` is not bytes-like.
    """
