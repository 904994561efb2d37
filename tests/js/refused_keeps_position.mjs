// client.js's GatewayClient against a real gateway (started by tests/test_client_js_e2e.py with
// --max-subscriptions 1): a subscription the gateway refuses keeps the position the caller gave it,
// as the Python client does, so subscribing again later asks from there and the gateway replays.
//
//   node --experimental-websocket tests/js/refused_keeps_position.mjs CLIENT_MODULE WS_URL
//
// Prints one JSON object with what it saw; exits 2 if it takes more than 20 s.

import { pathToFileURL } from "node:url";

const [clientPath, url] = process.argv.slice(2);
const { GatewayClient } = await import(pathToFileURL(clientPath).href);
setTimeout(() => { console.error("timed out"); process.exit(2); }, 20000).unref();

const waiters = [];
const when = (pred) => new Promise((resolve) => waiters.push({ pred, resolve }));
const seen = (kind, detail) => {
  for (const w of waiters.splice(0)) { if (w.pred(kind, detail)) w.resolve(detail); else waiters.push(w); }
};
const c = new GatewayClient(url, { onStatus: seen, onError: (err) => seen("error", err) });
await when((k) => k === "connected");

const first = await c.publish("/js/b", "one");  // /js/b has seq 1 and 2 before anyone subscribes to it
await c.publish("/js/b", "two");
const subscribedA = when((k, d) => k === "subscribed" && d.subject === "/js/a");
c.subscribe("/js/a");
await subscribedA;

// the caller knows where it was in /js/b (as demo.js restores it); the gateway refuses (one subscription)
c.positions.set("/js/b", { epoch: first.epoch, seq: first.seq });
const refused = when((k, d) => k === "error" && d.subject === "/js/b");
c.subscribe("/js/b");
const error = await refused;
const kept = c.positions.get("/js/b") || null;

// a slot is free again: subscribing again asks from the position kept, so "two" is replayed; "three",
// published after on the same connection, comes after whatever the subscribe brings
const got = [];
c.unsubscribe("/js/a");
const sentinel = new Promise((resolve) => c.subscribe("/js/b", (m) => { got.push(m.content); if (m.content === "three") resolve(); }));
await c.publish("/js/b", "three");
await sentinel;
c.close();
console.log(JSON.stringify({ code: error.code, kept, first: { epoch: first.epoch, seq: first.seq }, got }));
