from typing import Final

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
