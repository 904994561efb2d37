"""Server side of one WebSocket connection: client frames in, Conn's queue out.

The input rules and why the protocol object is the Conn are explained once, in _ws.pxd.
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.number cimport PyNumber_Index
from libc.stdint cimport uint64_t

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX
from libc.string cimport memcpy

from fanout._frame cimport OP_CONT_C, OP_PING_C, OP_PONG_C, build_frame

from fanout._enums import CloseCode, WSState

__all__ = ["CloseCode", "WSConn", "WSState"]

# ws_state's values, by the C state (the C enums in _ws.pxd are these enums' values: parity tests)
_STATES = (WSState(WS_HTTP), WSState(WS_OPEN), WSState(WS_DONE))
# the C close codes as named values (building this fails the import if one has no name in CloseCode)
_CODES = (CloseCode(CLOSE_PROTOCOL_ERROR_C), CloseCode(CLOSE_NO_STATUS_C), CloseCode(CLOSE_INVALID_DATA_C),
          CloseCode(CLOSE_TOO_BIG_C))

#: close codes a peer may send (RFC 6455 7.4.1 and the IANA registry up to 1014; 3000-4999 for applications)
cdef inline bint _valid_peer_code(int code) noexcept nogil:
    if code < 1000 or code > 4999:
        return False
    if code < 3000:
        return code <= 1014 and not (code == 1004 or code == 1005 or code == 1006)
    return True


cdef Py_ssize_t _frame_need(const unsigned char* p, Py_ssize_t n) noexcept:
    """Bytes the frame starting at p needs in all, as far as p[0:n] tells (at least n + 1 when unknown)."""
    cdef int len7
    cdef Py_ssize_t hlen
    cdef unsigned long long size = 0
    cdef int i
    if n < 2:
        return 2
    len7 = p[1] & 0x7F
    hlen = 6 if len7 < 126 else 8 if len7 == 126 else 14
    if n < hlen - 4:
        return hlen - 4
    if len7 < 126:
        size = <unsigned long long>len7
    elif len7 == 126:
        size = (<unsigned long long>p[2] << 8) | p[3]
    else:
        for i in range(8):
            size = (size << 8) | p[2 + i]
    if size > <unsigned long long>(PY_SSIZE_T_MAX - hlen):
        return n + 1  # absurd (the parser refuses it): just enough to let it see the header
    return hlen + <Py_ssize_t>size


cdef bytes _unmask(const unsigned char* src, Py_ssize_t n, const unsigned char* key):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char* dst = <unsigned char*>PyBytes_AS_STRING(out)
    cdef unsigned char k8[8]
    cdef uint64_t m, w
    cdef Py_ssize_t i = 0
    # The mask repeats every 4 bytes, so 8 bytes at a time XOR with key+key
    # whatever the byte order (memcpy keeps it unaligned-safe).
    memcpy(k8, key, 4)
    memcpy(k8 + 4, key, 4)
    memcpy(&m, k8, 8)
    while i + 8 <= n:
        memcpy(&w, src + i, 8)
        w ^= m
        memcpy(dst + i, &w, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ key[i & 3]
        i += 1
    return out


cdef class WSConn(Conn):
    """The server side of one WebSocket connection: an asyncio protocol whose client frames are
    parsed here and whose output is the Conn's queue (rules: _ws.pxd). Subclass it and implement
    the hooks: http_received() before ws_open(), then ws_message(), ws_close() and ws_fail().

    ``WSConn()``: a connection in state WSState.HTTP; a subclass's __init__ takes what it wants.
    """

    def __cinit__(self, *args, **kwargs):
        self._state = WS_HTTP
        self._rbuf = None
        self._frags = None
        self._held = None

    def ws_open(self, Writer writer not None, transport, max_pending, max_message, on_overflow, rest=b"",
                max_fragments=1024, max_pongs=16):
        """The upgrade is done: register the output queue (as Conn() does), then parse ``rest``.

        Args:
            writer, transport, max_pending, on_overflow: as for Conn().
            max_message: largest message in bytes (a frame or reassembled message over it fails 1009).
            rest: bytes the client sent after its HTTP request, parsed as frames now.
            max_fragments: frames one message may span, 1..65535 (default 1024; more fails 1009).
            max_pongs: pongs owed at once, 1..65535 (default 16; pings beyond are not answered).
        Raises:
            ValueError: ``max_message`` < 0, ``max_pending`` < 0, or a cap outside 1..65535.
            RuntimeError: called twice.
        """
        cdef Py_ssize_t limit = PyNumber_Index(max_message)
        cdef Py_ssize_t frags = PyNumber_Index(max_fragments)
        cdef Py_ssize_t pongs = PyNumber_Index(max_pongs)
        if limit < 0:
            raise ValueError("max_message must be >= 0")
        if not (1 <= frags <= 65535 and 1 <= pongs <= 65535):
            raise ValueError("max_fragments and max_pongs must be in 1..65535")
        if self._state != WS_HTTP:
            raise RuntimeError("ws_open() called twice")
        self._init(writer, transport, PyNumber_Index(max_pending), on_overflow)
        self._max_message = limit
        self._max_frags = <unsigned short>frags
        self._max_pongs = <unsigned short>pongs
        self._state = WS_OPEN
        if rest:
            self.data_received(rest)

    def data_received(self, data):
        """Bytes from the transport: to http_received() before ws_open(), then parsed as frames
        (held unparsed while input is paused, ignored once the state is DONE).
        """
        if self._state == WS_OPEN:
            self.last_recv = self._writer._loop.time()
            if not PyBytes_CheckExact(data):
                data = bytes(data)
            if self._in_paused:
                # Reading is paused, but a transport may still deliver what it had read (TLS).
                if self._held is None:
                    self._held = data
                else:
                    self._held = self._held[self._held_off:] + data
                self._held_off = 0
                return
            self._feed(data, 0)
        elif self._state == WS_HTTP:
            self.http_received(data)

    cdef int _feed(self, bytes data, Py_ssize_t off) except -1:
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t used, need, take
        cdef object buf = self._rbuf
        # An incomplete frame is waiting: move into it only the bytes that complete it (its header
        # first, then its payload), so the rest of `data` is parsed in place, not copied again.
        while buf is not None and self._state == WS_OPEN:
            need = _frame_need(<const unsigned char*>PyByteArray_AS_STRING(buf), PyByteArray_GET_SIZE(buf))
            take = need - PyByteArray_GET_SIZE(buf)
            if take > n - off:
                take = n - off
            if take > 0:
                buf += data[off:off + take]
                off += take
            # `buf` is not resized while _parse runs (only here), so the pointer stays valid.
            used = self._parse(<const unsigned char*>PyByteArray_AS_STRING(buf), PyByteArray_GET_SIZE(buf))
            if self._state != WS_OPEN or used == PyByteArray_GET_SIZE(buf):
                buf = self._rbuf = None
            elif used:
                del buf[:used]
            elif off == n:
                return 0  # still incomplete: wait for more
        if self._state != WS_OPEN or off == n:
            return 0
        if not self._in_paused:
            used = self._parse(p + off, n - off)
            off += used
            if off == n or self._state != WS_OPEN:
                return 0
        if self._in_paused:
            self._held = data  # parsed from _held_off on resume: no copy
            self._held_off = off
        else:
            self._rbuf = bytearray(data[off:])
        return 0

    def ws_pause_input(self):
        """Stop reading and parsing after the current message; idempotent, a no-op unless OPEN.

        Bytes already read are held (not copied) until ws_resume_input() parses them in order.
        """
        if self._in_paused or self._state != WS_OPEN:
            return
        self._in_paused = 1
        try:
            self._transport.pause_reading()
        except (AttributeError, RuntimeError):
            pass  # closing: nothing more will be read anyway

    def ws_resume_input(self):
        """Parse what was held, then read again (unless a hook paused again meanwhile); idempotent."""
        cdef object held
        if not self._in_paused:
            return
        self._in_paused = 0
        held = self._held
        self._held = None
        if held is not None and self._state == WS_OPEN:
            self._feed(<bytes>held, self._held_off)
        if not self._in_paused and self._state == WS_OPEN:  # parsing may have paused again
            try:
                self._transport.resume_reading()
            except (AttributeError, RuntimeError):
                pass

    @property
    def ws_input_paused(self):
        """True between ws_pause_input() and ws_resume_input()."""
        return self._in_paused != 0

    def eof_received(self):
        """The peer half-closed: returns None, so the transport closes and connection_lost follows."""
        return None  # the transport closes; connection_lost follows

    cdef Py_ssize_t _parse(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Handle every whole frame in p[0:n]; returns the bytes used."""
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t hlen, i
        cdef unsigned long long size
        cdef unsigned char b0, b1
        cdef int opcode, len7
        cdef bint fin
        cdef bytes payload
        while self._state == WS_OPEN and not self._in_paused and n - pos >= 2:
            b0 = p[pos]
            b1 = p[pos + 1]
            fin = (b0 & 0x80) != 0
            opcode = b0 & 0x0F
            len7 = b1 & 0x7F
            if b0 & 0x70:
                self._fail(CLOSE_PROTOCOL_ERROR_C, "reserved bits set without an extension")
                break
            if not (opcode <= 2 or 8 <= opcode <= 10):
                self._fail(CLOSE_PROTOCOL_ERROR_C, f"unknown opcode {opcode:#x}")
                break
            if not (b1 & 0x80):
                self._fail(CLOSE_PROTOCOL_ERROR_C, "client frames must be masked")
                break
            if opcode >= 8 and (not fin or len7 > 125):
                self._fail(CLOSE_PROTOCOL_ERROR_C, "control frames must be whole and at most 125 bytes")
                break
            if len7 < 126:
                hlen = 6
                size = <unsigned long long>len7
            elif len7 == 126:
                hlen = 8
                if n - pos < hlen - 4:  # the length is known before the mask key
                    break
                size = (<unsigned long long>p[pos + 2] << 8) | p[pos + 3]
            else:
                hlen = 14
                if n - pos < hlen - 4:  # the length is known before the mask key
                    break
                size = 0
                for i in range(8):
                    size = (size << 8) | p[pos + 2 + i]
                if size >> 63:
                    self._fail(CLOSE_PROTOCOL_ERROR_C, "frame length has its most significant bit set")
                    break
            # Refused from the header: an oversized payload is never buffered.
            if opcode < 8 and size + <unsigned long long>(self._frag_size if opcode == 0 else 0) > \
                    <unsigned long long>self._max_message:
                self._fail(CLOSE_TOO_BIG_C, "message larger than the limit")
                break
            if n - pos < hlen or <unsigned long long>(n - pos - hlen) < size:
                break
            payload = _unmask(p + pos + hlen, <Py_ssize_t>size, p + pos + hlen - 4)
            pos += hlen + <Py_ssize_t>size
            if opcode >= 8:
                self._control(opcode, payload)
            else:
                self._frame(opcode, fin, payload)
        return pos

    cdef int _frame(self, int opcode, bint fin, bytes payload) except -1:
        cdef list frags = self._frags
        cdef bytes whole
        if opcode == OP_CONT_C:
            if frags is None:
                return self._fail(CLOSE_PROTOCOL_ERROR_C, "continuation frame without a message to continue")
            if self._frag_count >= self._max_frags:
                self._writer.fragment_limit_hits += 1
                return self._fail(CLOSE_TOO_BIG_C, f"message in more than {self._max_frags} frames")
            self._frag_count += 1
            frags.append(payload)
            self._frag_size += PyBytes_GET_SIZE(payload)
            if fin:
                whole = b"".join(frags)
                self._frags = None
                self._frag_size = 0
                self.ws_message(self._frag_op, whole)
            return 0
        if frags is not None:
            return self._fail(CLOSE_PROTOCOL_ERROR_C, "new message inside a fragmented one")
        if fin:
            self.ws_message(opcode, payload)
        else:
            self._frags = [payload]
            self._frag_size = PyBytes_GET_SIZE(payload)
            self._frag_count = 1
            self._frag_op = <unsigned char>opcode
        return 0

    cdef int _control(self, int opcode, bytes payload) except -1:
        cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(payload)
        cdef int code
        if opcode == OP_PING_C:
            if self._closed:
                return 0
            if self._queue is None and not self._paused:
                self._pongs = 0  # every pong queued before has been written
            if self._pongs >= self._max_pongs:
                self._writer.pongs_dropped += 1
                return 0
            self._pongs += 1
            self._enqueue(build_frame(OP_PONG_C, <const char*>p, size))
            return 0
        if opcode == OP_PONG_C:
            return 0
        # close
        if size == 0:
            code = CLOSE_NO_STATUS_C
        elif size == 1:
            return self._fail(CLOSE_PROTOCOL_ERROR_C, "close frame with a 1-byte payload")
        else:
            code = (p[0] << 8) | p[1]
            if not _valid_peer_code(code):
                return self._fail(CLOSE_PROTOCOL_ERROR_C, f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            return self._fail(CLOSE_INVALID_DATA_C, "close reason is not valid UTF-8")
        self._state = WS_DONE
        self._frags = None
        self.ws_close(code, reason)
        return 0

    cdef int _fail(self, int code, str reason) except -1:
        self._state = WS_DONE
        self._frags = None
        self.ws_fail(code, reason)
        return 0

    def ws_stop_input(self):
        """Ignore all further input (we are closing): the state becomes WSState.DONE."""
        self._state = WS_DONE
        self._frags = None
        self._rbuf = None
        self._held = None

    @property
    def ws_state(self):
        """HTTP before ws_open(), OPEN while frames are read, DONE once input is ignored."""
        return _STATES[self._state]

    @property
    def max_message(self):
        """The largest message accepted, in bytes (0 before ws_open())."""
        return self._max_message

    # Hooks (the subclass overrides them)
    def http_received(self, data):
        """Hook: bytes before ws_open() (the HTTP request). Raises NotImplementedError unless overridden."""
        raise NotImplementedError

    def ws_message(self, opcode, payload):
        """Hook: one whole message.

        Args:
            opcode: OP_TEXT or OP_BINARY (text is not checked for UTF-8 here).
            payload: the unmasked, reassembled message.
        """
        raise NotImplementedError

    def ws_close(self, code, reason):
        """Hook: the peer's close frame arrived; input is ignored from now on.

        Args:
            code: the peer's code, or CloseCode.NO_STATUS (1005) when its frame had none.
            reason: the peer's reason (valid UTF-8).
        """
        raise NotImplementedError

    def ws_fail(self, code, reason):
        """Hook: the peer broke the protocol, called once; input is ignored from now on.

        Args:
            code: CloseCode.PROTOCOL_ERROR, INVALID_DATA or MESSAGE_TOO_BIG, to close with.
            reason: what was wrong, for the close frame.
        """
        raise NotImplementedError
