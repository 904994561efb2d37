"""`msg` frames for a run of one subject's records: encode each once, keep it in the subject's ring,
queue it on every subscriber, without a Python-level call per record.

The Kafka engine hands the hub every fetched batch grouped by subject (a run: records of one subject
in offset order); per record this loop builds the `msg` payload

    {"op":"msg","subject":...,"content":...,"epoch":"...","seq":N,"prev":P,"ts":T}

byte for byte as gateway.protocol.msg() (orjson) would, frames it, appends it to the ring and
publishes it to the channel. `head` (`{"op":"msg","subject":"...",`) is made once per run by the
caller; ASCII content is escaped here as orjson escapes it, anything else (non-ASCII UTF-8, binary)
goes through the caller's `content_member`, which returns the whole `"content":"..."` (or
`"content_b64":"..."`) member.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t
from libc.string cimport memcpy

from fanout._frame cimport OP_TEXT_C, header_size, write_header
from fanout._ring cimport Ring
from fanout._writer cimport Channel

__all__ = ["publish_run"]

cdef bytes _EPOCH = b',"epoch":"'
cdef bytes _SEQ = b'","seq":'
cdef bytes _PREV = b',"prev":'
cdef bytes _TS = b',"ts":'
cdef bytes _CONTENT = b'"content":"'


# How orjson writes each ASCII byte inside a JSON string: 0 as it is, 1 a two-char escape (\" \\ \b
# \t \n \f \r), 2 \u00XX (lowercase hex); DEL (0x7F) stays as it is.
cdef unsigned char _ESC[128]
cdef char _SHORT[128]
cdef Py_ssize_t _i
for _i in range(128):
    _ESC[_i] = 2 if _i < 0x20 else 0
    _SHORT[_i] = 0
for _i, _c in ((0x22, b'"'), (0x5C, b'\\'), (0x08, b'b'), (0x09, b't'), (0x0A, b'n'), (0x0C, b'f'),
               (0x0D, b'r')):
    _ESC[_i] = 1
    _SHORT[_i] = _c[0]
cdef const char* _HEX = b"0123456789abcdef"


cdef inline Py_ssize_t _escaped_size(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Length of the bytes as a JSON string body, -1 when they are not all ASCII (the caller's
    content_member then validates UTF-8 or falls back to base64)."""
    cdef Py_ssize_t i, size = n
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if c >= 0x80:
            return -1
        if _ESC[c]:
            size += 1 if _ESC[c] == 1 else 5
    return size


cdef inline char* _put_escaped(char* out, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if not _ESC[c]:
            out[0] = <char>c
            out += 1
        elif _ESC[c] == 1:
            out[0] = b'\\'
            out[1] = _SHORT[c]
            out += 2
        else:
            out[0] = b'\\'
            out[1] = b'u'
            out[2] = b'0'
            out[3] = b'0'
            out[4] = _HEX[c >> 4]
            out[5] = _HEX[c & 15]
            out += 6
    return out


cdef inline Py_ssize_t _digits(int64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    cdef unsigned long long u
    if v < 0:
        n += 1
        u = <unsigned long long>(-(v + 1)) + 1
    else:
        u = <unsigned long long>v
    while u >= 10:
        u //= 10
        n += 1
    return n


cdef inline char* _put_int(char* out, int64_t v, Py_ssize_t width) noexcept nogil:
    """Write v in decimal (`width` chars, from _digits); returns the end."""
    cdef unsigned long long u
    cdef char* end = out + width
    cdef char* p = end
    if v < 0:
        out[0] = b'-'
        u = <unsigned long long>(-(v + 1)) + 1
    else:
        u = <unsigned long long>v
    while True:
        p -= 1
        p[0] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    return end


cdef inline char* _put(char* out, bytes b) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(out, PyBytes_AS_STRING(b), <size_t>n)
    return out + n


def publish_run(Ring ring not None, Channel channel not None, bytes head not None, bytes epoch not None,
                list records not None, Py_ssize_t start, int64_t prev, int64_t now_ms, content_member,
                Py_ssize_t entry_overhead=0):
    """Encode, keep and publish records[start:] of one subject, in one loop.

    Each record becomes the ``msg`` frame ``protocol.msg`` would give (seq = offset + 1, ts = its
    timestamp or ``now_ms`` when None or negative, a None value is empty content), appended to
    ``ring`` and published to ``channel``.

    Args:
        ring: the subject's recovery window.
        channel: the subject's subscribers.
        head: the payload's start, ``{"op":"msg","subject":"...",``, made once per run.
        epoch: the subject's epoch; must need no JSON escaping (the engines' epochs are hex).
        records: objects with ``.offset``, ``.value`` and ``.timestamp``, in offset order.
        start: the first index of ``records`` to publish (negative: 0).
        prev: the seq of the subject's message before records[start] (0: none, -1: unknown, then
            the first msg has no "prev"); each later record's prev is the one before it.
        now_ms: the timestamp for records without one.
        content_member: for content that is not plain ASCII, returns the whole ``"content":"..."``
            (or ``"content_b64":"..."``) member.
        entry_overhead: bytes counted per held ring entry in the first result.
    Returns:
        (change of the ring's ``nbytes + len * entry_overhead``, frames queued to subscribers).
    Raises:
        ValueError: a seq is not after the ring's last seq (Ring.append).
        TypeError: a value is neither bytes nor None.
    """
    cdef Py_ssize_t i, n = len(records), size, hlen, cw, plen, sw, tw
    cdef Py_ssize_t before = ring._nbytes + ring._len * entry_overhead
    cdef long long deliveries = 0
    cdef int64_t seq, ts
    cdef object r, value, ts_obj, member
    cdef bytes content, frame
    cdef const unsigned char* cp
    cdef Py_ssize_t esc
    cdef char* out
    cdef Py_ssize_t fixed = (PyBytes_GET_SIZE(head) + PyBytes_GET_SIZE(_EPOCH) + PyBytes_GET_SIZE(epoch)
                             + PyBytes_GET_SIZE(_SEQ) + PyBytes_GET_SIZE(_TS) + 1)
    if start < 0:
        start = 0
    for i in range(start, n):
        r = records[i]
        seq = r.offset + 1
        ts_obj = r.timestamp
        ts = now_ms if ts_obj is None else <int64_t>ts_obj
        if ts < 0:
            ts = now_ms
        value = r.value
        content = b"" if value is None else <bytes?>value
        cp = <const unsigned char*>PyBytes_AS_STRING(content)
        cw = PyBytes_GET_SIZE(content)
        esc = _escaped_size(cp, cw)
        if esc >= 0:
            member = None
            cw = esc + PyBytes_GET_SIZE(_CONTENT) + 1
        else:
            member = <bytes?>content_member(content)
            cw = PyBytes_GET_SIZE(<bytes>member)
        sw = _digits(seq)
        tw = _digits(ts)
        plen = PyBytes_GET_SIZE(_PREV) + _digits(prev) if prev >= 0 else 0
        size = fixed + cw + sw + plen + tw
        hlen = header_size(size)
        frame = PyBytes_FromStringAndSize(NULL, hlen + size)
        out = PyBytes_AS_STRING(frame)
        out += write_header(<unsigned char*>out, OP_TEXT_C, size)
        out = _put(out, head)
        if esc == PyBytes_GET_SIZE(content):
            out = _put(out, _CONTENT)
            memcpy(out, cp, <size_t>esc)
            out += esc
            out[0] = b'"'
            out += 1
        elif esc >= 0:
            out = _put(out, _CONTENT)
            out = _put_escaped(out, cp, PyBytes_GET_SIZE(content))
            out[0] = b'"'
            out += 1
        else:
            out = _put(out, <bytes>member)
        out = _put(out, _EPOCH)
        out = _put(out, epoch)
        out = _put(out, _SEQ)
        out = _put_int(out, seq, sw)
        if prev >= 0:
            out = _put(out, _PREV)
            out = _put_int(out, prev, plen - PyBytes_GET_SIZE(_PREV))
        out = _put(out, _TS)
        out = _put_int(out, ts, tw)
        out[0] = b'}'
        ring._append(seq, prev, ts, frame)
        deliveries += channel.publish(frame)
        prev = seq
    return ring._nbytes + ring._len * entry_overhead - before, deliveries
