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

const CLOSE_POLICY = 1008;
const CLOSE_TOKEN_EXPIRED = 4001;

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

export class GatewayError extends Error {
  constructor(code, message, extra = {}) {
    super(`${code}: ${message}`);
    this.code = code;
    Object.assign(this, extra);
  }
}

export class GatewayClient {
  constructor(urls, { token = null, refreshLead = 30000, name = "gateway-js/0.1", backoffInitial = 100,
                      backoffMax = 10000, onStatus = () => {}, onError = () => {} } = {}) {
    this.urls = Array.isArray(urls) ? urls : [urls];
    this.tokenProvider = typeof token === "function" ? token : null;
    this.token = typeof token === "function" ? null : token;
    this.tokenExp = tokenExp(this.token);  // exp of the token the session holds, when known
    this.refreshLead = refreshLead;
    this.name = name;
    this.backoffInitial = backoffInitial;
    this.backoffMax = backoffMax;
    this.onStatus = onStatus;
    this.onError = onError;
    this.positions = new Map();     // subject -> {epoch, seq}
    this.handlers = new Map();      // subject -> Set(callback)
    this.resyncing = new Set();     // subjects waiting for a `subscribed` after a gap
    this.pendingAcks = new Map();   // id -> {resolve, reject}
    this.stats = { duplicates: 0, gaps: 0, reconnects: 0, refreshes: 0, expired: 0 };
    this._nextId = 1;
    this._urlIndex = 0;
    this._attempt = 0;
    this._ws = null;
    this._connected = false;
    this._closed = false;
    this._watchdog = null;
    this._refreshTimer = null;
    this._heartbeatMs = 15000;
    this._open();
  }

  get connected() { return this._connected; }

  subscribe(subject, callback) {
    if (!this.handlers.has(subject)) this.handlers.set(subject, new Set());
    if (callback) this.handlers.get(subject).add(callback);
    if (this._connected) this._send({ op: "subscribe", subjects: [this._entry(subject)] });
    return () => this.unsubscribe(subject, callback);
  }

  unsubscribe(subject, callback) {
    const set = this.handlers.get(subject);
    if (set && callback) set.delete(callback);
    if (!set || set.size === 0 || !callback) {
      this.handlers.delete(subject);
      this.positions.delete(subject);
      if (this._connected) this._send({ op: "unsubscribe", subjects: [subject] });
    }
  }

  publish(subject, content, { ack = true } = {}) {
    const frame = { op: "publish", subject, content };
    if (!ack) { this._send(frame); return Promise.resolve(null); }
    const id = this._nextId++;
    frame.id = id;
    return new Promise((resolve, reject) => {
      if (!this._connected) { reject(new GatewayError("unavailable", "not connected", { id })); return; }
      this.pendingAcks.set(id, { resolve, reject });
      this._send(frame);
    });
  }

  close() {
    this._closed = true;
    clearTimeout(this._watchdog);
    clearTimeout(this._refreshTimer);
    if (this._ws) this._ws.close(1000);
  }

  // ---- internals ----

  _entry(subject) {
    const pos = this.positions.get(subject);
    return pos ? { subject, epoch: pos.epoch, seq: pos.seq } : { subject };
  }

  _send(obj) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) this._ws.send(JSON.stringify(obj));
  }

  _open() {
    if (this._closed) return;
    if (!this.tokenProvider) { this._dial(this.token); return; }
    let asked;
    try { asked = Promise.resolve(this.tokenProvider()); } catch (e) { asked = Promise.reject(e); }
    asked.then((token) => {
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

  _dial(token) {
    if (this._closed) return;
    const url = this.urls[this._urlIndex % this.urls.length];
    this.onStatus("connecting", url);
    let ws;
    try { ws = new WebSocket(url); } catch (e) { this._retry(); return; }
    this._ws = ws;
    this._arm(ws);  // an opening handshake that never completes is a dead connection too
    ws.onopen = () => {
      const hello = { op: "connect", client: this.name };
      if (token) hello.token = token;
      ws.send(JSON.stringify(hello));
      this._arm(ws);
    };
    ws.onmessage = (ev) => { this._arm(ws); this._onFrame(ev.data); };
    ws.onclose = (ev) => this._lost(ws, ev.code, ev.reason);
  }

  _lost(ws, code, reason) {  // the connection `ws` is over: settle what was pending, reconnect
    if (this._ws !== ws) return;
    ws.onopen = ws.onmessage = ws.onclose = null;  // nothing more from it counts
    this._ws = null;
    this._connected = false;
    clearTimeout(this._watchdog);
    clearTimeout(this._refreshTimer);
    for (const [id, p] of this.pendingAcks) p.reject(new GatewayError("unavailable", "connection lost", { id }));
    this.pendingAcks.clear();
    this.resyncing.clear();
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
    setTimeout(() => this._open(), delay);
  }

  _arm(ws) {  // 2 x heartbeat_ms of silence = dead connection
    clearTimeout(this._watchdog);
    this._watchdog = setTimeout(() => {
      // Start a close, but do not wait for its handshake: on a dead network it never completes and
      // the browser would fire `close` only after its own timeout, a minute or more later.
      try { ws.close(1000, "heartbeat timeout"); } catch (e) { /* already closing */ }
      this._lost(ws, 1006, "heartbeat timeout");  // 1006: lost without a close from the server
    }, 2 * this._heartbeatMs);
  }

  _onFrame(text) {
    let m;
    try { m = JSON.parse(text); } catch (e) { return; }
    switch (m.op) {
      case "connected": {
        this._connected = true;
        this._attempt = 0;
        this._heartbeatMs = m.heartbeat_ms || this._heartbeatMs;
        this._arm(this._ws);
        this.onStatus("connected", m.server);
        const subjects = [...this.handlers.keys()].map((s) => this._entry(s));
        if (subjects.length) this._send({ op: "subscribe", subjects });
        this._scheduleRefresh();
        break;
      }
      case "refreshed": {
        this.stats.refreshes += 1;
        if (typeof m.exp === "number") this.tokenExp = m.exp;
        this._scheduleRefresh();
        break;
      }
      case "msg": this._onMsg(m); break;
      case "subscribed": this.resyncing.delete(m.subject); this.onStatus("subscribed", m); break;
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
        if ((m.request === "subscribe" || m.request === "refresh") && typeof m.subject === "string") {
          // a refused subscribe, or a subscription the refreshed token no longer allows: it is over
          this.handlers.delete(m.subject);
          this.positions.delete(m.subject);
          this.resyncing.delete(m.subject);
        } else if (m.request === "refresh") {
          this._retryRefresh();  // the session keeps its old token until exp
        }
        this.onError(err);  // a failed publish (request "publish") leaves every subscription alone
        break;
      }
      default: break;  // hb, pong, unsubscribed, unknown ops: nothing to do
    }
  }

  _scheduleRefresh() {  // only with a provider: a fixed token cannot be renewed
    clearTimeout(this._refreshTimer);
    if (!this.tokenProvider || this.tokenExp === null) return;
    this._refreshTimer = setTimeout(() => this._refresh(),
                                    refreshDelay(this.tokenExp, Date.now(), this.refreshLead));
  }

  _retryRefresh() {  // try again halfway to exp; at worst the gateway closes 4001 and we reconnect
    clearTimeout(this._refreshTimer);
    if (!this.tokenProvider || this.tokenExp === null) return;
    const left = this.tokenExp * 1000 - Date.now();
    if (left > 200) this._refreshTimer = setTimeout(() => this._refresh(), left / 2);
  }

  _refresh() {
    const ws = this._ws;
    if (!ws || !this._connected) return;
    let asked;
    try { asked = Promise.resolve(this.tokenProvider()); } catch (e) { asked = Promise.reject(e); }
    asked.then((token) => {
      if (this._ws !== ws || typeof token !== "string" || !token) return;
      this.token = token;
      this._send({ op: "refresh", token });
    }).catch((e) => {
      this.onStatus("token provider failed", String(e && e.message || e));
      this._retryRefresh();
    });
  }

  _onMsg(m) {
    if (!this.handlers.has(m.subject)) return;
    const pos = this.positions.get(m.subject);
    if (pos && pos.epoch === m.epoch) {
      if (m.seq <= pos.seq) { this.stats.duplicates += 1; return; }
      if (this.resyncing.has(m.subject)) return;  // the replay after `subscribed` fills the gap
      if (m.prev !== undefined && m.prev !== pos.seq && !m.snapshot) {
        this.stats.gaps += 1;
        this.resyncing.add(m.subject);
        this._send({ op: "subscribe", subjects: [this._entry(m.subject)] });
        return;
      }
    }
    this.positions.set(m.subject, { epoch: m.epoch, seq: m.seq });
    const content = m.content !== undefined ? m.content : atob(m.content_b64 || "");
    const message = { subject: m.subject, content, epoch: m.epoch, seq: m.seq, prev: m.prev, ts: m.ts,
                      snapshot: !!m.snapshot };
    for (const cb of this.handlers.get(m.subject)) {
      try { cb(message); } catch (e) { console.error(e); }
    }
  }
}
