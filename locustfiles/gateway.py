"""Locust swarm for the gateway: the sports-scores demo's fans and its score feed, over protocol 1.1.

    locust -f locustfiles/gateway.py --host http://127.0.0.1:8800             # web UI on :8089
    locust -f locustfiles/gateway.py --host http://127.0.0.1:8800 --headless \
        -u 2000 -r 200 -t 60s --processes -1 --csv results/swarm --html results/swarm.html

Users (the host's http/https becomes ws/wss, path /ws):

  FanUser     connects, subscribes to --matches-per-user of /matches/football/1..--matches, keeps
              the last (epoch, seq) of each, checks every `msg` (positions.py), reconnects with
              backoff and jitter when the connection drops or goes quiet for two heartbeats, and
              recovers by subscribing again with its positions.
  FeederUser  exactly one in the whole swarm (fixed_count): every --feed-interval seconds it
              publishes up to 5 × --feed-multiplier random score updates (a goal for the home or the
              away side of a random match), each with an `id` so the gateway acks it.

Every update's content is JSON text: {"scored": "score_home"|"score_away", "score_home": H,
"score_away": A, "t": <time.time() at publish>}. Locust rows (request type WS):

  msg             one live delivery; response time = publish -> receive (wall clocks, so the swarm
                  and the feeder must share a machine or a well-synchronised clock)
  msg (replayed)  a message replayed by a recovery (its time includes the outage)
  snapshot        the snapshot sent on a subscribe that did not recover (counted; time 0, as it is
                  old by design)
  publish         publish -> ack, on the feeder
  connect         TCP + WebSocket upgrade + connect -> connected
  subscribe       subscribe -> subscribed, per subject (recovered or not in the name)
  failures:       gap, duplicate, recover (a position the gateway could not recover: messages lost),
                  error (an `error` frame), disconnect, silent (no frame for 2 heartbeats), connect

A Python reader under gevent adds its own latency (several ms at a few thousand users per core); for
the top of the range use benchmarks/load/, whose clients read at C speed.
"""
from __future__ import annotations

import json
import random
import time
from urllib.parse import urlsplit

import gevent
import websocket  # websocket-client: blocking sockets, which gevent's monkey-patching makes cooperative
from locust import User, constant, events, task
from positions import Positions, Verdict  # locust puts this file's directory on sys.path

WS_TYPE = "WS"


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("gateway swarm")
    group.add_argument("--matches", type=int, default=10, env_var="LOCUST_MATCHES",
                       help="subjects /matches/football/1..N (default 10, as the demo)")
    group.add_argument("--matches-per-user", type=int, default=3, env_var="LOCUST_MATCHES_PER_USER",
                       help="matches each FanUser subscribes to (default 3)")
    group.add_argument("--feed-multiplier", type=float, default=1.0, env_var="LOCUST_FEED_MULTIPLIER",
                       help="multiplies the demo's feed of up to 5 score updates per interval (default 1)")
    group.add_argument("--feed-interval", type=float, default=2.0, env_var="LOCUST_FEED_INTERVAL",
                       help="seconds between two bursts of the feed (default 2, as the demo)")


def ws_url(host: str) -> str:
    parts = urlsplit(host if "://" in host else f"http://{host}")
    scheme = {"https": "wss", "wss": "wss"}.get(parts.scheme, "ws")
    return f"{scheme}://{parts.netloc}/ws"


class GatewayConnection:
    """One protocol-1.1 connection of a Locust user: a reader greenlet, positions kept across reconnects."""

    def __init__(self, user: User, name: str, subjects: list[str]) -> None:
        self.user = user
        self.name = name
        self.url = ws_url(user.host)
        self.positions = Positions(subjects)
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.heartbeat_s = 15.0
        self.last_frame = time.monotonic()
        self.sent_at: dict[str, float] = {}     # subject -> time its subscribe went out
        self.acks: dict[int, float] = {}        # publish id -> time it went out
        self.next_id = 0
        self.stopping = False
        self.failures_in_a_row = 0

    # -- reporting --------------------------------------------------------------------------------

    def report(self, name: str, ms: float, length: int = 0, error: str | None = None) -> None:
        self.user.environment.events.request.fire(
            request_type=WS_TYPE, name=name, response_time=ms, response_length=length,
            exception=AssertionError(error) if error else None, context={})

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.reader is not None and not self.reader.dead

    def open(self) -> bool:
        """Connect and (re)subscribe with the positions; False (reported) when it failed."""
        t0 = time.monotonic()
        try:
            ws = websocket.create_connection(self.url, timeout=10, enable_multithread=True)
            ws.send(json.dumps({"op": "connect", "client": f"locust/{self.name}"}))
            reply = json.loads(ws.recv())
            if reply.get("op") != "connected":
                ws.close()
                raise ConnectionError(f"expected connected, got {reply}")
            ws.settimeout(None)  # liveness comes from the heartbeats, see check()
        except Exception as exc:  # noqa: BLE001 - any failure to connect is one failed "connect"
            self.report("connect", (time.monotonic() - t0) * 1000, error=f"{type(exc).__name__}: {exc}")
            return False
        self.report("connect", (time.monotonic() - t0) * 1000)
        self.ws = ws
        self.heartbeat_s = reply.get("heartbeat_ms", 15000) / 1000
        self.last_frame = time.monotonic()
        self.reader = gevent.spawn(self._read, ws)
        if self.positions.subjects:
            self.subscribe(list(self.positions.subjects))
        return True

    def close(self) -> None:
        self.stopping = True
        if self.ws is not None:
            try:
                self.ws.close(timeout=1)
            except Exception:  # noqa: BLE001 - the peer may be gone already
                pass
        if self.reader is not None:
            self.reader.kill(block=False)

    def check(self) -> None:
        """Called by the user's task: reconnect (backoff, jitter) when the connection died or went quiet."""
        if self.alive and time.monotonic() - self.last_frame > 2 * self.heartbeat_s:
            self.report("silent", 0, error=f"no frame for {2 * self.heartbeat_s:.1f} s")
            self.ws.abort()  # the reader ends; reconnect below on the next call
            return
        if self.alive or self.stopping:
            return
        if self.failures_in_a_row:
            gevent.sleep(random.uniform(0, min(5.0, 0.1 * 2 ** self.failures_in_a_row)))
        self.failures_in_a_row = 0 if self.open() else self.failures_in_a_row + 1

    # -- requests ---------------------------------------------------------------------------------

    def subscribe(self, subjects: list[str]) -> None:
        now = time.monotonic()
        for s in subjects:
            self.sent_at[s] = now
        self.send({"op": "subscribe", "subjects": [self.positions.subscribe_entry(s) for s in subjects]})

    def publish(self, subject: str, content: str) -> None:
        self.next_id += 1
        self.acks[self.next_id] = time.monotonic()
        self.send({"op": "publish", "subject": subject, "content": content, "id": self.next_id})

    def send(self, obj: dict) -> None:
        try:
            self.ws.send(json.dumps(obj))
        except Exception:  # noqa: BLE001 - the reader sees the same loss and reports it
            pass

    # -- frames in --------------------------------------------------------------------------------

    def _read(self, ws: websocket.WebSocket) -> None:
        try:
            while True:
                opcode, data = ws.recv_data(control_frame=True)  # pings are answered inside
                self.last_frame = time.monotonic()
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self._handle(json.loads(data), len(data))
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                    raise ConnectionError(f"closed by the gateway with {code} {data[2:].decode(errors='replace')}")
        except Exception as exc:  # noqa: BLE001 - every way a connection dies ends here
            if not self.stopping:
                self.report("disconnect", 0, error=f"{type(exc).__name__}: {exc}")

    def _handle(self, frame: dict, length: int) -> None:
        op = frame.get("op")
        if op == "msg":
            self._on_msg(frame, length)
        elif op == "subscribed":
            subject = frame["subject"]
            ms = (time.monotonic() - self.sent_at.pop(subject, time.monotonic())) * 1000
            lost = self.positions.on_subscribed(subject, frame["epoch"], frame["seq"], frame["recovered"])
            if lost:
                self.report("recover", ms, error=f"{subject}: position not recovered, messages lost")
            self.report("subscribe (recovered)" if frame["recovered"] else "subscribe", ms)
        elif op == "ack":
            sent = self.acks.pop(frame["id"], None)
            if sent is not None:
                self.report("publish", (time.monotonic() - sent) * 1000, length)
        elif op == "error":
            if "id" in frame:
                self.acks.pop(frame["id"], None)
            self.report("error", 0, error=f"{frame.get('code')}: {frame.get('message')} ({frame.get('subject')})")

    def _on_msg(self, frame: dict, length: int) -> None:
        subject = frame["subject"]
        verdict = self.positions.on_msg(subject, frame["epoch"], frame["seq"], frame.get("prev"),
                                        frame.get("snapshot", False))
        if verdict is Verdict.IGNORED:
            return
        if verdict is Verdict.DUPLICATE:
            self.report("duplicate", 0, length, error=f"{subject}: seq {frame['seq']} again (epoch {frame['epoch']})")
            return
        if verdict is Verdict.GAP:
            last = self.positions.subjects[subject].seq
            self.report("gap", 0, length, error=f"{subject}: prev {frame.get('prev')} after seq {last} "
                        f"(epoch {frame['epoch']})")
            self.subscribe([subject])  # negative feedback: the replay fills the hole
            return
        try:
            sent = json.loads(frame["content"])["t"]
        except (KeyError, TypeError, ValueError):
            return  # not one of the feeder's messages (someone else publishing on the demo page)
        if verdict is Verdict.SNAPSHOT:  # an old message by design: counted, its age left out of the times
            self.report("snapshot", 0, length)
            return
        ms = max(0.0, (time.time() - sent) * 1000)
        self.report("msg" if verdict is Verdict.LIVE else "msg (replayed)", ms, length)


class FanUser(User):
    """A fan on the demo page: a few matches, positions kept, recovered on every reconnect."""

    weight = 100
    wait_time = constant(1)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        matches = getattr(opts, "matches", 10)
        per_user = min(getattr(opts, "matches_per_user", 3), matches)
        subjects = [f"/matches/football/{i}" for i in random.sample(range(1, matches + 1), per_user)]
        self.conn = GatewayConnection(self, "fan", subjects)
        self.conn.check()

    @task
    def stay_connected(self) -> None:
        self.conn.check()

    def on_stop(self) -> None:
        self.conn.close()


class FeederUser(User):
    """The score feed: up to 5 × multiplier random updates every interval, each acked."""

    fixed_count = 1
    wait_time = constant(0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.matches = getattr(opts, "matches", 10)
        self.multiplier = getattr(opts, "feed_multiplier", 1.0)
        self.interval = getattr(opts, "feed_interval", 2.0)
        self.scores = {i: [0, 0] for i in range(1, self.matches + 1)}
        self.conn = GatewayConnection(self, "feeder", [])
        self.conn.check()
        self.next_burst = time.monotonic()

    @task
    def feed(self) -> None:
        gevent.sleep(max(0.0, self.next_burst - time.monotonic()))
        self.next_burst += self.interval
        self.conn.check()
        if not self.conn.alive:
            return
        for _ in range(random.randint(1, max(1, round(5 * self.multiplier)))):
            match = random.randint(1, self.matches)
            side = random.randrange(2)
            self.scores[match][side] += 1
            home, away = self.scores[match]
            content = json.dumps({"scored": ("score_home", "score_away")[side], "score_home": home,
                                  "score_away": away, "t": time.time()})
            self.conn.publish(f"/matches/football/{match}", content)

    def on_stop(self) -> None:
        self.conn.close()
