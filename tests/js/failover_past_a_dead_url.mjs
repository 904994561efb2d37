// client.js's GatewayClient given a URL where nothing listens, then a real gateway's (started by
// tests/test_client_js_e2e.py): the failed connection is a failed attempt at once, and the client goes on
// to the next URL. (Node 20's WebSocket fires only `error`, no `close`, when it cannot connect; waiting
// for `close` left the client stuck until its heartbeat watchdog, 2 x 15 s, for every dead URL.)
//
//   node --experimental-websocket tests/js/failover_past_a_dead_url.mjs CLIENT_MODULE DEAD_URL WS_URL
//
// Prints one JSON object with what it saw; exits 2 if it takes more than 45 s.

import { pathToFileURL } from "node:url";

const [clientPath, dead, url] = process.argv.slice(2);
const { GatewayClient } = await import(pathToFileURL(clientPath).href);
setTimeout(() => { console.error("timed out"); process.exit(2); }, 45000).unref();

const statuses = [];
let connected;
const up = new Promise((resolve) => { connected = resolve; });
const c = new GatewayClient([dead, url], { backoffInitial: 10, onStatus: (state, detail) => {
  if (state !== "reconnecting") statuses.push([state, typeof detail === "string" ? detail : null]);
  if (state === "connected") connected();
} });
await up;
c.close();
console.log(JSON.stringify({ statuses }));
