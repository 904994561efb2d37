// The live-scores demo page (GET /, script GET /demo.js) on the browser client (/client.js).
//
// The demo's semantics: a message `score_home` on /matches/football/N is a goal for the home side of
// match N, `score_away` one for the away side; a score is the number of such messages of its subject.
// So a score is right only if the page got every message of the subject exactly once: the page is a
// live proof of the delivery guarantee. A page that opens late (or whose position is too old) asks the
// gateway for the subject's whole history: a recovery position with seq 0 in the subject's epoch
// (PROTOCOL.md, 1.1). When the gateway no longer holds it (`recovered:false` again), the page says so
// on that match instead of showing a wrong score as if it were right.
//
// The page keeps what it counted, and its positions, in sessionStorage: a reloaded page resubscribes
// from where it was and recovers only what it missed, like a reconnect.
//
// Every open page also publishes (the toggle, on by default): like the feed, 1 to 5 updates every 2 s
// on random matches. Add ?publish=0 to the address to start with it off.
//
// The page connects to the gateway that served it. ?gateways=ws://host:port/ws,ws://... adds others (e.g.
// the other gateways on the same Kafka cluster): when the connection is lost, client.js tries the next
// URL of the list, so the page carries on through another gateway (each must accept this page's Origin:
// --allowed-origins).

import { GatewayClient } from "/client.js";

const MATCHES = 10;
const EVENTS = ["score_home", "score_away"];
const TICK_MS = 2000;
const DROP_S = 5;
const TEAMS = [
  ["Northbridge", "Port Alder"], ["Kingsmere", "Riverton"], ["Ashford Utd", "Eastholm"],
  ["Lowfield", "Saint Clair"], ["Marlow City", "Westbury"], ["Harrowgate", "Dunmore"],
  ["Fairhaven", "Oakridge"], ["Redcliffe", "Brookvale"], ["Glenmoor", "Highcastle"],
  ["Stonebury", "Wyndham"],
];

const subjectOf = (n) => `/matches/football/${n}`;
const $ = (sel, root = document) => root.querySelector(sel);

// ---- per-match state: what the page has counted, and from which position -----------------------------

const matches = new Map();  // subject -> match
for (let n = 1; n <= MATCHES; n++) {
  matches.set(subjectOf(n), {
    n, subject: subjectOf(n), home: TEAMS[n - 1][0], away: TEAMS[n - 1][1],
    epoch: null, seq: 0,      // the page has counted every message of `epoch` up to `seq`
    goals: [0, 0], kickoff: null, lastGoal: null,
    asked: null,              // {epoch, seq}: the position the page asked a replay from, not yet answered
    gone: false,              // the gateway no longer held the history: the score is incomplete
    renewed: false,           // counting a new epoch after an old one
    row: null,
  });
}

const publishes = { sent: 0, acked: 0, failed: 0, pending: 0 };
const feed = { on: new URLSearchParams(location.search).get("publish") !== "0", timer: null };
const conn = { state: "connecting", detail: "", retryAt: 0, everConnected: false, lost: false,
               recovered: 0, recoveredUntil: new Map(), recoveredShownUntil: 0, droppedUntil: 0,
               restored: false };
let client = null;

// ---- kept across reloads (sessionStorage: this tab only) ---------------------------------------------

const STORE = "gateway-demo-scores-v1";
const KEPT = ["epoch", "seq", "goals", "kickoff", "lastGoal", "gone", "goneAt", "renewed"];
let saveTimer = null;

function save() {  // at most every 200 ms, and when the page goes away
  if (saveTimer === null) saveTimer = setTimeout(saveNow, 200);
}

function saveNow() {
  clearTimeout(saveTimer);
  saveTimer = null;
  const kept = {};
  for (const m of matches.values()) {
    if (m.epoch !== null) kept[m.subject] = Object.fromEntries(KEPT.map((k) => [k, m[k]]));
  }
  try { sessionStorage.setItem(STORE, JSON.stringify(kept)); } catch (e) { /* storage off or full */ }
}

function restore() {  // -> the positions to subscribe from
  const positions = new Map();
  let kept = {};
  try { kept = JSON.parse(sessionStorage.getItem(STORE) || "{}") || {}; } catch (e) { kept = {}; }
  for (const [subject, k] of Object.entries(kept)) {
    const m = matches.get(subject);
    if (!m || typeof k.epoch !== "string" || !Number.isInteger(k.seq) || !Array.isArray(k.goals)) continue;
    for (const key of KEPT) if (k[key] !== undefined) m[key] = k[key];
    positions.set(subject, { epoch: m.epoch, seq: m.seq });
    show(m, null);
  }
  return positions;
}

// ---- the table -----------------------------------------------------------------------------------------

function render() {
  const list = $("#matches");
  for (const m of matches.values()) {
    const li = document.createElement("li");
    li.className = "match";
    li.id = `match-${m.n}`;
    li.innerHTML = `
      <button class="team home" title="publish a goal for ${m.home}">${m.home}</button>
      <span class="score"><span class="goals home">0</span><span class="dash">-</span><span class="goals away">0</span></span>
      <button class="team away" title="publish a goal for ${m.away}">${m.away}</button>
      <span class="minute" title="minute of the last goal"></span>
      <span class="note"></span>`;
    $(".team.home", li).addEventListener("click", () => publishOne(m.subject, "score_home", "you"));
    $(".team.away", li).addEventListener("click", () => publishOne(m.subject, "score_away", "you"));
    m.row = li;
    list.appendChild(li);
    show(m, null);
  }
}

function show(m, side) {
  const li = m.row;
  $(".goals.home", li).textContent = m.goals[0];
  $(".goals.away", li).textContent = m.goals[1];
  li.dataset.epoch = m.epoch || "";
  li.dataset.seq = m.seq;
  const minute = m.lastGoal === null ? "" : `${Math.floor((m.lastGoal - m.kickoff) / 1000) % 90 + 1}'`;
  $(".minute", li).textContent = minute;
  li.classList.toggle("incomplete", m.gone);
  $(".note", li).textContent = m.gone
    ? `history gone: updates before #${m.goneAt} are no longer held by the gateway, so this score is short`
    : m.renewed ? "new history (epoch): the gateway lost the old one, counting again from its first update" : "";
  if (side !== null) {  // a brief highlight on the side that scored
    const el = $(side === 0 ? ".goals.home" : ".goals.away", li);
    el.classList.remove("flash");
    void el.offsetWidth;  // restart the animation
    el.classList.add("flash");
  }
}

// ---- counting ------------------------------------------------------------------------------------------

function count(m, msg) {
  m.seq = msg.seq;
  if (m.kickoff === null) m.kickoff = msg.ts;
  const side = EVENTS.indexOf(msg.content);  // any other content is not a goal
  if (side >= 0) {
    m.goals[side] += 1;
    m.lastGoal = msg.ts;
  }
  const until = conn.recoveredUntil.get(m.subject);
  if (until !== undefined && msg.seq <= until) {
    conn.recovered += 1;
    conn.recoveredShownUntil = Date.now() + 6000;
    showStatus();
  }
  show(m, side >= 0 ? side : null);
  save();
}

function restart(m, epoch) {  // a new epoch: the history the old counts came from is gone
  m.renewed = m.epoch !== null;  // e.g. a standalone gateway restarted: say why the score went back
  m.epoch = epoch; m.seq = 0; m.goals = [0, 0]; m.kickoff = null; m.lastGoal = null; m.gone = false;
}

function onMessage(msg) {
  const m = matches.get(msg.subject);
  // client.js has dropped duplicates and resubscribed on `prev` gaps; what it cannot know is whether
  // this page holds the subject's history from seq 1: a snapshot, or a first message that is not the
  // subject's first, leaves earlier goals uncounted.
  const sameEpoch = msg.epoch === m.epoch;
  const continues = !msg.snapshot && (sameEpoch
    ? (msg.prev === undefined ? msg.seq > m.seq : msg.prev === m.seq)
    : msg.prev === 0);
  if (continues) {
    if (!sameEpoch) restart(m, msg.epoch);
    m.asked = null;
    count(m, msg);
    return;
  }
  if (sameEpoch && msg.seq <= m.seq) { keepPosition(m); return; }  // a snapshot of what is counted
  if (m.asked && m.asked.epoch === msg.epoch) {
    if (!msg.snapshot) { keepPosition(m); return; }  // live traffic of the old subscription; the replay brings it
    // Asked for the history and got the snapshot again: `recovered:false`, it is gone. Count from
    // here and say that the score is short.
    if (!sameEpoch) restart(m, msg.epoch);
    m.asked = null;
    m.gone = true;
    m.goneAt = msg.seq;
    count(m, msg);
    return;
  }
  // Ask for what is missing: from the page's position in this epoch, or the whole epoch (seq 0).
  m.asked = { epoch: msg.epoch, seq: sameEpoch ? m.seq : 0 };
  keepPosition(m);
  client.subscribe(m.subject);  // subscribes again with that position; the replay follows `subscribed`
}

function keepPosition(m) {
  // client.js moved its position to the message it just delivered; the page did not count it, so its
  // next subscribe must ask from what the page has counted (or asked for).
  const p = m.asked || { epoch: m.epoch, seq: m.seq };
  if (p.epoch !== null) client.positions.set(m.subject, { epoch: p.epoch, seq: p.seq });
}

// ---- connection state in words ---------------------------------------------------------------------------

function onStatus(c, state, detail) {
  if (c !== client) return;  // a client the page dropped
  switch (state) {
    case "connecting":
      conn.state = conn.everConnected ? "reconnecting" : "connecting";
      conn.retryAt = 0;
      break;
    case "connected":
      conn.state = "live";
      conn.detail = detail;
      conn.lost = conn.everConnected || conn.restored;  // a reload recovers like a reconnect
      conn.everConnected = true;
      conn.recovered = 0;
      conn.recoveredUntil.clear();
      break;
    case "disconnected":
      // 1008: refused by policy (e.g. the gateway requires a token this page does not have);
      // client.js gives up, and so should the words
      conn.state = /^1008\b/.test(detail) ? "refused" : "reconnecting";
      conn.detail = detail;
      break;
    case "reconnecting":
      conn.state = "reconnecting";
      conn.retryAt = Date.now() + detail;
      break;
    case "subscribed":  // after a reconnect, messages up to `seq` of a recovered subject are the catch-up
      if (conn.lost && detail.recovered) conn.recoveredUntil.set(detail.subject, detail.seq);
      return;
    default:
      return;
  }
  showStatus();
  publisherState();
}

function showStatus() {
  const el = $("#status");
  const now = Date.now();
  let text;
  let state = conn.state;
  if (conn.droppedUntil > now) {
    state = "offline";
    text = `offline (you dropped the connection): reconnecting in ${Math.ceil((conn.droppedUntil - now) / 1000)} s`;
  } else if (conn.state === "live") {
    text = conn.recovered > 0 && conn.recoveredShownUntil > now
      ? `live: recovered ${conn.recovered} message${conn.recovered === 1 ? "" : "s"}`
      : "live";
  } else if (conn.state === "refused") {
    text = `refused by the gateway (${conn.detail}): reload to try again`;
  } else if (conn.state === "reconnecting") {
    text = conn.retryAt > now ? `reconnecting in ${Math.ceil((conn.retryAt - now) / 1000)} s` : "reconnecting...";
  } else {
    text = "connecting...";
  }
  el.textContent = text;
  el.dataset.state = state;
  $("#node").textContent = conn.state === "live" && conn.detail ? `gateway ${conn.detail}` : "";
}

// ---- publishing ----------------------------------------------------------------------------------------

function publisherState() {
  $("#publisher").dataset.state = feed.on ? (client && client.connected ? "on" : "waiting") : "off";
}

function showPublishes(line) {
  const p = publishes;
  $("#pubstats").textContent = `you published ${p.acked} (${p.pending} waiting for an ack, ${p.failed} failed)`;
  if (line) {
    const log = $("#publog");
    const li = document.createElement("li");
    li.className = line.cls;
    li.textContent = line.text;
    log.prepend(li);
    while (log.children.length > 4) log.lastChild.remove();
  }
}

async function publishOne(subject, content, who) {
  const m = matches.get(subject);
  const what = `${content === "score_home" ? m.home : m.away} (${who})`;
  publishes.sent += 1;
  if (!client.connected) {  // client.js refuses at once; say why
    publishes.failed += 1;
    showPublishes({ cls: "failed", text: `not sent: goal for ${what}: offline` });
    return;
  }
  publishes.pending += 1;
  showPublishes(null);
  try {
    await client.publish(subject, content);
    publishes.acked += 1;
    showPublishes(null);
  } catch (e) {
    publishes.failed += 1;
    // lost with the connection: it may or may not have been stored; the scores will tell
    const why = e.code === "connection_closed" && e.id !== undefined
      ? "connection lost before the ack (it may still count)" : e.message;
    showPublishes({ cls: "failed", text: `failed: goal for ${what}: ${why}` });
  } finally {
    publishes.pending -= 1;
    showPublishes(null);
  }
}

function feedTick() {
  const k = 1 + Math.floor(Math.random() * 5);
  for (let i = 0; i < k; i++) {
    const n = 1 + Math.floor(Math.random() * MATCHES);
    publishOne(subjectOf(n), EVENTS[Math.floor(Math.random() * 2)], "random");
  }
}

function setFeed(on) {
  feed.on = on;
  $("#feed").checked = on;
  clearInterval(feed.timer);
  feed.timer = on ? setInterval(feedTick, TICK_MS) : null;
  publisherState();
}

// ---- the client, and dropping it on purpose --------------------------------------------------------------

function gatewayUrls() {  // this page's gateway first, then the ones in ?gateways=
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const urls = [`${scheme}://${location.host}/ws`];
  for (const u of (new URLSearchParams(location.search).get("gateways") || "").split(",")) {
    const url = u.trim();
    if (/^wss?:\/\/[^\s/]+/.test(url) && !urls.includes(url)) urls.push(url);
  }
  return urls;
}

function connect(positions) {
  let c = null;  // statuses during construction ("connecting") are the page's own state already
  c = new GatewayClient(gatewayUrls(), {
    name: "demo-page/1", onStatus: (state, detail) => onStatus(c, state, detail),
  });
  client = c;
  window.demo.client = c;
  for (const [subject, p] of positions) c.positions.set(subject, p);  // recover where the last one was
  for (const subject of matches.keys()) c.subscribe(subject, onMessage);
}

function drop() {
  const old = client;
  if (conn.droppedUntil > Date.now()) return;
  conn.droppedUntil = Date.now() + DROP_S * 1000;
  conn.state = "offline";
  $("#drop").disabled = true;
  client = null;  // statuses of `old` are ignored from here on
  old.close();  // publishes waiting for an ack fail ("connection lost")
  const positions = new Map(old.positions);
  client = { connected: false, positions: new Map(), subscribe() {}, publish: () => Promise.reject(new Error("offline")) };
  showStatus();
  publisherState();
  setTimeout(() => {
    conn.droppedUntil = 0;
    conn.state = "reconnecting";
    $("#drop").disabled = false;
    connect(positions);
    showStatus();
  }, DROP_S * 1000);
}

window.demo = { matches, publishes, conn, setFeed, drop, client: null };
render();
$("#feed").addEventListener("change", (ev) => setFeed(ev.target.checked));
$("#drop").addEventListener("click", drop);
$("#drop").textContent = `Drop the connection for ${DROP_S} s`;
const kept = restore();
conn.restored = kept.size > 0;
addEventListener("pagehide", saveNow);
connect(kept);
setFeed(feed.on);
showPublishes(null);
setInterval(showStatus, 250);  // countdowns
