// client.js's GatewayClient with a token provider whose token lives for weeks, against a real gateway
// with auth (started by tests/test_client_js_e2e.py): the refresh is due weeks ahead, further than a
// timer can wait (setTimeout fires at once past 2^31 - 1 ms, about 24.8 days), so it must not come now.
//
//   node --experimental-websocket tests/js/long_lived_token.mjs CLIENT_MODULE WS_URL TOKEN
//
// Prints one JSON object with what it saw; exits 2 if it takes more than 20 s.

import { pathToFileURL } from "node:url";

const [clientPath, url, token] = process.argv.slice(2);
const { GatewayClient } = await import(pathToFileURL(clientPath).href);
setTimeout(() => { console.error("timed out"); process.exit(2); }, 20000).unref();

let calls = 0;
let connected;
const up = new Promise((resolve) => { connected = resolve; });
const c = new GatewayClient(url, { token: () => { calls += 1; return token; },
                                   onStatus: (state) => { if (state === "connected") connected(); } });
await up;
// A refresh timer that fired at once (1 ms) has run before this 20 ms one, and its `refresh` went out
// before the publish below: its `refreshed` arrives before the ack (one connection, in order).
await new Promise((resolve) => setTimeout(resolve, 20));
const ack = await c.publish("/js/long", "sentinel");
const seen = { acked: ack.op === "ack", refreshes: c.stats.refreshes, calls };
c.close();
console.log(JSON.stringify(seen));
