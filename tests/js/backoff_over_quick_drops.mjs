// client.js's backoff over connections that are dropped right after `connected`: it grows, and only a
// connection that lasted `backoffMax` starts it over. Math.random is pinned near 1, so each wait is
// its cap: backoffInitial * 2 ** attempt (at most backoffMax).
//
//   node --experimental-websocket tests/js/backoff_over_quick_drops.mjs CLIENT_MODULE WS_URL CONNECTIONS
//
// Prints the waits (ms) after CONNECTIONS `connected`; exits 2 if it takes more than 30 s.

import { pathToFileURL } from "node:url";

const [clientPath, url, connections] = process.argv.slice(2);
const { GatewayClient } = await import(pathToFileURL(clientPath).href);
setTimeout(() => { console.error("timed out"); process.exit(2); }, 30000).unref();
Math.random = () => 0.999999;

const waits = [];
let connected = 0;
let done;
const finished = new Promise((resolve) => { done = resolve; });
const c = new GatewayClient(url, { backoffInitial: 8, backoffMax: 1000, onStatus: (state, detail) => {
  if (state === "reconnecting") waits.push(Math.round(detail));
  if (state === "connected" && ++connected === Number(connections)) done();
} });
await finished;
c.close();
console.log(JSON.stringify({ waits }));
process.exit(0);
