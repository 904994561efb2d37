"""JWT authorization over real sockets: unauthorized, forbidden, patterns, algorithms."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import ws_url
from support.ws import close_code, connected, open_ws, recv, send

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def token(secret=SECRET, alg="HS256", **claims):
    body = {"sub": "alice", "exp": int(time.time()) + 60, **claims}
    return jwt.encode(body, secret, algorithm=alg)


@pytest.mark.parametrize("tok", [
    None,
    "garbage",
    token(secret="wrong-secret-wrong-secret-wrong-00"),
    token(exp=int(time.time()) - 10),
    jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none"),
    jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),          # no exp
    token(sub_allow=["/matches/>/x"]),                                 # '>' not last: token refused
    token(exp=10**400),              # signed, but no float holds its exp: was an exception, no answer
])
async def test_bad_tokens_are_unauthorized(gateway_factory, tok):
    gw = await gateway_factory(jwt_secret=SECRET)
    ws = await open_ws(ws_url(gw))
    await send(ws, {"op": "connect", **({"token": tok} if tok is not None else {})})
    err = await recv(ws)
    assert (err["op"], err["code"]) == ("error", "unauthorized")
    assert await close_code(ws) == 1008


async def test_patterns_allow_and_forbid(gateway_factory):
    gw = await gateway_factory(jwt_secret=SECRET)
    tok = token(sub_allow=["/matches/>", "/news/*"], pub_allow=["/matches/football/*"])
    ws = await connected(ws_url(gw), token=tok)
    await send(ws, {"op": "subscribe", "subjects": [
        {"subject": "/matches/football/5"}, {"subject": "/matches"}, {"subject": "/news/a"},
        {"subject": "/news/a/b"}]})
    r = [await recv(ws) for _ in range(4)]
    assert [x["op"] for x in r] == ["subscribed", "error", "subscribed", "error"]
    assert r[1]["code"] == r[3]["code"] == "forbidden"
    await send(ws, {"op": "publish", "subject": "/matches/football/5", "content": "ok", "id": 1})
    assert {(await recv(ws))["op"], (await recv(ws))["op"]} == {"ack", "msg"}
    await send(ws, {"op": "publish", "subject": "/matches/tennis/5", "content": "no", "id": 2})
    err = await recv(ws)
    assert (err["code"], err["id"]) == ("forbidden", 2)


async def test_absent_lists_allow_nothing(gateway_factory):
    gw = await gateway_factory(jwt_secret=SECRET)
    ws = await connected(ws_url(gw), token=token())
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/a/b"}]})
    assert (await recv(ws))["code"] == "forbidden"


async def test_token_ignored_without_auth(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw), token="anything at all")
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/a/b"}]})
    assert (await recv(ws))["op"] == "subscribed"


async def test_public_key_tokens(gateway_factory, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pem)
    gw = await gateway_factory(jwt_public_key=str(tmp_path / "pub.pem"))
    good = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60, "sub_allow": ["/>"]}, key, algorithm="ES256")
    ws = await connected(ws_url(gw), token=good)
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/x/y"}]})
    assert (await recv(ws))["op"] == "subscribed"
    # an HMAC token signed with the public key's text must not pass (algorithm confusion)
    ws2 = await open_ws(ws_url(gw))
    await send(ws2, {"op": "connect", "token": token()})
    assert (await recv(ws2))["code"] == "unauthorized"


# ---- 1.1: refresh, expiry (close 4001), aud / iss / lifetime, over real sockets ----------------------

import asyncio  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

from websockets.exceptions import ConnectionClosed  # noqa: E402

from support.waits import wait_until  # noqa: E402
from support.ws import recv_until  # noqa: E402


def alg_none(**claims):
    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    body = {"sub": "alice", "exp": int(time.time()) + 60, **claims}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(body)}."


async def expect_expiry_close(ws):
    """What 1.1 says a session whose token ran out gets: error unauthorized, then close 4001."""
    frames = []
    try:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
    errors = [f for f in frames if f["op"] == "error"]
    assert [e["code"] for e in errors] == ["unauthorized"], (code, frames)
    assert "request" not in errors[0]  # it answers no request
    assert code == 4001


async def test_token_expiry_closes_active_and_silent_connections_4001(gateway_factory):
    """A token that runs out without a refresh ends its session with 4001, whether the client talks or
    not; a client with a valid token on the same gateway keeps every message, in order."""
    gw = await gateway_factory(jwt_secret=SECRET, heartbeat_ms=500, jwt_leeway_ms=0)
    short = token(exp=int(time.time()) + 2, sub_allow=["/>"], pub_allow=["/>"])
    silent = await connected(ws_url(gw), token=short)
    active = await connected(ws_url(gw), token=short)
    watcher = await connected(ws_url(gw), token=token(exp=int(time.time()) + 600, sub_allow=["/>"]))
    await send(watcher, {"op": "subscribe", "subjects": [{"subject": "/s/x"}]})
    await recv_until(watcher, "subscribed")
    seen: list[dict] = []

    async def watch():  # reads all the time, so the watcher answers the gateway's pings
        while True:
            seen.append(json.loads(await watcher.recv()))

    watching = asyncio.ensure_future(watch())
    silent_done = asyncio.ensure_future(expect_expiry_close(silent))
    n = acks = 0
    active_frames: list[dict] = []
    try:
        while True:  # the active client publishes until it is closed
            n += 1
            await send(active, {"op": "publish", "subject": "/s/x", "content": str(n), "id": n})
            while True:
                f = json.loads(await asyncio.wait_for(active.recv(), 10))
                active_frames.append(f)
                if f["op"] in ("ack", "error"):
                    break
            if f["op"] == "error":
                break
            assert f["id"] == n
            acks += 1
            await asyncio.sleep(0.05)
    except ConnectionClosed as exc:  # closed between two publishes: the error frame is still queued
        assert exc.rcvd is not None and exc.rcvd.code == 4001
        with contextlib.suppress(ConnectionClosed):
            while True:
                active_frames.append(json.loads(await asyncio.wait_for(active.recv(), 10)))
    else:  # the error frame came instead of an ack: then the close
        assert await close_code(active) == 4001
    errors = [f for f in active_frames if f["op"] == "error"]
    assert [(e["code"], "request" in e) for e in errors] == [("unauthorized", False)], active_frames
    await silent_done
    assert acks >= 1
    # the watcher got every acknowledged message, in order, and is still served (the pong: sentinel)
    await send(watcher, {"op": "ping", "id": "still-here"})
    await wait_until(lambda: any(f["op"] == "pong" for f in seen), "the watcher's pong")
    watching.cancel()
    got = [int(f["content"]) for f in seen if f["op"] == "msg"]
    assert got[:acks] == list(range(1, acks + 1)) and len(got) <= acks + 1


async def test_refresh_replaces_the_token_and_the_session_outlives_the_old_exp(gateway_factory):
    gw = await gateway_factory(jwt_secret=SECRET, heartbeat_ms=1000, jwt_leeway_ms=0)
    old_exp = int(time.time()) + 2
    ws = await connected(ws_url(gw), token=token(exp=old_exp, sub_allow=["/>"]))
    control = await connected(ws_url(gw), token=token(exp=old_exp, sub_allow=["/>"]))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/r/a"}]})
    await recv_until(ws, "subscribed")
    new_exp = int(time.time()) + 600
    await send(ws, {"op": "refresh", "token": token(exp=new_exp, sub_allow=["/>"])})
    assert await recv_until(ws, "refreshed") == {"op": "refreshed", "exp": new_exp}
    await expect_expiry_close(control)  # the old exp has passed: without the refresh, closed
    await send(ws, {"op": "ping", "id": 1})
    assert (await recv_until(ws, "pong"))["id"] == 1


async def test_refresh_to_an_exp_beyond_64_bits_is_answered(gateway_factory):
    """A validly signed token whose `exp` is beyond 2^64 s (a "never expires" token, without
    --jwt-max-lifetime-s): the `refreshed` answer used to fail to encode (orjson takes 64-bit integers
    only), so the refresh got no answer and the connection was dropped without a close frame."""
    gw = await gateway_factory(jwt_secret=SECRET)
    ws = await connected(ws_url(gw), token=token(sub_allow=["/>"]))
    await send(ws, {"op": "refresh", "token": token(exp=10**20, sub_allow=["/>"])})
    assert await recv_until(ws, "refreshed") == {"op": "refreshed", "exp": 1e20}
    await send(ws, {"op": "ping", "id": 1})
    assert await recv_until(ws, "pong") == {"op": "pong", "id": 1}


@pytest.mark.parametrize("bad", [
    lambda: token(sub="mallory", exp=int(time.time()) + 600),   # another sub
    lambda: token(secret="wrong-secret-wrong-secret-wrong-00"),  # forged
    lambda: token(exp=int(time.time()) - 60),                    # expired
    lambda: alg_none(),
    lambda: "garbage",
    lambda: None,
])
async def test_refused_refresh_keeps_the_old_token(gateway_factory, bad):
    gw = await gateway_factory(jwt_secret=SECRET, heartbeat_ms=1000, jwt_leeway_ms=0)
    ws = await connected(ws_url(gw), token=token(exp=int(time.time()) + 2, sub_allow=["/>"]))
    tok = bad()
    await send(ws, {"op": "refresh", **({"token": tok} if tok is not None else {})})
    err = await recv_until(ws, "error")
    assert (err["code"], err["request"]) == ("unauthorized", "refresh")
    await send(ws, {"op": "ping", "id": 2})  # the session goes on...
    assert (await recv_until(ws, "pong"))["id"] == 2
    await expect_expiry_close(ws)          # ...until the old token's exp


async def test_refresh_applies_the_new_entitlements_to_subscriptions(gateway_factory):
    gw = await gateway_factory(jwt_secret=SECRET)
    ws = await connected(ws_url(gw), token=token(sub_allow=["/>"]))
    pub = await connected(ws_url(gw), token=token(pub_allow=["/>"]))
    await send(ws, {"op": "subscribe", "subjects": [{"subject": "/keep/a"}, {"subject": "/drop/b"}]})
    await recv_until(ws, "subscribed")
    await recv_until(ws, "subscribed")
    await send(ws, {"op": "refresh", "token": token(sub_allow=["/keep/>"])})
    assert (await recv_until(ws, "refreshed"))["op"] == "refreshed"
    err = await recv_until(ws, "error")
    assert (err["code"], err["subject"], err["request"]) == ("forbidden", "/drop/b", "refresh")
    for subject in ("/drop/b", "/keep/a"):  # the second is the sentinel: nothing of /drop/b before it
        await send(pub, {"op": "publish", "subject": subject, "content": subject, "id": subject})
        await recv_until(pub, "ack")
    m = await recv_until(ws, "msg")
    assert m["subject"] == "/keep/a"


async def test_refresh_without_auth_is_answered_and_ignored(gateway_factory):
    gw = await gateway_factory()
    ws = await connected(ws_url(gw))
    await send(ws, {"op": "refresh", "token": "anything"})
    assert await recv(ws) == {"op": "refreshed"}


@pytest.mark.parametrize("tok", [
    lambda: token(secret="wrong-secret-wrong-secret-wrong-00", aud="gw", iss="idp"),  # forged
    lambda: token(aud="other", iss="idp"),
    lambda: token(aud="gw", iss="evil"),
    lambda: token(iss="idp"),
    lambda: token(aud="gw"),
    lambda: token(aud="gw", iss="idp", exp=int(time.time()) - 60),
    lambda: alg_none(aud="gw", iss="idp"),
    lambda: token(aud="gw", iss="idp", exp=1_099_511_627_776),       # the year 36812
])
async def test_audience_issuer_and_lifetime_are_enforced(gateway_factory, tok):
    gw = await gateway_factory(jwt_secret=SECRET, jwt_audience="gw", jwt_issuer="idp",
                               jwt_max_lifetime_s=3600)
    t = tok()
    ws = await open_ws(ws_url(gw))
    await send(ws, {"op": "connect", "token": t})
    err = await recv(ws)
    assert (err["code"], err["request"]) == ("unauthorized", "connect")
    assert await close_code(ws) == 1008
    ok = await connected(ws_url(gw), token=token(aud="gw", iss="idp"))  # the right one passes
    await ok.close()


async def test_auth_off_and_a_short_secret_are_logged_warnings(gateway_factory, caplog):
    with caplog.at_level(logging.WARNING, logger="gateway"):
        await gateway_factory()
    assert any("auth is off" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway"):
        await gateway_factory(jwt_secret=SECRET)
    assert not any("auth is off" in r.getMessage() for r in caplog.records)
    assert not any("32" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="gateway"):
        await gateway_factory(jwt_secret="short")
    assert any("--jwt-secret is 5 bytes" in r.getMessage() for r in caplog.records)


async def test_many_refreshes_keep_the_expiry_heap_bounded(gateway_factory):
    gw = await gateway_factory(jwt_secret=SECRET)
    ws = await connected(ws_url(gw), token=token())
    for i in range(3000):
        await send(ws, {"op": "refresh", "token": token(exp=int(time.time()) + 600 + i)})
    for _ in range(3000):
        await recv_until(ws, "refreshed")
    await wait_until(lambda: len(gw.expiries) <= 2 * len(gw.sessions) + 1025, "the heap compacted")
