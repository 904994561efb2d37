"""JWT authorization over real sockets: unauthorized, forbidden, patterns, algorithms."""

from __future__ import annotations

import time

import jwt
import pytest
from conftest import ws_url
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
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
