// client.js's GatewayClient with a token provider against a real gateway that has no auth configured
// (started by tests/test_client_js_e2e.py): such a gateway ignores tokens and answers `refresh` with
// `{"op":"refreshed","exp":null}`. The client must then take the next refresh time from the token it
// just sent, not from the first token's `exp`: else every refresh comes twice as soon as the one before
// and, once that first `exp` has passed, one follows the other with no wait at all.
//
//   node --experimental-websocket tests/js/refresh_exp_from_token.mjs CLIENT_MODULE WS_URL
//
// Prints one JSON object with what it saw; exits 2 if it takes more than 20 s.

import { pathToFileURL } from "node:url";

const [clientPath, url] = process.argv.slice(2);
const { GatewayClient, tokenExp } = await import(pathToFileURL(clientPath).href);
setTimeout(() => { console.error("timed out"); process.exit(2); }, 20000).unref();

// A JWT-shaped token (unsigned: the gateway without auth never reads it) expiring in 4 s.
const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
const sent = [];
const provider = () => {
  const token = `${b64({ alg: "HS256" })}.${b64({ sub: "page", exp: Date.now() / 1000 + 4 })}.sig`;
  sent.push(token);
  return token;
};

let connected;
const up = new Promise((resolve) => { connected = resolve; });
const c = new GatewayClient(url, { token: provider, refreshLead: 60000,
                                   onStatus: (state) => { if (state === "connected") connected(); } });
await up;
// the first refresh comes halfway to the first token's exp; wait for the gateway's answer
for (let i = 0; i < 1000 && c.stats.refreshes < 1; i++) await new Promise((r) => setTimeout(r, 10));
const after = { refreshes: c.stats.refreshes, tokenExp: c.tokenExp, sentExp: tokenExp(c.token),
                firstExp: tokenExp(sent[0]), calls: sent.length };
c.close();
console.log(JSON.stringify(after));
