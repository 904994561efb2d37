// client.js's connectTimeout (200 ms here): a token provider that never answers its first call, or
// (PROVIDER "steady") a server that never answers `connect`, fails that attempt, and the next one
// asks again.
//
//   node --experimental-websocket tests/js/connect_timeout.mjs CLIENT_MODULE WS_URL hangs|steady
//
// Prints what it saw once connected; exits 2 if it takes more than 20 s.

import { pathToFileURL } from "node:url";

const [clientPath, url, mode] = process.argv.slice(2);
const { GatewayClient } = await import(pathToFileURL(clientPath).href);
setTimeout(() => { console.error("timed out"); process.exit(2); }, 20000).unref();

let calls = 0;
const provider = () => {
  calls += 1;
  // "hangs": the first call never settles
  return mode === "hangs" && calls === 1 ? new Promise(() => {}) : `tok-${calls}`;
};
const statuses = [];
let done;
const connected = new Promise((resolve) => { done = resolve; });
const c = new GatewayClient(url, { token: provider, connectTimeout: 200, backoffInitial: 10,
                                   onStatus: (state, detail) => {
  statuses.push([state, typeof detail === "string" ? detail : null]);
  if (state === "connected") done();
} });
await connected;
c.close();
await new Promise((resolve) => setImmediate(resolve));
const timers = process.getActiveResourcesInfo().filter((r) => r === "Timeout").length;
console.log(JSON.stringify({ calls, statuses, timers }));
process.exit(0);
