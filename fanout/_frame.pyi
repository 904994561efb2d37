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

def encode_frame(opcode: int, payload: _BytesLike) -> bytes: ...
def encode_text(payload: _BytesLike) -> bytes: ...
def encode_close(code: int, reason: _BytesLike = b"") -> bytes: ...
