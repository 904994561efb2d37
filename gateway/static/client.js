// Browser client for the gateway's protocol v1 (an ES module, no dependencies).
//
//   import { GatewayClient } from "/client.js";
//   const c = new GatewayClient(["ws://127.0.0.1:8800/ws"]);
//   c.subscribe("/matches/football/5", (m) => console.log(m.seq, m.content));
//   await c.publish("/matches/football/5", "1-0");        // resolves with the ack
//
// Client obligations (PROTOCOL.md): keep the last (epoch, seq) per subject and resubscribe with it on
// every reconnect; drop duplicates; on a `prev` gap resubscribe that subject with its position; treat
// 2 x heartbeat_ms of silence as a dead connection; reconnect with exponential backoff and full jitter,
// cycling through the URLs. Never acknowledge messages.
//
// Tokens (1.1): `token` is a string or a token provider, a function (sync or async) returning a fresh
// JWT. With a provider the client asks it at every (re)connect, sends `refresh` ahead of the token's
// `exp`, and after close 4001 (token expired) reconnects with a fresh token and recovers. Errors are
// told apart by their `request` field: a failed publish never ends a subscription of the same subject.
//
// The subscription rules live in `SubscriptionTracker` (frames in, events and frames out; no WebSocket,
// no timers, no DOM), the twin of the Python SDK's gateway/client_tracker.py: both are held to the same
// frame sequences (tests/fixtures/tracker_cases.json), and it runs under node as well as in a browser.
// Types: /client.d.ts.

const CLOSE_POLICY = 1008;
const CLOSE_TOKEN_EXPIRED = 4001;
// setTimeout fires at once when asked to wait longer than this (about 24.8 days): a token valid for
// longer is refreshed after a chain of waits this long
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

// The `exp` claim of a JWT (seconds since the epoch), read without verifying it; null if none.
export function tokenExp(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
    return claims && typeof claims.exp === "number" && Number.isFinite(claims.exp) ? claims.exp : null;
  } catch (e) {
    return null;
  }
}

// Milliseconds from `nowMs` until a token expiring at `expS` should be refreshed: `leadMs` before exp,
// but never later than halfway through what is left, and not negative.
export function refreshDelay(expS, nowMs, leadMs) {
  const left = expS * 1000 - nowMs;
  return Math.max(0, left - Math.min(leadMs, left / 2));
}

// Errors that answer one entry of a `subscribe`: how a 1.0 gateway's (no `request` field) are recognised.
const SUBSCRIBE_ERRORS = new Set(["forbidden", "invalid_subject", "unknown_topic", "bad_request", "limit_exceeded"]);

const isInt = (v) => Number.isInteger(v);

// A `msg` frame as a message ({subject, content, data, epoch, seq, prev, ts, snapshot}), or null when a
// required field is missing or mistyped. `content` is the text; for `content_b64` it is the decoded bytes
// as a binary string (atob), and `data` is a Uint8Array of the bytes either way.
export function decodeMessage(m) {
  if (typeof m.subject !== "string" || typeof m.epoch !== "string" || !isInt(m.seq)) return null;
  let content;
  let data;
  if (typeof m.content === "string") {
    content = m.content;
    data = new TextEncoder().encode(content);
  } else if (typeof m.content_b64 === "string") {
    try { content = atob(m.content_b64); } catch (e) { return null; }
    data = Uint8Array.from(content, (c) => c.charCodeAt(0));
  } else if (m.content_b64 === undefined || m.content_b64 === null) {
    content = "";
    data = new Uint8Array(0);
  } else {
    return null;
  }
  return { subject: m.subject, content, data, epoch: m.epoch, seq: m.seq,
           prev: isInt(m.prev) ? m.prev : undefined, ts: isInt(m.ts) ? m.ts : undefined,
           snapshot: m.snapshot === true };
}

// What to do with a message given the subject's last position ({epoch, seq} or undefined):
// "deliver", "duplicate" or "gap". Another epoch starts afresh; a snapshot, or the first message after
// `recovered:false` (skipPrev), is a known jump, not a gap.
export function classify(last, epoch, seq, prev, { snapshot = false, skipPrev = false } = {}) {
  if (!last || last.epoch !== epoch) return "deliver";
  if (seq <= last.seq) return "duplicate";
  if (prev !== undefined && prev !== null && prev !== last.seq && !snapshot && !skipPrev) return "gap";
  return "deliver";
}

// What an `error` frame answers, from its `request` field (1.1); "unknown" from a 1.0 gateway.
export function errorKind(m) {
  if (typeof m.request !== "string") return "unknown";
  return ["publish", "subscribe", "refresh", "connect"].includes(m.request) ? m.request : "other";
}

// The subscriptions of one client across its connections, without I/O (the rules of PROTOCOL.md's
// "Client obligations"): keeps the last {epoch, seq} per subject, drops duplicates, holds a subject back
// on a `prev` gap and subscribes again from its position, resubscribes everything with positions on every
// new connection, and tells the errors that answer a `subscribe` from the others. `receive(frame)`
// returns events: {type: "deliver", message} | {type: "subscribed", subject, epoch, seq, recovered,
// tracked} | {type: "gap", subject, epoch, seq, gotSeq, gotPrev} | {type: "refused", subject, frame,
// tracked} | {type: "unsubscribed", subject}; `framesToSend()` the frames to send, in order.
export class SubscriptionTracker {
  constructor() {
    this.positions = new Map();  // subject -> {epoch, seq}; a caller may rewind one before subscribing
    this.stats = { messages: 0, duplicates: 0, gaps: 0, resubscribes: 0 };
    this.connected = false;
    this._subjects = new Set();
    this._out = [];
    this._awaiting = new Map();   // subject -> subscribe entries sent on this connection, unanswered
    this._resyncing = new Set();  // held back after a gap until `subscribed`
    this._skipPrev = new Set();   // after `recovered:false`: the next message is a known jump
    this._everConnected = false;
  }

  get subjects() { return [...this._subjects]; }

  has(subject) { return this._subjects.has(subject); }

  // Hold `subjects` (again: a held subject is asked for once more, from its position); `positions`
  // ({subject: {epoch, seq}} or a Map) is used only for a subject with no position yet.
  subscribe(subjects, positions = null) {
    const get = positions instanceof Map ? (s) => positions.get(s) : (s) => positions && positions[s];
    for (const s of subjects) {
      this._subjects.add(s);
      const p = get(s);
      if (p && !this.positions.has(s)) this.positions.set(s, { epoch: String(p.epoch), seq: Number(p.seq) });
    }
    if (this.connected && subjects.length) this._queueSubscribe(subjects);
  }

  unsubscribe(subject) {  // forget it and its position; tell the gateway when connected
    this.drop(subject);
    this.positions.delete(subject);
    if (this.connected) this._out.push({ op: "unsubscribe", subjects: [subject] });
  }

  drop(subject) {  // stop holding it without telling the gateway; its position stays. -> was it held
    this._resyncing.delete(subject);
    this._skipPrev.delete(subject);
    return this._subjects.delete(subject);
  }

  connectionMade() {  // `connected` arrived: one subscribe with every subject and its position
    this.connected = true;
    this._awaiting.clear();
    this._resyncing.clear();
    const subjects = [...this._subjects];
    if (subjects.length) {
      if (this._everConnected) this.stats.resubscribes += subjects.length;
      this._queueSubscribe(subjects);
    }
    this._everConnected = true;
    return subjects.length;
  }

  connectionLost() {  // what was not sent is dropped: the next connectionMade resubscribes everything
    this.connected = false;
    this._out = [];
    this._awaiting.clear();
    this._resyncing.clear();
  }

  framesToSend() {
    const out = this._out;
    this._out = [];
    return out;
  }

  receive(m) {
    switch (m && m.op) {
      case "msg": return this._onMsg(m);
      case "subscribed": return this._onSubscribed(m);
      case "error": return this._onError(m);
      case "unsubscribed": return typeof m.subject === "string" ? [{ type: "unsubscribed", subject: m.subject }] : [];
      default: return [];
    }
  }

  _entry(subject) {
    const pos = this.positions.get(subject);
    return pos ? { subject, epoch: pos.epoch, seq: pos.seq } : { subject };
  }

  _queueSubscribe(subjects) {
    this._out.push({ op: "subscribe", subjects: subjects.map((s) => this._entry(s)) });
    for (const s of subjects) this._awaiting.set(s, (this._awaiting.get(s) || 0) + 1);
  }

  _answered(subject) {
    const n = this._awaiting.get(subject) || 0;
    if (n <= 0) return false;
    if (n === 1) this._awaiting.delete(subject); else this._awaiting.set(subject, n - 1);
    return true;
  }

  _onMsg(m) {
    const subject = m.subject;
    if (!this._subjects.has(subject) || this._resyncing.has(subject)) return [];  // the replay fills it
    const msg = decodeMessage(m);
    if (msg === null) return [];
    const last = this.positions.get(subject);
    const verdict = classify(last, msg.epoch, msg.seq, msg.prev,
                             { snapshot: msg.snapshot, skipPrev: this._skipPrev.has(subject) });
    if (verdict === "duplicate") { this.stats.duplicates += 1; return []; }
    if (verdict === "gap") {  // negative feedback: subscribe again from the last position
      this.stats.gaps += 1;
      this.stats.resubscribes += 1;
      this._resyncing.add(subject);
      this._queueSubscribe([subject]);
      return [{ type: "gap", subject, epoch: last.epoch, seq: last.seq, gotSeq: msg.seq, gotPrev: msg.prev }];
    }
    this._skipPrev.delete(subject);
    this.positions.set(subject, { epoch: msg.epoch, seq: msg.seq });
    this.stats.messages += 1;
    return [{ type: "deliver", message: msg }];
  }

  _onSubscribed(m) {
    const subject = m.subject;
    if (typeof subject !== "string") return [];
    this._answered(subject);
    const recovered = m.recovered === true;
    const tracked = this._subjects.has(subject);
    if (tracked) {
      this._resyncing.delete(subject);
      if (recovered) this._skipPrev.delete(subject); else this._skipPrev.add(subject);
    }
    return [{ type: "subscribed", subject, epoch: typeof m.epoch === "string" ? m.epoch : null,
              seq: isInt(m.seq) ? m.seq : null, recovered, tracked }];
  }

  _onError(m) {
    const subject = m.subject;
    if (typeof subject !== "string") return [];
    const kind = errorKind(m);
    if (kind === "refresh") {  // the refreshed token no longer allows this subscription
      if (!this._subjects.has(subject)) return [];
    } else if (kind === "subscribe") {
      this._answered(subject);
    } else if (kind === "unknown") {  // 1.0: an error of a subject with a subscribe entry pending
      if (!SUBSCRIBE_ERRORS.has(m.code) || !this._answered(subject)) return [];
    } else {
      return [];  // a publish's error (or another request's): subscriptions are not concerned
    }
    return [{ type: "refused", subject, frame: m, tracked: this.drop(subject) }];
  }
}

export class GatewayError extends Error {
  constructor(code, message, extra = {}) {
    super(`${code}: ${message}`);
    this.code = code;
    Object.assign(this, extra);
  }
}

export class GatewayClient {
  constructor(urls, { token = null, refreshLead = 30000, name = "gateway-js/0.1", backoffInitial = 100,
                      backoffMax = 10000, connectTimeout = 10000, onStatus = () => {}, onError = () => {} } = {}) {
    this.urls = Array.isArray(urls) ? urls : [urls];
    this.tokenProvider = typeof token === "function" ? token : null;
    this.token = typeof token === "function" ? null : token;
    this.tokenExp = tokenExp(this.token);  // exp of the token the session holds, when known
    this.refreshLead = refreshLead;
    this.name = name;
    this.backoffInitial = backoffInitial;
    this.backoffMax = backoffMax;  // also how long a connection must last for the backoff to start over
    this.connectTimeout = connectTimeout;  // for the token provider, and from dialing to `connected`
    this.onStatus = onStatus;
    this.onError = onError;
    this.tracker = new SubscriptionTracker();  // the subscription rules; this class only runs them
    this.positions = this.tracker.positions;   // subject -> {epoch, seq}
    this.handlers = new Map();      // subject -> Set(callback)
    this.pendingAcks = new Map();   // id -> {resolve, reject}
    // messages, duplicates, gaps, resubscribes (counted by the tracker), and the connection's own
    this.stats = Object.assign(this.tracker.stats, { reconnects: 0, refreshes: 0, expired: 0 });
    this._nextId = 1;
    this._urlIndex = 0;
    this._attempt = 0;
    this._ws = null;
    this._connected = false;
    this._closed = false;
    this._watchdog = null;
    this._refreshTimer = null;
    this._retryTimer = null;
    this._tokenTimer = null;
    this._connectedAt = null;  // Date.now() at `connected`
    this._heartbeatMs = 15000;
    this._open();
  }

  get connected() { return this._connected; }

  subscribe(subject, callback) {
    if (!this.handlers.has(subject)) this.handlers.set(subject, new Set());
    if (callback) this.handlers.get(subject).add(callback);
    this.tracker.subscribe([subject]);  // asks again from its position when already subscribed
    this._flush();
    return () => this.unsubscribe(subject, callback);
  }

  unsubscribe(subject, callback) {
    const set = this.handlers.get(subject);
    if (set && callback) set.delete(callback);
    if (!set || set.size === 0 || !callback) {
      this.handlers.delete(subject);
      this.tracker.unsubscribe(subject);
      this._flush();
    }
  }

  publish(subject, content, { ack = true } = {}) {
    // Not connected: the publish is refused here, never queued (a publish is never resent), as a
    // `connection_closed` GatewayError like the Python client's ConnectionClosedError.
    if (!this._connected) return Promise.reject(new GatewayError("connection_closed", "not connected", { subject }));
    const frame = { op: "publish", subject, content };
    if (!ack) { this._send(frame); return Promise.resolve(null); }
    const id = this._nextId++;
    frame.id = id;
    return new Promise((resolve, reject) => {
      this.pendingAcks.set(id, { resolve, reject, subject });
      this._send(frame);
    });
  }

  close() {
    this._closed = true;
    clearTimeout(this._watchdog);
    clearTimeout(this._refreshTimer);
    clearTimeout(this._retryTimer);  // the wait for the next attempt
    clearTimeout(this._tokenTimer);  // the wait for the token provider
    if (this._ws) this._ws.close(1000);
  }

  // ---- internals ----

  _flush() {  // what the tracker queued, in order
    for (const frame of this.tracker.framesToSend()) this._send(frame);
  }

  _send(obj) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) this._ws.send(JSON.stringify(obj));
  }

  _open() {
    if (this._closed) return;
    if (!this.tokenProvider) { this._dial(this.token); return; }
    this._askToken().then((token) => {
      if (typeof token !== "string" || !token) throw new Error("the token provider returned no token");
      this.token = token;
      this.tokenExp = tokenExp(token);
      this._dial(token);
    }).catch((e) => {  // a failing provider is a failed attempt: back off, retry
      if (this._closed) return;
      this.onStatus("token provider failed", String(e && e.message || e));
      this._retry();
    });
  }

  _askToken() {  // the provider's answer, or a rejection after connectTimeout (a provider that hangs)
    let asked;
    try { asked = Promise.resolve(this.tokenProvider()); } catch (e) { asked = Promise.reject(e); }
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no token within ${this.connectTimeout} ms`)), this.connectTimeout);
    });
    this._tokenTimer = timer;  // close() clears it
    return Promise.race([asked, timeout]).finally(() => clearTimeout(timer));
  }

  _dial(token) {
    if (this._closed) return;
    const url = this.urls[this._urlIndex % this.urls.length];
    this.onStatus("connecting", url);
    let ws;
    try { ws = new WebSocket(url); } catch (e) { this._retry(); return; }
    this._ws = ws;
    this._arm(ws);  // an opening handshake that never completes is a dead connection too
    let opened = false;
    ws.onopen = () => {
      opened = true;
      const hello = { op: "connect", client: this.name };
      if (token) hello.token = token;
      ws.send(JSON.stringify(hello));
      this._arm(ws);
    };
    ws.onmessage = (ev) => { this._arm(ws); this._onFrame(ev.data); };
    ws.onclose = (ev) => this._lost(ws, ev.code, ev.reason);
    // A connection that could not be opened: browsers fire `error`, then `close` (1006), but node 20's
    // WebSocket (undici) only `error`. (Once open, `close` alone tells the code, e.g. 1008.)
    ws.onerror = () => { if (!opened) this._lost(ws, 1006, "connection failed"); };
  }

  _lost(ws, code, reason) {  // the connection `ws` is over: settle what was pending, reconnect
    if (this._ws !== ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;  // nothing more from it counts
    this._ws = null;
    this._connected = false;
    // Only a connection that lasted starts the backoff over: one dropped right after `connected` (a
    // gateway in a crash loop, a close after every resubscribe) is retried later and later.
    if (this._connectedAt !== null && Date.now() - this._connectedAt >= this.backoffMax) this._attempt = 0;
    this._connectedAt = null;
    clearTimeout(this._watchdog);
    clearTimeout(this._refreshTimer);
    for (const [id, p] of this.pendingAcks) {  // stored or not, nobody can tell: never resent
      const why = "connection lost before the ack (the message may or may not be stored)";
      p.reject(new GatewayError("connection_closed", why, { id, subject: p.subject, closeCode: code }));
    }
    this.pendingAcks.clear();
    this.tracker.connectionLost();
    this.onStatus("disconnected", reason ? `${code} ${reason}` : `${code}`);
    if (code === CLOSE_POLICY) {
      this._closed = true;
      this.onError(new GatewayError("unauthorized", reason || "policy"));
      return;
    }
    if (code === CLOSE_TOKEN_EXPIRED) {  // 1.1: not fatal, the next attempt asks for a fresh token
      this.stats.expired += 1;
      this._attempt = 0;
    }
    this._retry();
  }

  _retry() {
    if (this._closed) return;
    this._urlIndex += 1;
    this.stats.reconnects += 1;
    const cap = Math.min(this.backoffMax, this.backoffInitial * 2 ** this._attempt);
    this._attempt += 1;
    const delay = Math.random() * cap;  // full jitter
    this.onStatus("reconnecting", delay);  // detail: ms until the next attempt
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  _arm(ws) {  // 2 x heartbeat_ms of silence = dead connection; connectTimeout until `connected`
    clearTimeout(this._watchdog);
    const why = this._connected ? "heartbeat timeout" : "connect timeout";
    this._watchdog = setTimeout(() => {
      // Start a close, but do not wait for its handshake: on a dead network it never completes and
      // the browser would fire `close` only after its own timeout, a minute or more later.
      try { ws.close(1000, why); } catch (e) { /* already closing */ }
      this._lost(ws, 1006, why);  // 1006: lost without a close from the server
    }, this._connected ? 2 * this._heartbeatMs : this.connectTimeout);
  }

  _onFrame(text) {
    let m;
    try { m = JSON.parse(text); } catch (e) { return; }
    switch (m.op) {
      case "connected": {
        this._connected = true;
        this._connectedAt = Date.now();
        this._heartbeatMs = m.heartbeat_ms || this._heartbeatMs;
        this._arm(this._ws);
        this.onStatus("connected", m.server);
        this.tracker.connectionMade();  // one subscribe with every subject and its position
        this._flush();
        this._scheduleRefresh();
        break;
      }
      case "refreshed": {
        this.stats.refreshes += 1;
        // no `exp` (a gateway without auth ignores tokens): the token just sent says when it expires
        this.tokenExp = typeof m.exp === "number" ? m.exp : tokenExp(this.token);
        this._scheduleRefresh();
        break;
      }
      case "msg": this._handle(this.tracker.receive(m)); break;
      case "subscribed": this._handle(this.tracker.receive(m)); this.onStatus("subscribed", m); break;
      case "ack": {
        const p = this.pendingAcks.get(m.id);
        if (p) { this.pendingAcks.delete(m.id); p.resolve(m); }
        break;
      }
      case "error": {
        const err = new GatewayError(m.code, m.message, m);  // err.request: the op it answers (1.1)
        const forPublish = m.request === "publish" || m.request === undefined;
        if (forPublish && m.id !== undefined && this.pendingAcks.has(m.id)) {
          this.pendingAcks.get(m.id).reject(err);
          this.pendingAcks.delete(m.id);
          break;
        }
        // a refused subscribe, or a subscription the refreshed token no longer allows, is over (the
        // tracker's "refused"); a failed publish (request "publish") leaves every subscription alone
        const events = this.tracker.receive(m);
        this._handle(events);
        if (!events.length && m.request === "refresh") this._retryRefresh();  // the old token holds until exp
        this.onError(err);
        break;
      }
      default: break;  // hb, pong, unsubscribed, unknown ops: nothing to do
    }
  }

  _scheduleRefresh() {  // only with a provider: a fixed token cannot be renewed
    clearTimeout(this._refreshTimer);
    if (!this.tokenProvider || this.tokenExp === null) return;
    this._refreshAt(Date.now() + refreshDelay(this.tokenExp, Date.now(), this.refreshLead));
  }

  _refreshAt(atMs) {  // refresh at that time (Date.now() clock), however far ahead
    const wait = atMs - Date.now();
    this._refreshTimer = wait > MAX_TIMEOUT_MS
      ? setTimeout(() => this._refreshAt(atMs), MAX_TIMEOUT_MS)
      : setTimeout(() => this._refresh(), wait);
  }

  _retryRefresh() {  // try again halfway to exp; at worst the gateway closes 4001 and we reconnect
    clearTimeout(this._refreshTimer);
    if (!this.tokenProvider || this.tokenExp === null) return;
    const left = this.tokenExp * 1000 - Date.now();
    if (left > 200) this._refreshAt(Date.now() + left / 2);
  }

  _refresh() {
    const ws = this._ws;
    if (!ws || !this._connected) return;
    this._askToken().then((token) => {
      if (this._ws !== ws || typeof token !== "string" || !token) return;
      this.token = token;
      this._send({ op: "refresh", token });
    }).catch((e) => {
      this.onStatus("token provider failed", String(e && e.message || e));
      this._retryRefresh();
    });
  }

  _handle(events) {  // carry out the tracker's events
    for (const ev of events) {
      if (ev.type === "deliver") {
        for (const cb of this.handlers.get(ev.message.subject) || []) {
          try { cb(ev.message); } catch (e) { console.error(e); }
        }
      } else if (ev.type === "refused") {  // its position stays (as in the Python client): a later
        this.handlers.delete(ev.subject);   // subscribe asks from there; unsubscribe() forgets it
      }
    }
    this._flush();  // e.g. the resubscription after a gap
  }
}
