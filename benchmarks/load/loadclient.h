/* The load generator's client side, in C: many WebSocket subscribers on one epoll (see loadclient.pyx).

   Per connection: non-blocking connect() from a given source address (IP_BIND_ADDRESS_NO_PORT, so the
   port is picked per 4-tuple and ephemeral ports do not run out), the HTTP upgrade, then one masked
   `connect` and one `subscribe` frame (protocol 1.1, ../shared/PROTOCOL.md), then reading: every `msg`
   is checked against the connection's last seq of that subject (duplicate, out of order, gap from
   `prev`) and its latency taken from the CLOCK_MONOTONIC nanoseconds that the publisher put at the
   start of the content. Pings are answered with pongs; `hb` frames only count.

   Other protocols, for benchmarks/compare.py (lc_client.mode), same connections and same checks:
     LC_NATS   the NATS text protocol over WebSocket: after the upgrade one frame with CONNECT, one
               SUB per subject (sid = the subject's slot) and PING; the PONG says every SUB is in.
               The server's frames carry a byte stream (a MSG may span frames): kept in sbuf.
     LC_MQTT0/1  MQTT 3.1.1 over plain TCP: CONNECT and SUBSCRIBE (QoS 0 or 1) at once; ready after
               CONNACK and SUBACK. At QoS 1 every PUBLISH is answered with a PUBACK (the PUBACKs of
               one read go out in one send, as a buffered client library would).
   The peers carry no seq of their own: the publisher writes "<ns>|<seq>|..." (seq per subject,
   1, 2, 3 ...) as the payload, and duplicates, reordering and gaps are judged from that seq.

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

enum { LC_OURS = 0, LC_NATS = 1, LC_MQTT0 = 2, LC_MQTT1 = 3 };

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
    char *sbuf; /* LC_NATS: the protocol stream's unparsed tail (WebSocket frames are not its units) */
    uint32_t slen, scap;
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
    int mode; /* LC_OURS, LC_NATS, LC_MQTT0, LC_MQTT1 */
    long pace_us; /* > 0: after a wake-up that found work, sleep this long so more arrives per epoll_wait */
    /* counters */
    long ready, failed, closed;
    long long deliveries, dups, ooo, gaps, lost, unexpected, snapshots, hbs, pings, bad, errors, frames;
    long long bytes_in, acks_sent;
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
    free(k->sbuf);
    k->sbuf = NULL;
    k->slen = k->scap = 0;
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

/* Append n bytes to a growable buffer (k->buf, k->sbuf). */
static int lc_append(char **buf, uint32_t *blen, uint32_t *bcap, const char *p, size_t n) {
    if (*blen + n > *bcap) {
        uint32_t cap = *bcap ? *bcap : 512;
        while (cap < *blen + n) cap *= 2;
        char *nb = realloc(*buf, cap);
        if (nb == NULL) return -1;
        *buf = nb;
        *bcap = cap;
    }
    memcpy(*buf + *blen, p, n);
    *blen += (uint32_t)n;
    return 0;
}

/* MQTT remaining length (1..4 bytes, 7 bits each); returns the bytes written. */
static int lc_mqtt_varint(unsigned char *out, uint32_t n) {
    int i = 0;
    do {
        unsigned char b = n & 0x7f;
        n >>= 7;
        out[i++] = n ? (b | 0x80) : b;
    } while (n && i < 4);
    return i;
}

/* MQTT 3.1.1 CONNECT (clean session, no keep-alive: the benchmark's connections stay quiet otherwise)
   and SUBSCRIBE of every subject at the mode's QoS, in one send. */
static void lc_mqtt_hello(lc_client *c, lc_conn *k) {
    unsigned char out[LC_MAXS * 140 + 128], body[LC_MAXS * 140 + 64];
    char id[48];
    int idlen = snprintf(id, sizeof id, "lc-%d-%ld", (int)getpid(), (long)(k - c->conns));
    int o = 0, b = 0;
    static const unsigned char vh[] = {0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 0};
    memcpy(body, vh, sizeof vh);
    b = sizeof vh;
    body[b++] = (unsigned char)(idlen >> 8);
    body[b++] = (unsigned char)idlen;
    memcpy(body + b, id, idlen);
    b += idlen;
    out[o++] = 0x10;
    o += lc_mqtt_varint(out + o, (uint32_t)b);
    memcpy(out + o, body, b);
    o += b;
    b = 0;
    body[b++] = 0;
    body[b++] = 1; /* packet id 1 */
    for (int i = 0; i < k->nsub; i++) {
        char topic[160];
        int tl = snprintf(topic, sizeof topic, "%.*s%d", c->prefix_len, c->prefix, (int)k->subs[i]);
        body[b++] = (unsigned char)(tl >> 8);
        body[b++] = (unsigned char)tl;
        memcpy(body + b, topic, tl);
        b += tl;
        body[b++] = c->mode == LC_MQTT1 ? 1 : 0;
    }
    out[o++] = 0x82;
    o += lc_mqtt_varint(out + o, (uint32_t)b);
    memcpy(out + o, body, b);
    o += b;
    if (send(k->fd, out, o, MSG_NOSIGNAL | MSG_DONTWAIT) != o) {
        lc_close(c, k, ST_FAILED);
        return;
    }
    k->state = ST_SUBSCRIBING;
    struct epoll_event ev;
    ev.events = EPOLLIN;
    ev.data.u64 = (uint64_t)(k - c->conns);
    epoll_ctl(c->epfd, EPOLL_CTL_MOD, k->fd, &ev);
}

static void lc_mark_ready(lc_client *c, lc_conn *k) {
    k->state = ST_READY;
    k->t_ready = lc_now();
    c->t_last_ready = k->t_ready;
    c->ready++;
    c->inflight--;
}

static void lc_on_connected(lc_client *c, lc_conn *k) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(k->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
        lc_note_error(c, "connect", strerror(err), strlen(strerror(err)));
        lc_close(c, k, ST_FAILED);
        return;
    }
    if (c->mode == LC_MQTT0 || c->mode == LC_MQTT1) {
        lc_mqtt_hello(c, k);
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
    if (c->mode == LC_NATS) {
        char cmd[LC_MAXS * 160 + 128];
        int n = snprintf(cmd, sizeof cmd, "CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"loadgen\"}\r\n");
        for (int i = 0; i < k->nsub; i++)
            n += snprintf(cmd + n, sizeof cmd - n, "SUB %.*s%d %d\r\n", c->prefix_len, c->prefix, (int)k->subs[i], i);
        n += snprintf(cmd + n, sizeof cmd - n, "PING\r\n");
        if (lc_send_frame(k->fd, 1, cmd, n) != 0) lc_close(c, k, ST_FAILED);
        else k->state = ST_SUBSCRIBING;
        return;
    }
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
        if (++k->nsubscribed == k->nsub && k->state == ST_SUBSCRIBING) lc_mark_ready(c, k);
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

/* A peer's delivery on slot: payload "<ns>|<seq>|..." (the publisher's seq per subject). */
static void lc_on_peer_msg(lc_client *c, lc_conn *k, int slot, const char *p, size_t len, int64_t now_ns) {
    const char *end = p + len;
    int ok, ok_seq;
    c->frames++;
    if (slot < 0 || slot >= k->nsub) { c->unexpected++; return; }
    int64_t t = lc_int(p, end, &ok);
    const char *bar = memchr(p, '|', len);
    int64_t seq = bar ? lc_int(bar + 1, end, &ok_seq) : 0;
    if (!ok || bar == NULL || !ok_seq) { c->bad++; return; }
    c->deliveries++;
    if (seq == k->last[slot]) { c->dups++; return; }
    if (seq < k->last[slot]) { c->ooo++; return; }
    if (seq != k->last[slot] + 1) {
        c->gaps++;
        c->lost += seq - k->last[slot] - 1;
    }
    k->last[slot] = seq;
    if (c->recording) {
        if (c->nlat < c->latcap) c->lat[c->nlat++] = now_ns - t;
        else c->lat_dropped++;
    }
}

/* The NATS protocol stream: whole operations from p; returns the bytes consumed, -1 to close. */
static long lc_nats_ops(lc_client *c, lc_conn *k, const char *p, size_t avail, int64_t now_ns) {
    size_t off = 0;
    while (off < avail) {
        const char *line = p + off;
        const char *eol = memmem(line, avail - off, "\r\n", 2);
        if (eol == NULL) break;
        size_t ll = (size_t)(eol - line);
        if (ll >= 4 && memcmp(line, "MSG ", 4) == 0) {
            /* MSG <subject> <sid> [reply-to] <#bytes> */
            const char *tok[5];
            size_t tl[5];
            int nt = 0;
            const char *q = line + 4;
            while (q < eol && nt < 5) {
                while (q < eol && *q == ' ') q++;
                if (q >= eol) break;
                const char *s0 = q;
                while (q < eol && *q != ' ') q++;
                tok[nt] = s0;
                tl[nt++] = (size_t)(q - s0);
            }
            if (nt < 3) { c->bad++; return -1; }
            int ok1, ok2;
            int64_t sid = lc_int(tok[1], tok[1] + tl[1], &ok1);
            int64_t size = lc_int(tok[nt - 1], tok[nt - 1] + tl[nt - 1], &ok2);
            if (!ok1 || !ok2 || size < 0 || size > LC_MAXFRAME) { c->bad++; return -1; }
            if (avail - off < ll + 2 + (size_t)size + 2) break; /* the payload is not all here yet */
            lc_on_peer_msg(c, k, (int)sid, eol + 2, (size_t)size, now_ns);
            off += ll + 2 + (size_t)size + 2;
            continue;
        }
        if (ll == 4 && memcmp(line, "PING", 4) == 0) {
            c->pings++;
            lc_send_frame(k->fd, 1, "PONG\r\n", 6);
        } else if (ll == 4 && memcmp(line, "PONG", 4) == 0) {
            if (k->state == ST_SUBSCRIBING) lc_mark_ready(c, k);
        } else if (ll >= 4 && memcmp(line, "-ERR", 4) == 0) {
            c->errors++;
            lc_note_error(c, "nats", line, ll);
        } else if (!(ll >= 3 && memcmp(line, "+OK", 3) == 0) && !(ll >= 4 && memcmp(line, "INFO", 4) == 0)) {
            c->bad++;
        }
        off += ll + 2;
    }
    return (long)off;
}

/* A WebSocket data frame of the NATS stream: parsed in place when nothing is carried over. */
static int lc_nats_data(lc_client *c, lc_conn *k, const char *p, size_t len, int64_t now_ns) {
    if (k->slen == 0) {
        long used = lc_nats_ops(c, k, p, len, now_ns);
        if (used < 0) return -1;
        if ((size_t)used < len && lc_append(&k->sbuf, &k->slen, &k->scap, p + used, len - used) != 0) return -1;
        return 0;
    }
    if (lc_append(&k->sbuf, &k->slen, &k->scap, p, len) != 0) return -1;
    long used = lc_nats_ops(c, k, k->sbuf, k->slen, now_ns);
    if (used < 0) return -1;
    memmove(k->sbuf, k->sbuf + used, k->slen - used);
    k->slen -= (uint32_t)used;
    return 0;
}

static unsigned char lc_acks[1 << 16];
static size_t lc_nacks;

static void lc_flush_acks(lc_client *c, lc_conn *k) {
    if (lc_nacks && k->fd >= 0 && send(k->fd, lc_acks, lc_nacks, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)lc_nacks)
        lc_note_error(c, "puback", "short send", 10);
    lc_nacks = 0;
}

/* MQTT packets from p; returns the bytes consumed, or -1 when the connection must be closed. */
static long lc_mqtt_packets(lc_client *c, lc_conn *k, const char *p, size_t avail, int64_t now_ns) {
    size_t off = 0;
    while (avail - off >= 2) {
        const unsigned char *h = (const unsigned char *)p + off;
        uint32_t rl = 0;
        size_t i = 1;
        int shift = 0;
        for (;;) {
            if (off + i >= avail) return (long)off; /* the length is not all here yet */
            rl |= (uint32_t)(h[i] & 0x7f) << shift;
            if (!(h[i++] & 0x80)) break;
            shift += 7;
            if (shift > 21) { c->bad++; return -1; }
        }
        if (rl > LC_MAXFRAME) { c->bad++; return -1; }
        if (avail - off < i + rl) break;
        const unsigned char *v = h + i;
        int type = h[0] >> 4;
        if (type == 3) { /* PUBLISH */
            int qos = (h[0] >> 1) & 3;
            if (rl < 2) { c->bad++; return -1; }
            size_t tl = ((size_t)v[0] << 8) | v[1];
            size_t hdr = 2 + tl + (qos ? 2 : 0);
            if (hdr > rl) { c->bad++; return -1; }
            const char *topic = (const char *)v + 2;
            const char *d = topic + tl;
            while (d > topic && d[-1] >= '0' && d[-1] <= '9') d--;
            int ok;
            int64_t idx = lc_int(d, topic + tl, &ok);
            lc_on_peer_msg(c, k, ok ? lc_slot(k, (int)idx) : -1, (const char *)v + hdr, rl - hdr, now_ns);
            if (qos == 1) {
                if (lc_nacks + 4 > sizeof lc_acks) lc_flush_acks(c, k);
                lc_acks[lc_nacks++] = 0x40;
                lc_acks[lc_nacks++] = 2;
                lc_acks[lc_nacks++] = v[2 + tl];
                lc_acks[lc_nacks++] = v[3 + tl];
                c->acks_sent++;
            }
        } else if (type == 2) { /* CONNACK */
            if (rl < 2 || v[1] != 0) {
                lc_note_error(c, "connack refused", (const char *)v, rl);
                return -1;
            }
        } else if (type == 9) { /* SUBACK: one return code per topic, 0x80 = refused */
            for (size_t j = 2; j < rl; j++)
                if (v[j] == 0x80) {
                    lc_note_error(c, "suback", "subscription refused", 20);
                    return -1;
                }
            if (k->state == ST_SUBSCRIBING) lc_mark_ready(c, k);
        } else if (type != 13) { /* PINGRESP is harmless; nothing else is expected */
            c->bad++;
        }
        off += i + rl;
    }
    return (long)off;
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
        if (c->mode == LC_NATS && (opcode == 1 || opcode == 2)) {
            if (lc_nats_data(c, k, payload, len, now_ns) != 0) return -1;
        } else if (opcode == 1) lc_on_text(c, k, payload, len, now_ns);
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

static int lc_keep(lc_conn *k, const char *p, size_t len) { return lc_append(&k->buf, &k->blen, &k->bcap, p, len); }

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
    long used;
    if (c->mode == LC_MQTT0 || c->mode == LC_MQTT1) {
        used = lc_mqtt_packets(c, k, p, avail, now_ns);
        lc_flush_acks(c, k);
    } else {
        used = lc_frames(c, k, p, avail, now_ns);
    }
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
        /* Pacing: a reader woken for every few deliveries costs the shared CPUs a wake-up per delivery
           (and the server's send the wake-up of a sleeping reader); sleeping after work lets the next
           ones pile up in the socket buffers and be read in one pass. It adds up to pace_us to the
           latencies measured, which count against the server. */
        if (c->pace_us > 0 && n > 0 && n < 1024) {
            struct timespec ts = {c->pace_us / 1000000, (c->pace_us % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
    }
}
