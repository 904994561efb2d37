/* The load generator's client side, in C: many WebSocket subscribers on one epoll (see loadclient.pyx).

   Per connection: non-blocking connect() from a given source address (IP_BIND_ADDRESS_NO_PORT, so the
   port is picked per 4-tuple and ephemeral ports do not run out), the HTTP upgrade, then one masked
   `connect` and one `subscribe` frame (protocol 1.1, ../shared/PROTOCOL.md), then reading: every `msg`
   is checked against the connection's last seq of that subject (duplicate, out of order, gap from
   `prev`) and its latency taken from the CLOCK_MONOTONIC nanoseconds that the publisher put at the
   start of the content. Pings are answered with pongs; `hb` frames only count.

   JSON is not parsed in general: the fields the generator needs are found by key ("op", "subject",
   "seq", "prev", "content", "snapshot"), which is safe because a JSON string value can only contain a
   quote escaped (so `"seq"` never occurs inside one), and the content is the publisher's own digits. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define LC_MAXS 16            /* subjects per connection */
#define LC_MAXFRAME (1 << 20) /* a server frame larger than this is a protocol failure here */

enum { ST_IDLE = 0, ST_CONNECTING, ST_UPGRADING, ST_SUBSCRIBING, ST_READY, ST_CLOSED, ST_FAILED };

typedef struct {
    int fd;
    int state;
    int nsub, nsubscribed;
    double t_start, t_ready;
    int32_t subs[LC_MAXS];
    int64_t last[LC_MAXS];
    char *buf; /* unparsed bytes carried over to the next read */
    uint32_t blen, bcap;
} lc_conn;

typedef struct {
    int epfd;
    lc_conn *conns;
    long n, next_to_start, inflight, window;
    struct sockaddr_in dst, src;
    char prefix[128];
    int prefix_len;
    char host_header[64];
    int recording;
    /* counters */
    long ready, failed, closed;
    long long deliveries, dups, ooo, gaps, lost, unexpected, snapshots, hbs, pings, bad, errors, frames;
    long long bytes_in;
    int64_t *lat;        /* publish -> receive, ns */
    long long nlat, latcap, lat_dropped;
    double t_first_start, t_last_ready;
    char first_error[256];
} lc_client;

static char lc_rbuf[1 << 18];

static inline double lc_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline int64_t lc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void lc_note_error(lc_client *c, const char *what, const char *p, size_t len) {
    if (c->first_error[0]) return;
    if (len > 180) len = 180;
    snprintf(c->first_error, sizeof c->first_error, "%s: %.*s", what, (int)len, p);
}

/* A masked client text/pong frame (mask key 0: the payload bytes stay as they are). */
static int lc_send_frame(int fd, int opcode, const char *payload, size_t len) {
    char hdr[8];
    size_t h;
    hdr[0] = (char)(0x80 | opcode);
    if (len < 126) {
        hdr[1] = (char)(0x80 | len);
        h = 2;
    } else {
        hdr[1] = (char)(0x80 | 126);
        hdr[2] = (char)(len >> 8);
        hdr[3] = (char)(len & 0xff);
        h = 4;
    }
    memset(hdr + h, 0, 4);
    h += 4;
    struct iovec iov[2] = {{hdr, h}, {(void *)payload, len}};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = iov;
    m.msg_iovlen = 2;
    return sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT) == (ssize_t)(h + len) ? 0 : -1;
}

static void lc_close(lc_client *c, lc_conn *k, int state) {
    if (k->fd >= 0) {
        epoll_ctl(c->epfd, EPOLL_CTL_DEL, k->fd, NULL);
        close(k->fd);
        k->fd = -1;
    }
    if (k->state != ST_READY && k->state != ST_CLOSED && k->state != ST_FAILED) c->inflight--;
    if (k->state == ST_READY) c->closed++;
    else if (state == ST_FAILED) c->failed++;
    k->state = state;
    free(k->buf);
    k->buf = NULL;
    k->blen = k->bcap = 0;
}

static int lc_start(lc_client *c, lc_conn *k) {
    int one = 1;
    k->t_start = lc_now();
    if (c->t_first_start == 0.0) c->t_first_start = k->t_start;
    c->inflight++;
    k->state = ST_CONNECTING;
    k->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (k->fd < 0) goto fail;
    setsockopt(k->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(k->fd, (struct sockaddr *)&c->src, sizeof c->src) != 0) goto fail;
    if (connect(k->fd, (struct sockaddr *)&c->dst, sizeof c->dst) != 0 && errno != EINPROGRESS) goto fail;
    struct epoll_event ev;
    ev.events = EPOLLOUT | EPOLLIN;
    ev.data.u64 = (uint64_t)(k - c->conns);
    if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, k->fd, &ev) != 0) goto fail;
    return 0;
fail:
    lc_note_error(c, "connect", strerror(errno), strlen(strerror(errno)));
    lc_close(c, k, ST_FAILED);
    return -1;
}

static void lc_on_connected(lc_client *c, lc_conn *k) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(k->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
        lc_note_error(c, "connect", strerror(err), strlen(strerror(err)));
        lc_close(c, k, ST_FAILED);
        return;
    }
    char req[256];
    int n = snprintf(req, sizeof req,
                     "GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     c->host_header);
    if (send(k->fd, req, n, MSG_NOSIGNAL | MSG_DONTWAIT) != n) {
        lc_close(c, k, ST_FAILED);
        return;
    }
    k->state = ST_UPGRADING;
    struct epoll_event ev;
    ev.events = EPOLLIN;
    ev.data.u64 = (uint64_t)(k - c->conns);
    epoll_ctl(c->epfd, EPOLL_CTL_MOD, k->fd, &ev);
}

static void lc_send_subscribe(lc_client *c, lc_conn *k) {
    static const char hello[] = "{\"op\":\"connect\",\"client\":\"loadgen\"}";
    char sub[LC_MAXS * 176 + 64];
    int n = snprintf(sub, sizeof sub, "{\"op\":\"subscribe\",\"subjects\":[");
    for (int i = 0; i < k->nsub; i++)
        n += snprintf(sub + n, sizeof sub - n, "%s{\"subject\":\"%.*s%d\"}", i ? "," : "", c->prefix_len, c->prefix,
                      (int)k->subs[i]);
    n += snprintf(sub + n, sizeof sub - n, "]}");
    if (lc_send_frame(k->fd, 1, hello, sizeof hello - 1) != 0 || lc_send_frame(k->fd, 1, sub, n) != 0)
        lc_close(c, k, ST_FAILED);
    else
        k->state = ST_SUBSCRIBING;
}

/* Pointer just after `"key":` (spaces skipped), or NULL. */
static const char *lc_find(const char *p, size_t len, const char *key, size_t klen) {
    const char *end = p + len;
    const char *q = p;
    while ((q = memmem(q, end - q, key, klen)) != NULL) {
        const char *v = q + klen;
        while (v < end && (*v == ' ' || *v == '\t')) v++;
        if (v < end && *v == ':') {
            v++;
            while (v < end && (*v == ' ' || *v == '\t')) v++;
            return v;
        }
        q += klen;
    }
    return NULL;
}

static int64_t lc_int(const char *v, const char *end, int *ok) {
    int64_t x = 0;
    int neg = 0, digits = 0;
    if (v < end && *v == '-') { neg = 1; v++; }
    while (v < end && *v >= '0' && *v <= '9') { x = x * 10 + (*v - '0'); v++; digits++; }
    *ok = digits > 0;
    return neg ? -x : x;
}

/* The subject's number: the digits just before the closing quote of "subject":"<prefix>N". */
static int lc_subject_index(const char *p, size_t len) {
    const char *end = p + len;
    const char *v = lc_find(p, len, "\"subject\"", 9);
    if (v == NULL || v >= end || *v != '"') return -1;
    const char *close = memchr(v + 1, '"', end - v - 1);
    if (close == NULL) return -1;
    const char *d = close;
    while (d > v + 1 && d[-1] >= '0' && d[-1] <= '9') d--;
    int ok;
    int64_t idx = lc_int(d, close, &ok);
    return ok ? (int)idx : -1;
}

static int lc_slot(lc_conn *k, int subject) {
    for (int i = 0; i < k->nsub; i++)
        if (k->subs[i] == subject) return i;
    return -1;
}

static void lc_on_text(lc_client *c, lc_conn *k, const char *p, size_t len, int64_t now_ns) {
    const char *end = p + len;
    const char *op = lc_find(p, len, "\"op\"", 4);
    int ok;
    c->frames++;
    if (op == NULL || op + 4 > end) { c->bad++; return; }
    if (memcmp(op, "\"msg\"", 5) == 0) {
        int slot = lc_slot(k, lc_subject_index(p, len));
        const char *v = lc_find(p, len, "\"seq\"", 5);
        int64_t seq = v ? lc_int(v, end, &ok) : 0;
        if (slot < 0 || v == NULL || !ok) { c->unexpected++; return; }
        if (lc_find(p, len, "\"snapshot\"", 10) != NULL) {
            c->snapshots++;
            if (seq > k->last[slot]) k->last[slot] = seq;
            return;
        }
        c->deliveries++;
        if (seq == k->last[slot]) { c->dups++; return; }
        if (seq < k->last[slot]) { c->ooo++; return; }
        v = lc_find(p, len, "\"prev\"", 6);
        if (v != NULL) {
            int64_t prev = lc_int(v, end, &ok);
            if (ok && prev != k->last[slot]) {
                c->gaps++;
                /* exact in the standalone engine (seq 1, 2, 3 ...); in Kafka, seqs of a subject skip */
                c->lost += seq - k->last[slot] - 1;
            }
        }
        k->last[slot] = seq;
        v = lc_find(p, len, "\"content\"", 9);
        if (c->recording && v != NULL && v < end && *v == '"') {
            int64_t t = lc_int(v + 1, end, &ok);
            if (ok) {
                if (c->nlat < c->latcap) c->lat[c->nlat++] = now_ns - t;
                else c->lat_dropped++;
            }
        }
        return;
    }
    if (memcmp(op, "\"hb\"", 4) == 0) { c->hbs++; return; }
    if (op + 12 <= end && memcmp(op, "\"subscribed\"", 12) == 0) {
        int slot = lc_slot(k, lc_subject_index(p, len));
        const char *v = lc_find(p, len, "\"seq\"", 5);
        if (slot < 0 || v == NULL) { c->unexpected++; return; }
        k->last[slot] = lc_int(v, end, &ok);
        if (++k->nsubscribed == k->nsub && k->state == ST_SUBSCRIBING) {
            k->state = ST_READY;
            k->t_ready = lc_now();
            c->t_last_ready = k->t_ready;
            c->ready++;
            c->inflight--;
        }
        return;
    }
    if (op + 11 <= end && memcmp(op, "\"connected\"", 11) == 0) return;
    if (memcmp(op, "\"error\"", 7) == 0) {
        c->errors++;
        lc_note_error(c, "error frame", p, len);
        return;
    }
    c->bad++;
}

/* Parse whole frames from p; returns the bytes consumed, or -1 when the connection must be closed. */
static long lc_frames(lc_client *c, lc_conn *k, const char *p, size_t avail, int64_t now_ns) {
    size_t off = 0;
    while (avail - off >= 2) {
        const unsigned char *h = (const unsigned char *)p + off;
        int opcode = h[0] & 0x0f;
        uint64_t len = h[1] & 0x7f;
        size_t hl = 2;
        if (h[1] & 0x80) { c->bad++; return -1; } /* servers never mask */
        if (len == 126) {
            if (avail - off < 4) break;
            len = ((uint64_t)h[2] << 8) | h[3];
            hl = 4;
        } else if (len == 127) {
            if (avail - off < 10) break;
            len = 0;
            for (int i = 2; i < 10; i++) len = (len << 8) | h[i];
            hl = 10;
        }
        if (len > LC_MAXFRAME) { c->bad++; return -1; }
        if (avail - off < hl + len) break;
        const char *payload = p + off + hl;
        if (opcode == 1) lc_on_text(c, k, payload, len, now_ns);
        else if (opcode == 9) {
            c->pings++;
            lc_send_frame(k->fd, 0xA, payload, len);
        } else if (opcode == 8) {
            lc_note_error(c, "close frame", payload + (len >= 2 ? 2 : 0), len >= 2 ? len - 2 : 0);
            return -1;
        } else if (opcode != 0xA) c->bad++;
        off += hl + len;
    }
    return (long)off;
}

static int lc_keep(lc_conn *k, const char *p, size_t len) {
    if (k->blen + len > k->bcap) {
        uint32_t cap = k->bcap ? k->bcap : 512;
        while (cap < k->blen + len) cap *= 2;
        char *nb = realloc(k->buf, cap);
        if (nb == NULL) return -1;
        k->buf = nb;
        k->bcap = cap;
    }
    memcpy(k->buf + k->blen, p, len);
    k->blen += len;
    return 0;
}

static void lc_on_readable(lc_client *c, lc_conn *k) {
    ssize_t r = recv(k->fd, lc_rbuf, sizeof lc_rbuf, MSG_DONTWAIT);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        lc_note_error(c, "connection", r == 0 ? "closed by the server" : strerror(errno), 20);
        lc_close(c, k, k->state == ST_READY ? ST_CLOSED : ST_FAILED);
        return;
    }
    int64_t now_ns = lc_now_ns();
    c->bytes_in += r;
    const char *p = lc_rbuf;
    size_t avail = (size_t)r;
    int from_buf = k->blen > 0;
    if (from_buf) { /* bytes carried over from the last read come first */
        if (lc_keep(k, lc_rbuf, r) != 0) { lc_close(c, k, ST_FAILED); return; }
        p = k->buf;
        avail = k->blen;
    }
    if (k->state == ST_UPGRADING) {
        const char *eoh = memmem(p, avail, "\r\n\r\n", 4);
        if (eoh == NULL) {
            if (!from_buf && lc_keep(k, p, avail) != 0) lc_close(c, k, ST_FAILED);
            return;
        }
        if (avail < 12 || memcmp(p, "HTTP/1.1 101", 12) != 0) {
            lc_note_error(c, "upgrade refused", p, eoh - p);
            lc_close(c, k, ST_FAILED);
            return;
        }
        size_t used = (size_t)(eoh + 4 - p);
        lc_send_subscribe(c, k);
        if (k->fd < 0) return;
        p += used;
        avail -= used;
    }
    long used = lc_frames(c, k, p, avail, now_ns);
    if (used < 0) {
        lc_close(c, k, k->state == ST_READY ? ST_CLOSED : ST_FAILED);
        return;
    }
    size_t rest = avail - (size_t)used;
    if (from_buf) {
        memmove(k->buf, p + used, rest);
        k->blen = (uint32_t)rest;
    } else if (rest && lc_keep(k, p + used, rest) != 0) {
        lc_close(c, k, ST_FAILED);
    }
}

/* Serve the sockets for up to `seconds`: start connections within the window, read everything ready. */
static void lc_run(lc_client *c, double seconds) {
    struct epoll_event ev[1024];
    double until = lc_now() + seconds;
    for (;;) {
        while (c->next_to_start < c->n && c->inflight < c->window) lc_start(c, &c->conns[c->next_to_start++]);
        double left = until - lc_now();
        if (left <= 0) break;
        int ms = (int)(left * 1000);
        int n = epoll_wait(c->epfd, ev, 1024, ms < 5 ? ms : 5);
        for (int i = 0; i < n; i++) {
            lc_conn *k = &c->conns[ev[i].data.u64];
            if (k->fd < 0) continue;
            if (k->state == ST_CONNECTING) {
                if (ev[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) lc_on_connected(c, k);
                continue;
            }
            lc_on_readable(c, k);
        }
    }
}
