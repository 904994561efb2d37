"""Server-side WebSocket frames (RFC 6455 section 5.2): FIN set, never masked.

A frame is encoded once per publication and the same bytes object is then
shared by every subscriber's queue, so encoding is the only copy of a payload
the fan-out path makes.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.number cimport PyNumber_Index
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcpy

OP_CONT = OP_CONT_C
OP_TEXT = OP_TEXT_C
OP_BINARY = OP_BINARY_C
OP_CLOSE = OP_CLOSE_C
OP_PING = OP_PING_C
OP_PONG = OP_PONG_C

__all__ = [
    "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
    "encode_frame", "encode_text", "encode_close",
]


cdef Py_ssize_t header_size(Py_ssize_t size) noexcept nogil:
    if size <= 125:
        return 2
    if size <= 0xFFFF:
        return 4
    return 10


cdef Py_ssize_t write_header(unsigned char* out, unsigned char opcode, Py_ssize_t size) noexcept nogil:
    cdef unsigned long long n = <unsigned long long>size
    cdef int i
    out[0] = 0x80 | opcode
    if size <= 125:
        out[1] = <unsigned char>size
        return 2
    if size <= 0xFFFF:
        out[1] = 126
        out[2] = <unsigned char>(n >> 8)
        out[3] = <unsigned char>n
        return 4
    out[1] = 127
    for i in range(8):
        out[2 + i] = <unsigned char>(n >> (56 - 8 * i))
    return 10


cdef bytes build_frame(unsigned char opcode, const char* data, Py_ssize_t size):
    cdef Py_ssize_t hlen = header_size(size)
    # Allocated uninitialised and filled in place: no intermediate header object
    # and no concatenation copy.
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hlen + size)
    cdef char* buf = PyBytes_AS_STRING(out)
    write_header(<unsigned char*>buf, opcode, size)
    if size:
        memcpy(buf + hlen, data, <size_t>size)
    return out


cdef inline bint _valid_opcode(int opcode) noexcept nogil:
    return opcode == 0 or opcode == 1 or opcode == 2 or opcode == 8 or opcode == 9 or opcode == 10


cdef bytes _encode_checked(int opcode, object payload):
    cdef Py_buffer view
    cdef bytes out
    if not _valid_opcode(opcode):
        raise ValueError(f"invalid opcode {opcode:#x}")
    if PyBytes_CheckExact(payload):
        if opcode >= 8 and PyBytes_GET_SIZE(payload) > 125:
            raise ValueError("control frame payload longer than 125 bytes")
        return build_frame(<unsigned char>opcode, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
    # bytearray / memoryview: PyBUF_SIMPLE refuses non-contiguous buffers, which
    # keeps the result equal to the bytes the caller sees.
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        if opcode >= 8 and view.len > 125:
            raise ValueError("control frame payload longer than 125 bytes")
        out = build_frame(<unsigned char>opcode, <const char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return out


cpdef bytes encode_frame(object opcode, object payload):
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
    cdef int op = PyNumber_Index(opcode)
    return _encode_checked(op, payload)


cpdef bytes encode_text(object payload):
    """``encode_frame(OP_TEXT, payload)``; ``payload`` must already be UTF-8 (it is not checked).

    Args:
        payload: the text message as UTF-8 bytes.
    Returns:
        The text frame.
    Raises:
        TypeError: ``payload`` is not bytes-like.
        BufferError: ``payload`` is a non-contiguous memoryview.
    """
    if PyBytes_CheckExact(payload):
        return build_frame(OP_TEXT_C, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
    return _encode_checked(OP_TEXT_C, payload)


cdef inline bint _valid_close_code(int code) noexcept nogil:
    # RFC 6455 7.4: 1004/1005/1006/1015 are reserved for local reporting and
    # must never appear on the wire; below 1000 and from 5000 on are unassigned.
    if code < 1000 or code > 4999:
        return False
    return not (code == 1004 or code == 1005 or code == 1006 or code == 1015)


cpdef bytes encode_close(object code, object reason=b""):
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
    cdef int c = PyNumber_Index(code)
    cdef Py_buffer view
    cdef bytes out
    cdef char payload[125]
    if not _valid_close_code(c):
        raise ValueError(f"invalid close code {c}")
    PyObject_GetBuffer(reason, &view, PyBUF_SIMPLE)
    try:
        if view.len > 123:
            raise ValueError("close reason longer than 123 bytes")
        # The peer fails the connection with 1007 on a bad reason; better to fail here.
        PyUnicode_DecodeUTF8(<const char*>view.buf, view.len, "strict")
        payload[0] = <char>(c >> 8)
        payload[1] = <char>(c & 0xFF)
        if view.len:
            memcpy(payload + 2, view.buf, <size_t>view.len)
        out = build_frame(OP_CLOSE_C, payload, view.len + 2)
    finally:
        PyBuffer_Release(&view)
    return out
