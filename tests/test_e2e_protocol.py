"""Protocol v1 on the standalone engine, over real sockets, with a third-party client (`websockets`)."""

from __future__ import annotations

import base64
import json

import pytest

from conftest import SCALE, ws_url
from support.ws import client_frame, close_code, connected, no_frame, open_ws, recv, recv_until, send

pytestmark = pytest.mark.both_loops


async def test_connect_handshake(gateway_factory):
    gw = await gateway_factory(heartbeat_ms=15000, node_id="node-a")
    ws = await open_ws(ws_url(gw))
    await send(ws, {"op": "connect", "client": "t/1", "extra": "ignored"})
    reply = await recv(ws)
    assert reply["op"] == "connected"
    assert reply["server"] == "node-a"
    assert reply["heartbeat_ms"] == 15000
    assert reply["version"] == 1
    assert isinstance(reply["session"], str) and reply["session"]
    await ws.close()


@pytest.mark.parametrize("first", [
    json.dumps({"op": "subscribe", "subjects": []}),
    "not json",
    json.dumps([1, 2]),
])
async def test_first_frame_must_be_connect(gateway_factory, first):
    gw = await gateway_factory()
    ws = await open_ws(ws_url(gw))
    await ws.send(first)
    err = await recv(ws)
    assert err["op"] == "error" and err["code"] == "not_connected"
    assert await close_code(ws) == 1008


async def test_binary_first_frame_is_not_connected(gateway_factory):
    gw = await gateway_factory()
    ws = await open_ws(ws_url(gw))
    await ws.send(b'{"op":"connect"}')
    err = await recv(ws)
    assert err["code"] == "not_connected"
    assert await close_code(ws) == 1008


async def test_no_connect_in_time_closes_1008(gateway_factory):
    gw = await gateway_factory(connect_timeout_ms=300)
    ws = await open_ws(ws_url(gw))
    assert await close_code(ws) == 1008


async def test_second_connect_and_unknown_op_are_bad_requests(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "connect"})
    assert (await recv(ws))["code"] == "bad_request"
    await send(ws, {"op": "frobnicate", "id": 7})
    err = await recv(ws)
    assert err["code"] == "bad_request" and err["op"] == "error"
    await ws.send("{bad json")
    assert (await recv(ws))["code"] == "bad_request"
    await send(ws, {"op": "ping", "id": "still-open"})
    assert await recv(ws) == {"op": "pong", "id": "still-open"}
    await ws.close()


async def test_publish_subscribe_msg_fields(gateway_factory):
    gw = await gateway_factory()
    sub = await connected(ws_url(gw))
    pub = await connected(ws_url(gw))
    await send(sub, {"op": "subscribe", "subjects": [{"subject": "/matches/football/5"}]})
    s = await recv(sub)
    assert s == {"op": "subscribed", "subject": "/matches/football/5", "epoch": s["epoch"], "seq": 0,
                 "recovered": False}
    await send(pub, {"op": "publish", "subject": "/matches/football/5", "content": "1-0", "id": "a"})
    ack = await recv(pub)
    assert ack == {"op": "ack", "id": "a", "subject": "/matches/football/5", "epoch": s["epoch"], "seq": 1}
    m = await recv(sub)
    assert m["op"] == "msg" and m["subject"] == "/matches/football/5" and m["content"] == "1-0"
    assert (m["epoch"], m["seq"], m["prev"]) == (s["epoch"], 1, 0)
    assert isinstance(m["ts"], int) and m["ts"] > 1_600_000_000_000
    assert "snapshot" not in m
    await send(pub, {"op": "publish", "subject": "/matches/football/5", "content": "2-0", "id": 42})
    assert (await recv(pub))["id"] == 42
    m2 = await recv(sub)
    assert (m2["seq"], m2["prev"], m2["content"]) == (2, 1, "2-0")
    # another subject has its own sequence
    await send(pub, {"op": "publish", "subject": "/matches/football/6", "content": "x", "id": "m-1"})
    ack = await recv(pub)
    assert ack["seq"] == 1 and ack["id"] == "m-1"
    await no_frame(sub)


async def test_publish_without_id_gets_no_ack_but_errors(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/t/a"}]})
    await recv(ws)
    await send(ws, {"op": "publish", "subject": "/t/a", "content": "hello"})
    m = await recv(ws)
    assert m["op"] == "msg" and m["content"] == "hello"   # its own message, no ack
    await send(ws, {"op": "publish", "subject": "/t/bad subject", "content": "x"})
    err = await recv(ws)
    assert err["op"] == "error" and err["code"] == "invalid_subject" and "id" not in err
    await no_frame(ws)


async def test_publisher_gets_ack_and_own_message(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/t/own"}]})
    await recv(ws)
    await send(ws, {"op": "publish", "subject": "/t/own", "content": "c", "id": "x"})
    got = {(await recv(ws))["op"], (await recv(ws))["op"]}
    assert got == {"ack", "msg"}


async def test_snapshot_and_recovery(gateway_factory):
    gw = await gateway_factory(history=5)
    pub = await connected(ws_url(gw))
    for i in range(1, 4):
        await send(pub, {"op": "publish", "subject": "/s/x", "content": f"m{i}", "id": i})
        await recv(pub)
    sub = await connected(ws_url(gw))
    # no position: subscribed + the snapshot (latest message, flagged)
    await send(sub, {"op": "subscribe", "subjects": [{"subject": "/s/x"}]})
    s = await recv(sub)
    assert (s["seq"], s["recovered"]) == (3, False)
    snap = await recv(sub)
    assert snap["op"] == "msg" and snap["seq"] == 3 and snap["snapshot"] is True and snap["content"] == "m3"
    epoch = s["epoch"]
    # a position inside the window: replay after it, in order, not flagged
    await send(sub, {"op": "subscribe", "subjects": [{"subject": "/s/x", "epoch": epoch, "seq": 1}]})
    s = await recv(sub)
    assert (s["seq"], s["recovered"]) == (3, True)
    replay = [await recv(sub), await recv(sub)]
    assert [(m["seq"], m["content"]) for m in replay] == [(2, "m2"), (3, "m3")]
    assert all("snapshot" not in m for m in replay)
    # the newest position: recovered with nothing to replay
    await send(sub, {"op": "subscribe", "subjects": [{"subject": "/s/x", "epoch": epoch, "seq": 3}]})
    s = await recv(sub)
    assert s["recovered"] is True
    await no_frame(sub)
    # live messages follow exactly once
    await send(pub, {"op": "publish", "subject": "/s/x", "content": "m4", "id": 4})
    await recv(pub)
    m = await recv(sub)
    assert (m["seq"], m["prev"]) == (4, 3)
    await no_frame(sub)


@pytest.mark.parametrize("position", ["other-epoch", "ahead", "too-old"])
async def test_failed_recovery_sends_snapshot(gateway_factory, position):
    gw = await gateway_factory(history=5)
    pub = await connected(ws_url(gw))
    for i in range(1, 11):
        await send(pub, {"op": "publish", "subject": "/s/y", "content": f"m{i}", "id": i})
        epoch = (await recv(pub))["epoch"]
    entry = {"other-epoch": {"epoch": "nope", "seq": 9}, "ahead": {"epoch": epoch, "seq": 11},
             "too-old": {"epoch": epoch, "seq": 2}}[position]
    sub = await connected(ws_url(gw))
    await send(sub, {"op": "subscribe", "subjects": [{"subject": "/s/y", **entry}]})
    s = await recv(sub)
    assert (s["seq"], s["recovered"], s["epoch"]) == (10, False, epoch)
    snap = await recv(sub)
    assert snap["snapshot"] is True and snap["seq"] == 10
    await no_frame(sub)


async def test_subscribe_entries_judged_one_by_one(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [
        {"subject": "/a/1"},
        {"subject": "/a/2", "epoch": "e"},
        {"subject": "no-slash"},
        {"subject": "/a/3", "seq": 4},
        "not-an-object",
        {"subject": "/a/4"},
    ]})
    r = [await recv(ws) for _ in range(6)]
    assert r[0]["op"] == "subscribed" and r[0]["subject"] == "/a/1"
    assert (r[1]["code"], r[1]["subject"]) == ("bad_request", "/a/2")
    assert (r[2]["code"], r[2]["subject"]) == ("invalid_subject", "no-slash")
    assert (r[3]["code"], r[3]["subject"]) == ("bad_request", "/a/3")
    assert r[4]["code"] == "bad_request"
    assert r[5]["op"] == "subscribed" and r[5]["subject"] == "/a/4"
    await send(ws, {"op": "subscribe", "subjects": "/a/1"})
    assert (await recv(ws))["code"] == "bad_request"


@pytest.mark.parametrize("subject", ["/", "//x", "/a b", "/" + "x" * 1030, "/a/" + "/".join("s" * 32),
                                     "/../x", "/to~pic/x", "relative"])
async def test_invalid_subjects(gateway_factory, subject):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": subject}]})
    err = await recv(ws)
    assert err["op"] == "error" and err["code"] == "invalid_subject" and err["subject"] == subject
    await send(ws, {"op": "publish", "subject": subject, "content": "x", "id": "p"})
    err = await recv(ws)
    assert (err["code"], err["id"]) == ("invalid_subject", "p")


async def test_unsubscribe(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/u/1"}]})
    await recv(ws)
    await send(ws, {"op": "unsubscribe", "subjects": ["/u/1", "/u/never"]})
    assert await recv(ws) == {"op": "unsubscribed", "subject": "/u/1"}
    assert await recv(ws) == {"op": "unsubscribed", "subject": "/u/never"}
    await send(ws, {"op": "publish", "subject": "/u/1", "content": "x", "id": 1})
    assert (await recv(ws))["op"] == "ack"
    await no_frame(ws)
    await send(ws, {"op": "unsubscribe", "subjects": "/u/1"})
    assert (await recv(ws))["code"] == "bad_request"


async def test_resubscribe_replaces_subscription(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "publish", "subject": "/r/1", "content": "a", "id": 1})
    await recv(ws)
    for _ in range(2):
        await send(ws, {"op": "subscribe", "subjects": [{"subject": "/r/1"}]})
        assert (await recv(ws))["op"] == "subscribed"
        assert (await recv(ws))["snapshot"] is True
    await send(ws, {"op": "publish", "subject": "/r/1", "content": "b"})
    m = await recv(ws)
    assert m["seq"] == 2
    await no_frame(ws)  # one subscription: the message comes once


async def test_content_b64_both_ways(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/b/1"}]})
    await recv(ws)
    raw = b"\xff\x00\xfe binary"
    await send(ws, {"op": "publish", "subject": "/b/1", "content_b64": base64.b64encode(raw).decode()})
    m = await recv(ws)
    assert "content" not in m and base64.b64decode(m["content_b64"]) == raw
    # valid UTF-8 sent as base64 is delivered as content
    await send(ws, {"op": "publish", "subject": "/b/1", "content_b64": base64.b64encode("héllo".encode()).decode()})
    m = await recv(ws)
    assert m["content"] == "héllo" and "content_b64" not in m
    for bad in ({"content": "a", "content_b64": "YQ=="}, {}, {"content_b64": "!!!"}, {"content": 5}):
        await send(ws, {"op": "publish", "subject": "/b/1", "id": "z", **bad})
        err = await recv(ws)
        assert (err["op"], err["code"], err["id"]) == ("error", "bad_request", "z")


async def test_content_b64_that_grows_past_the_limit_as_content_is_too_large(gateway_factory):
    """Valid UTF-8 published as content_b64 is delivered as `content`, where a control character takes 6
    bytes (\\u0001): 40 KB within a 64 KiB frame became a 240 KB `msg`, over every subscriber's
    --max-pending-bytes, so each was closed 4000, and so was every later one (its snapshot), for as long as
    the gateway held the subject. Now too_large, as the content as delivered is over --max-message-bytes;
    content that stays within it is delivered, escaped or as content_b64."""
    limit = 64 * 1024
    gw = await gateway_factory(max_message_bytes=limit, max_pending_bytes=2 * limit)
    sub = await connected(ws_url(gw))
    await send(sub, {"op": "subscribe", "subjects": [{"subject": "/b/2"}]})
    assert (await recv(sub))["op"] == "subscribed"
    pub = await connected(ws_url(gw))
    grows = base64.b64encode(b"\x01" * 40_000).decode()
    await send(pub, {"op": "publish", "subject": "/b/2", "content_b64": grows, "id": 1})
    err = await recv(pub)
    assert (err["op"], err["code"], err["id"], err["subject"], err["request"]) == \
        ("error", "too_large", 1, "/b/2", "publish")
    fits = [b"\x01" * 5_000, b"\xff" * 40_000]   # 30 KB escaped as content; not UTF-8: content_b64
    for i, raw in enumerate(fits, 2):
        await send(pub, {"op": "publish", "subject": "/b/2", "content_b64": base64.b64encode(raw).decode(), "id": i})
        assert (await recv(pub))["op"] == "ack"
    m = await recv(sub)
    assert (m["seq"], m["content"]) == (1, fits[0].decode())
    m = await recv(sub)
    assert (m["seq"], base64.b64decode(m["content_b64"])) == (2, fits[1])
    await no_frame(sub)


async def _per_subject(ws, n: int, acks: list | None = None) -> dict[str, list[tuple]]:
    """Read `n` subscribed / msg frames (acks aside, into `acks`); per subject, in order, what came:
    (op, seq, recovered, snapshot)."""
    seen: dict[str, list[tuple]] = {}
    while n:
        f = await recv(ws)
        if f["op"] == "ack" and acks is not None:
            acks.append(f["id"])
            continue
        assert f["op"] in ("subscribed", "msg"), f
        seen.setdefault(f["subject"], []).append((f["op"], f["seq"], f.get("recovered"), f.get("snapshot", False)))
        n -= 1
    return seen


async def test_one_subscribe_whose_snapshots_and_replays_exceed_max_pending_is_paced(gateway_factory):
    """Five subjects whose latest message is near --max-message-bytes, subscribed in one request: their
    snapshots (and, with positions, their replays' first messages) were queued at once, over
    --max-pending-bytes, so the connection was closed 4000, and the client's resubscribe after the
    reconnect the same, forever. Snapshots and replays are paced by the connection's output instead; a
    message published meanwhile follows its subject's snapshot, once."""
    limit = 64 * 1024
    gw = await gateway_factory(max_message_bytes=limit, max_pending_bytes=2 * limit)
    pub = await connected(ws_url(gw))
    subjects = [f"/big/{i}" for i in range(5)]
    for i, subject in enumerate(subjects):
        await send(pub, {"op": "publish", "subject": subject, "content": str(i) * 60_000, "id": i})
        ack = await recv(pub)
    epoch = ack["epoch"]
    fresh = await connected(ws_url(gw))
    # the subscribe and a publish to the last subject in one write: it lands while the snapshots are paced
    subscribe = {"op": "subscribe", "subjects": [{"subject": s} for s in subjects]}
    publish = {"op": "publish", "subject": subjects[-1], "content": "live", "id": "live"}
    fresh.transport.write(b"".join(client_frame(0x1, json.dumps(m).encode()) for m in (subscribe, publish)))
    acks: list = []
    seen = await _per_subject(fresh, 11, acks)
    for subject in subjects[:-1]:
        assert seen[subject] == [("subscribed", 1, False, False), ("msg", 1, None, True)]
    assert seen[subjects[-1]] == [("subscribed", 1, False, False), ("msg", 1, None, True), ("msg", 2, None, False)]
    if not acks:
        assert (await recv(fresh))["op"] == "ack"
    await no_frame(fresh)
    again = await connected(ws_url(gw))
    await send(again, {"op": "subscribe", "subjects": [{"subject": s, "epoch": epoch, "seq": 0} for s in subjects]})
    seen = await _per_subject(again, 11)
    for subject in subjects[:-1]:
        assert seen[subject] == [("subscribed", 1, True, False), ("msg", 1, None, False)]
    assert seen[subjects[-1]] == [("subscribed", 2, True, False), ("msg", 1, None, False), ("msg", 2, None, False)]
    await no_frame(again)


async def test_oversized_frame_closes_1009(gateway_factory):
    gw = await gateway_factory(max_message_bytes=1024)
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "publish", "subject": "/big/1", "content": "x" * 2000})
    assert await close_code(ws) == 1009


async def test_fragmented_message_is_reassembled_and_limited(gateway_factory):
    gw = await gateway_factory(max_message_bytes=4096)
    ws = await connected(ws_url(gw))
    text = json.dumps({"op": "ping", "id": "frag"})
    await ws.send([text[:5], text[5:12], text[12:]])  # websockets sends an iterable as fragments
    assert await recv(ws) == {"op": "pong", "id": "frag"}
    await ws.send(["{" + " " * 3000, " " * 3000 + "}"])
    assert await close_code(ws) == 1009


async def test_ping_pong_and_heartbeat(gateway_factory):
    gw = await gateway_factory(heartbeat_ms=200)
    ws = await connected(ws_url(gw), ping_interval=None)
    await send(ws, {"op": "ping", "id": 9})
    assert await recv(ws) == {"op": "pong", "id": 9}
    # silence -> {"op":"hb"} (websockets answers the server's WebSocket pings, so it stays open)
    assert await recv(ws, timeout=3) == {"op": "hb"}
    assert await recv(ws, timeout=3) == {"op": "hb"}
    await ws.close()


async def test_heartbeats_keep_coming_to_a_client_that_sends_websocket_pings(gateway_factory):
    """PROTOCOL.md Liveness: `hb` after heartbeat_ms without a *protocol message*. The pongs that answer a
    client's WebSocket pings (a library's keepalive, here 5 per heartbeat_ms) are no protocol message:
    they used to count as output, and such a client never got an `hb`, so its watchdog (2 x heartbeat_ms
    without a message) dropped a healthy connection."""
    hb = 0.2
    gw = await gateway_factory(heartbeat_ms=int(hb * 1000))
    ws = await connected(ws_url(gw), ping_interval=hb / 5, ping_timeout=None)
    for _ in range(2):
        assert await recv(ws, timeout=10 * hb * SCALE) == {"op": "hb"}
    await ws.close()


async def test_shutdown_closes_clients_with_1001(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await gw.stop()
    assert await close_code(ws) == 1001


# ---- 1.1: the id rule and `request` on errors, over real sockets -------------------------------------

@pytest.mark.parametrize("raw_id", ["18446744073709551617", "9007199254740993", "1.5", "true", "{}", "[1]",
                                    '"' + "x" * 257 + '"', "1" + "0" * 400])
async def test_ids_outside_the_rule_are_refused_not_altered(gateway_factory, raw_id):
    """Before 1.1 an id above 2^64 came back as a float: now it is bad_request, nothing is published,
    and the connection goes on."""
    gw = await gateway_factory()
    pub = await connected(ws_url(gw))
    sub = await connected(ws_url(gw))
    await send(sub, {"op": "subscribe", "subjects": [{"subject": "/ids/a"}]})
    await recv_until(sub, "subscribed")
    await pub.send('{"op":"publish","subject":"/ids/a","content":"bad","id":' + raw_id + "}")
    err = await recv(pub)
    assert (err["op"], err["code"]) == ("error", "bad_request") and "id" not in err
    await send(pub, {"op": "publish", "subject": "/ids/a", "content": "ok", "id": 2**53})
    ack = await recv_until(pub, "ack")
    assert ack["id"] == 2**53 and ack["seq"] == 1
    assert (await recv_until(sub, "msg"))["content"] == "ok"  # the refused publish never reached anyone


async def test_errors_name_the_request_they_answer(gateway_factory):
    """A refused subscribe and a failed fire-and-forget publish to the same subject are told apart."""
    import time

    import jwt

    secret = "s3cret-for-tests-only-0123456789abcdef"
    gw = await gateway_factory(jwt_secret=secret)
    tok = jwt.encode({"sub": "a", "exp": int(time.time()) + 60, "sub_allow": [], "pub_allow": []}, secret)
    ws = await connected(ws_url(gw), token=tok)
    await send(ws, {"op": "publish", "subject": "/x/y", "content": "c"})
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/x/y"}, {"subject": "bad"}, 7]})
    await send(ws, {"op": "unsubscribe", "subjects": ["bad"]})
    await send(ws, {"op": "publish", "subject": "/x/y", "content": "c", "id": "p1"})
    await send(ws, {"op": "publish", "subject": "/x/y"})
    await send(ws, {"op": "connect"})
    await send(ws, {"op": "nope"})
    got = [await recv(ws) for _ in range(8)]
    assert [(f["code"], f.get("subject"), f.get("request")) for f in got] == [
        ("forbidden", "/x/y", "publish"),
        ("forbidden", "/x/y", "subscribe"),
        ("invalid_subject", "bad", "subscribe"),
        ("bad_request", None, "subscribe"),
        ("invalid_subject", "bad", "unsubscribe"),
        ("forbidden", "/x/y", "publish"),
        ("bad_request", "/x/y", "publish"),
        ("bad_request", None, "connect"),
    ]
    assert got[5]["id"] == "p1"
    err = await recv(ws)
    assert err["code"] == "bad_request" and err["request"] == "nope", err  # an unknown op is echoed


async def test_not_connected_names_the_request(gateway_factory):
    gw = await gateway_factory()
    ws = await open_ws(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": []})
    err = await recv(ws)
    assert (err["code"], err["request"]) == ("not_connected", "subscribe")
    assert await close_code(ws) == 1008


async def test_limit_errors_name_the_request_they_answer(gateway_factory):
    gw = await gateway_factory(max_subscriptions=1, publish_rate=1, publish_burst=1)
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/lim/a"}, {"subject": "/lim/b"}]})
    assert (await recv(ws))["op"] == "subscribed"
    err = await recv(ws)
    assert (err["code"], err["subject"], err["request"]) == ("limit_exceeded", "/lim/b", "subscribe")
    for i in range(3):
        await send(ws, {"op": "publish", "subject": "/lim/b", "content": "x", "id": i})
    frames = [await recv(ws) for _ in range(3)]
    refused = [f for f in frames if f["op"] == "error"]
    assert refused and all((f["code"], f["request"]) == ("rate_limited", "publish") for f in refused)
