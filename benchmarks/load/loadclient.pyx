# cython: language_level=3, boundscheck=False, wraparound=False
"""Python face of loadclient.h: one process's WebSocket subscribers on one epoll, at C speed.

Built by loadgen.py at run time into benchmarks/load/_build/ (never part of setup.py or the package).
"""
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, strlen


cdef extern from "loadclient.h":
    enum:
        LC_MAXS
        ST_READY
        LC_OURS
        LC_NATS
        LC_MQTT0
        LC_MQTT1
    ctypedef struct sockaddr_in:
        pass
    ctypedef struct lc_conn:
        int fd
        int state
        int nsub
        double t_start
        double t_ready
        int32_t subs[16]
        int64_t last[16]
    ctypedef struct lc_client:
        int epfd
        lc_conn *conns
        long n, next_to_start, inflight, window
        char prefix[128]
        int prefix_len
        char host_header[64]
        int recording
        int mode
        long pace_us
        long ready, failed, closed
        long long deliveries, dups, ooo, gaps, lost, unexpected, snapshots, hbs, pings, bad, errors, frames
        long long bytes_in, acks_sent
        int64_t *lat
        long long nlat, latcap, lat_dropped
        double t_first_start, t_last_ready
        char first_error[256]
    double lc_now() nogil
    void lc_run(lc_client *c, double seconds) nogil
    void lc_close(lc_client *c, lc_conn *k, int state) nogil


cdef extern from *:
    """
    #include <sys/epoll.h>
    static int lc_init_addrs(lc_client *c, const char *dst, int port, const char *src) {
        memset(&c->dst, 0, sizeof c->dst);
        c->dst.sin_family = AF_INET;
        c->dst.sin_port = htons(port);
        memset(&c->src, 0, sizeof c->src);
        c->src.sin_family = AF_INET;
        c->src.sin_port = 0;
        if (inet_pton(AF_INET, dst, &c->dst.sin_addr) != 1 || inet_pton(AF_INET, src, &c->src.sin_addr) != 1) return -1;
        c->epfd = epoll_create1(EPOLL_CLOEXEC);
        return c->epfd < 0 ? -1 : 0;
    }
    """
    int lc_init_addrs(lc_client *c, const char *dst, int port, const char *src) nogil


#: protocol of the connections: ours (PROTOCOL.md over WebSocket), NATS over WebSocket, MQTT 3.1.1 over TCP
MODES = {"ours": LC_OURS, "nats": LC_NATS, "mqtt0": LC_MQTT0, "mqtt1": LC_MQTT1}


cdef class Client:
    cdef lc_client *c

    def __cinit__(self, str dst, int port, str src, int32_t[:, ::1] subjects, str prefix, long window,
                  long long latcap, str mode="ours"):
        cdef long n = subjects.shape[0]
        cdef int s = subjects.shape[1]
        cdef long i
        cdef int j
        if s > LC_MAXS:
            raise ValueError(f"at most {LC_MAXS} subjects per connection")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        pre = prefix.encode()
        if len(pre) >= 128:
            raise ValueError("subject prefix too long")
        self.c = <lc_client *>calloc(1, sizeof(lc_client))
        self.c.conns = <lc_conn *>calloc(max(n, 1), sizeof(lc_conn))
        self.c.lat = <int64_t *>malloc(max(latcap, 1) * sizeof(int64_t))
        if self.c.conns == NULL or self.c.lat == NULL:
            raise MemoryError()
        self.c.n = n
        self.c.mode = MODES[mode]
        self.c.window = window
        self.c.latcap = latcap
        memcpy(self.c.prefix, <const char *>pre, len(pre))
        self.c.prefix_len = len(pre)
        host = f"{dst}:{port}".encode()
        memcpy(self.c.host_header, <const char *>host, len(host))
        for i in range(n):
            self.c.conns[i].fd = -1
            self.c.conns[i].nsub = s
            for j in range(s):
                self.c.conns[i].subs[j] = subjects[i, j]
        if lc_init_addrs(self.c, dst.encode(), port, src.encode()) != 0:
            raise OSError(f"bad address {dst} or {src}, or epoll_create1 failed")

    def __dealloc__(self):
        cdef long i
        if self.c != NULL:
            for i in range(self.c.n):
                lc_close(self.c, &self.c.conns[i], 6)
            free(self.c.conns)
            free(self.c.lat)
            free(self.c)

    def run(self, double seconds):
        with nogil:
            lc_run(self.c, seconds)

    def set_pace(self, long pace_us):
        """Sleep pace_us after each wake-up that found work (0: never; loadclient.h, lc_run)."""
        if pace_us < 0:
            raise ValueError("pace_us must be >= 0")
        self.c.pace_us = pace_us

    def set_recording(self, bint on):
        self.c.recording = on

    def reset_counters(self):
        """Start a measurement: forget the deliveries, checks and latencies counted so far."""
        c = self.c
        c.deliveries = c.dups = c.ooo = c.gaps = c.lost = c.unexpected = c.snapshots = 0
        c.bad = c.errors = c.frames = c.bytes_in = c.acks_sent = 0
        c.nlat = c.lat_dropped = 0

    def progress(self):
        c = self.c
        return {"ready": c.ready, "failed": c.failed, "closed": c.closed, "inflight": c.inflight,
                "deliveries": c.deliveries}

    def stats(self):
        c = self.c
        return {"n": c.n, "ready": c.ready, "failed": c.failed, "closed": c.closed,
                "deliveries": c.deliveries, "duplicates": c.dups, "out_of_order": c.ooo, "gaps": c.gaps,
                "lost_in_gaps": c.lost, "unexpected": c.unexpected, "snapshots": c.snapshots,
                "heartbeats": c.hbs, "pings": c.pings, "bad_frames": c.bad, "error_frames": c.errors,
                "frames": c.frames, "bytes_in": c.bytes_in, "acks_sent": c.acks_sent, "latencies_dropped": c.lat_dropped,
                "t_first_start": c.t_first_start, "t_last_ready": c.t_last_ready,
                "first_error": c.first_error.decode("utf-8", "replace")}

    def latencies_ns(self):
        """The publish -> receive latencies recorded (int64 ns) as bytes (numpy.frombuffer them)."""
        return (<char *>self.c.lat)[:self.c.nlat * sizeof(int64_t)]

    def setup_times(self):
        """Seconds from connect() to the last `subscribed`, per ready connection."""
        c = self.c
        return [c.conns[i].t_ready - c.conns[i].t_start for i in range(c.n) if c.conns[i].t_ready > 0]

    def behind(self, dict final):
        """(deliveries still missing at the end, connections missing any) against the newest seq per subject."""
        cdef long i
        cdef int j
        cdef long long missing = 0
        cdef long conns = 0
        c = self.c
        for i in range(c.n):
            if c.conns[i].state != ST_READY:
                continue
            short = 0
            for j in range(c.conns[i].nsub):
                want = final.get(c.conns[i].subs[j], 0)
                if c.conns[i].last[j] < want:
                    short += want - c.conns[i].last[j]
            if short:
                missing += short
                conns += 1
        return missing, conns
