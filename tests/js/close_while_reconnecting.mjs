// client.js's GatewayClient closed while it waits to reconnect (its URL refuses connections): close()
// must cancel that wait, so nothing of the client is left running (node exits; a page forgets it).
//
//   node --experimental-websocket tests/js/close_while_reconnecting.mjs CLIENT_MODULE WS_URL
//
// Prints one JSON object with what it saw; exits 2 if it takes more than 20 s.

import { pathToFileURL } from "node:url";

const [clientPath, url] = process.argv.slice(2);
const { GatewayClient } = await import(pathToFileURL(clientPath).href);
setTimeout(() => { console.error("timed out"); process.exit(2); }, 20000).unref();

const statuses = [];
let waiting;
const reconnecting = new Promise((resolve) => { waiting = resolve; });
// a long backoff: the wait for the next attempt is pending when close() comes
const c = new GatewayClient(url, { backoffInitial: 600000, backoffMax: 600000, onStatus: (state) => {
  statuses.push(state);
  if (state === "reconnecting") waiting();
} });
await reconnecting;
c.close();
await new Promise((resolve) => setImmediate(resolve));
const timers = process.getActiveResourcesInfo().filter((r) => r === "Timeout").length;
console.log(JSON.stringify({ statuses, timers }));
process.exit(0);  // what the client left running is `timers`; it would keep node alive
