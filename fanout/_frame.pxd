# Declarations other Cython modules cimport to build frames without a
# Python-level call (e.g. `from fanout._frame cimport encode_text`).

cdef enum:
    OP_CONT_C = 0x0
    OP_TEXT_C = 0x1
    OP_BINARY_C = 0x2
    OP_CLOSE_C = 0x8
    OP_PING_C = 0x9
    OP_PONG_C = 0xA

# Bytes the header of an unmasked server frame with `size` payload bytes takes.
cdef Py_ssize_t header_size(Py_ssize_t size) noexcept nogil
# Writes the header into `out` (header_size(size) bytes of room); returns its length.
cdef Py_ssize_t write_header(unsigned char* out, unsigned char opcode, Py_ssize_t size) noexcept nogil
# One allocation: the header goes into the headroom of the result, the payload after it.
cdef bytes build_frame(unsigned char opcode, const char* data, Py_ssize_t size)

# Python-level integers are taken through __index__ (a float is a TypeError, as in the twin).
cpdef bytes encode_frame(object opcode, object payload)
cpdef bytes encode_text(object payload)
cpdef bytes encode_close(object code, object reason=*)
