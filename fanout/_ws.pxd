# The server side of one WebSocket connection: an asyncio protocol whose
# input (client frames, RFC 6455 5.2-5.5) is parsed here and whose output is
# the Conn's queue (see _writer.pxd).
#
# Why it is one object: per-connection memory is the cost that decides how
# many idle users one process holds. The protocol object *is* the Conn (a cdef
# subclass), and what it keeps while idle is a few C fields: the read buffer
# exists only while a frame is incomplete, the fragment list only while a
# fragmented message is being received. The HTTP upgrade is the subclass's
# (http_received): the gateway parses it with httptools and then calls
# ws_open(), which registers the Conn with the Writer.
#
# Input rules (a violation calls ws_fail(code, reason) once and ignores all
# later input; the subclass sends the close frame):
#   * every client frame is masked; RSV1-3 are 0 (no extension is ever
#     negotiated); opcodes 0, 1, 2, 8, 9, 10 only                   -> 1002
#   * control frames: FIN set, payload <= 125 bytes; a close payload is
#     empty or a valid code (+ UTF-8 reason)                         -> 1002 / 1007
#   * a data frame or a reassembled message larger than max_message is
#     refused from its header, before its payload is buffered        -> 1009
#   * continuation only inside a fragmented message, a new data frame
#     only outside one                                               -> 1002
# Pings are answered with a pong of the same payload through the queue
# (behind whatever is queued, so the byte order holds); pongs and every other
# byte only refresh last_recv. After the peer's close frame, input is ignored.

from fanout._writer cimport Conn, Writer


cdef enum:
    WS_HTTP = 0     # before the upgrade: bytes go to http_received()
    WS_OPEN = 1     # frames are parsed
    WS_DONE = 2     # close received, protocol error, or closed: input ignored


cdef class WSConn(Conn):
    cdef object _rbuf             # bytearray: the start of an incomplete frame; else None
    cdef list _frags              # payloads of the fragmented message so far; else None
    cdef Py_ssize_t _frag_size
    cdef int _frag_op
    cdef int _state
    cdef Py_ssize_t _max_message

    cdef Py_ssize_t _parse(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef int _frame(self, int opcode, bint fin, bytes payload) except -1
    cdef int _control(self, int opcode, bytes payload) except -1
    cdef int _fail(self, int code, str reason) except -1
