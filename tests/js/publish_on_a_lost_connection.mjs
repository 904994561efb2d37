// client.js's publish when not connected, and when the connection is lost before the ack: never queued
// nor resent, rejected with code "connection_closed" (as the Python client's ConnectionClosedError).
//
//   node --experimental-websocket tests/js/publish_on_a_lost_connection.mjs CLIENT_MODULE WS_URL
//
// WS_URL: a server that answers `connect` with `connected` and closes 1012 at the first publish that
// carries an id. Prints one JSON object with what it saw; exits 2 if it takes more than 20 s.

import { pathToFileURL } from "node:url";

const [clientPath, url] = process.argv.slice(2);
const { GatewayClient } = await import(pathToFileURL(clientPath).href);
setTimeout(() => { console.error("timed out"); process.exit(2); }, 20000).unref();

const failure = (promise) => promise.then(
  (value) => ({ resolved: value }),
  (e) => ({ code: e.code, id: e.id ?? null, subject: e.subject ?? null, closeCode: e.closeCode ?? null,
            message: e.message }));

let connected;
const isConnected = new Promise((resolve) => { connected = resolve; });
const c = new GatewayClient(url, { backoffInitial: 600000, backoffMax: 600000, onStatus: (state) => {
  if (state === "connected") connected();
} });
// before `connected`: refused here, with or without ack
const early = await failure(c.publish("/js/lost", "early"));
const earlyNoAck = await failure(c.publish("/js/lost", "early, no ack", { ack: false }));
await isConnected;
const lost = await failure(c.publish("/js/lost", "in flight"));  // the server closes on it
const after = await failure(c.publish("/js/lost", "after", { ack: false }));
c.close();
console.log(JSON.stringify({ early, earlyNoAck, lost, after }));
process.exit(0);
