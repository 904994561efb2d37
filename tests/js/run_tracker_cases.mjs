// Runs client.js's SubscriptionTracker through the frame sequences of tests/fixtures/tracker_cases.json
// and prints what it did, as JSON, for tests/test_client_tracker.py to compare with the expectations
// (the same comparison as for the Python tracker). No browser: the tracker needs no DOM and no socket.
//
//   node tests/js/run_tracker_cases.mjs CLIENT_MODULE FIXTURE
//
// CLIENT_MODULE is a copy of gateway/static/client.js named *.mjs (node then loads it as an ES module).

import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [clientPath, fixturePath] = process.argv.slice(2);
const { SubscriptionTracker } = await import(pathToFileURL(clientPath).href);
const fixture = JSON.parse(readFileSync(fixturePath, "utf8"));

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

function observe(events) {
  const deliver = [];
  const named = [];
  for (const ev of events) {
    if (ev.type === "deliver") {
      const m = ev.message;
      deliver.push([m.subject, m.epoch, m.seq, hex(m.data)]);
    } else if (ev.type === "subscribed") {
      named.push(["subscribed", ev.subject, ev.recovered]);
    } else if (ev.type === "gap") {
      named.push(["gap", ev.subject, ev.epoch, ev.seq]);
    } else if (ev.type === "refused") {
      named.push(["refused", ev.subject, ev.frame.code, ev.tracked]);
    } else if (ev.type === "unsubscribed") {
      named.push(["unsubscribed", ev.subject]);
    } else {
      throw new Error(`unknown event ${JSON.stringify(ev)}`);
    }
  }
  return { deliver, events: named };
}

const results = {};
for (const c of fixture.cases) {
  const t = new SubscriptionTracker();
  const steps = [];
  for (const step of c.steps) {
    let events = [];
    switch (step.do) {
      case "subscribe": {
        const positions = {};
        for (const [s, [epoch, seq]] of Object.entries(step.positions || {})) positions[s] = { epoch, seq };
        t.subscribe(step.subjects, positions);
        break;
      }
      case "unsubscribe": t.unsubscribe(step.subject); break;
      case "connect": t.connectionMade(); break;
      case "disconnect": t.connectionLost(); break;
      case "rewind": t.positions.set(step.subject, { epoch: step.position[0], seq: step.position[1] }); break;
      case "receive": events = t.receive(step.frame); break;
      default: throw new Error(`unknown step ${step.do}`);
    }
    steps.push({ out: t.framesToSend(), ...observe(events) });
  }
  const positions = Object.fromEntries([...t.positions].map(([s, p]) => [s, [p.epoch, p.seq]]));
  const { messages, duplicates, gaps, resubscribes } = t.stats;
  results[c.name] = { steps, positions, stats: { messages, duplicates, gaps, resubscribes } };
}
process.stdout.write(JSON.stringify(results));
