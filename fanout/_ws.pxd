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
#   * a message in more than max_fragments frames                 -> 1009
# Pings are answered with a pong of the same payload through the queue
# (behind whatever is queued, so the byte order holds); pongs and every other
# byte only refresh last_recv. After the peer's close frame, input is ignored.
# A ping flood costs its sender: at most max_pongs pongs wait in the queue at
# a time (counted since the queue was last empty); a ping beyond that is not
# answered (RFC 6455 5.5.3 lets an endpoint skip pongs it still owes), and
# counted in Writer.pongs_dropped. Each pong is a Python object of its own,
# so max_pending (payload bytes) alone would let one connection hold millions.
#
# Input pause (ws_pause_input / ws_resume_input): the subclass may stop input
# after the message it is handling (e.g. a client over its publish rate). The
# transport stops reading, parsing stops after the current frame, and the
# bytes already read but not parsed are held (the bytes object and an offset:
# never copied) until ws_resume_input() parses them, in order, before
# anything read later. So input the subclass is not ready for costs nothing
# but the socket's own buffer, and TCP flow control slows the sender down.

from fanout._writer cimport Conn, Writer


# The connection's input state (Python: fanout.WSState in _enums.py, from WSConn.ws_state).
cdef enum:
    WS_HTTP = 0     # before the upgrade: bytes go to http_received()
    WS_OPEN = 1     # frames are parsed
    WS_DONE = 2     # close received, protocol error, or closed: input ignored

# The close codes this layer reports to ws_close / ws_fail (RFC 6455 7.4.1;
# Python: fanout.CloseCode in _enums.py, same values).
cdef enum:
    CLOSE_PROTOCOL_ERROR_C = 1002   # the peer broke RFC 6455
    CLOSE_NO_STATUS_C = 1005        # the peer's close frame had no code (never sent on the wire)
    CLOSE_INVALID_DATA_C = 1007     # a close reason that is not UTF-8
    CLOSE_TOO_BIG_C = 1009          # a message over max_message, or in too many frames


cdef class WSConn(Conn):
    cdef object _rbuf             # bytearray: the start of an incomplete frame; else None
    cdef list _frags              # payloads of the fragmented message so far; else None
    cdef object _held             # input paused: bytes read but not parsed yet (from _held_off); else None
    cdef Py_ssize_t _held_off
    cdef Py_ssize_t _frag_size
    cdef Py_ssize_t _max_message
    cdef unsigned short _frag_count   # frames of the fragmented message so far
    cdef unsigned short _max_frags
    cdef unsigned short _pongs        # pongs queued since the queue was last empty
    cdef unsigned short _max_pongs
    cdef unsigned char _frag_op
    cdef unsigned char _state
    cdef unsigned char _in_paused     # ws_pause_input() called, not resumed yet

    cdef int _feed(self, bytes data, Py_ssize_t off) except -1
    cdef Py_ssize_t _parse(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef int _frame(self, int opcode, bint fin, bytes payload) except -1
    cdef int _control(self, int opcode, bytes payload) except -1
    cdef int _fail(self, int code, str reason) except -1
