"""client.js's GatewayClient (gateway/static/client.js) under node, against a real gateway over real
sockets (node's WebSocket: `--experimental-websocket` on node 20, built in from 22)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from conftest import SCALE, ws_url
from support.node import client_module, node

ROOT = Path(__file__).resolve().parents[1]


async def _run_node(script: str, *args: str) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        node(), "--experimental-websocket", "--no-warnings", str(ROOT / "tests" / "js" / script), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60 * SCALE)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    result: dict[str, object] = json.loads(out)
    return result


async def test_a_refused_subscription_keeps_its_position_and_a_later_subscribe_asks_from_it(
        gateway_factory, tmp_path):
    """As the Python client does: the gateway refuses /js/b (--max-subscriptions 1) after the caller
    set its position; the position stays, and subscribing again once a slot is free replays after it."""
    gw = await gateway_factory(max_subscriptions=1)
    seen = await _run_node("refused_keeps_position.mjs", str(client_module(tmp_path)), ws_url(gw))
    assert seen["code"] == "limit_exceeded"
    assert seen["kept"] == seen["first"]  # {epoch, seq 1}
    assert seen["got"] == ["two", "three"]  # "two" replayed from the position, then the sentinel


async def test_a_refreshed_without_exp_schedules_the_next_refresh_from_the_token_sent(gateway_factory, tmp_path):
    """A gateway without auth answers `refresh` with `exp: null`: the next refresh is timed from the
    token just sent (as the Python client does), not from the first token's `exp`, which would bring
    refreshes ever closer and, once it passed, one after the other with no wait."""
    gw = await gateway_factory()
    seen = await _run_node("refresh_exp_from_token.mjs", str(client_module(tmp_path)), ws_url(gw))
    assert seen["refreshes"] == 1 and seen["calls"] == 2
    assert seen["sentExp"] > seen["firstExp"]
    assert seen["tokenExp"] == seen["sentExp"]


async def test_a_token_valid_for_weeks_is_not_refreshed_at_once(gateway_factory, tmp_path):
    """The refresh of a 40-day token is due in 40 days, more than a JavaScript timer can wait
    (2^31 - 1 ms, about 24.8 days: a longer setTimeout fires at once): it must not be sent now, and
    then again after every `refreshed`, without end."""
    import time

    import jwt

    secret = "s3cret-for-tests-only-0123456789abcdef"
    gw = await gateway_factory(jwt_secret=secret)
    token = jwt.encode({"sub": "page", "exp": int(time.time() + 40 * 86400), "sub_allow": ["/>"],
                        "pub_allow": ["/>"]}, secret, algorithm="HS256")
    seen = await _run_node("long_lived_token.mjs", str(client_module(tmp_path)), ws_url(gw), token)
    assert seen == {"acked": True, "refreshes": 0, "calls": 1}


async def test_close_while_waiting_to_reconnect_leaves_no_timer(tmp_path):
    """close() during the backoff before the next attempt cancels that wait: no timer of the client is
    left (under node it kept the process alive for up to `backoffMax`)."""
    from support.ports import free_port

    url = f"ws://127.0.0.1:{free_port()}/ws"  # nothing listens there
    seen = await _run_node("close_while_reconnecting.mjs", str(client_module(tmp_path)), url)
    assert seen["statuses"][-1] == "reconnecting"
    assert seen["timers"] == 0


async def test_a_url_that_refuses_connections_is_a_failed_attempt_at_once(gateway_factory, tmp_path):
    """The first URL refuses connections (nothing listens): the client goes on to the next at once,
    not after its heartbeat watchdog gave up on a connection that never opened (node's WebSocket
    fires `error` and no `close` then)."""
    from support.ports import free_port

    gw = await gateway_factory()
    dead = f"ws://127.0.0.1:{free_port()}/ws"
    seen = await _run_node("failover_past_a_dead_url.mjs", str(client_module(tmp_path)), dead, ws_url(gw))
    statuses = seen["statuses"]
    assert statuses[0] == ["connecting", dead]
    assert statuses[1][0] == "disconnected" and "heartbeat" not in statuses[1][1], statuses
    assert statuses[2:] == [["connecting", ws_url(gw)], ["connected", "test-0"]]


async def test_a_publish_while_disconnected_or_lost_before_its_ack_fails_as_connection_closed(tmp_path):
    """client.js never queues or resends a publish. Not connected: it is refused at once, with or
    without ack (a fire-and-forget publish was dropped without a word). Connection lost before the
    ack: rejected as `connection_closed` with the close code, not as `unavailable`, which is the
    gateway's word for "not stored" and would invite a resend that may store it twice."""
    from support.client_fakegw import FakeGateway, T

    async with FakeGateway() as gw:
        node_run = asyncio.create_task(
            _run_node("publish_on_a_lost_connection.mjs", str(client_module(tmp_path)), gw.url))
        conn = await gw.accept()
        await conn.handshake()
        publish = await conn.expect("publish")  # the first frame that reaches us is the in-flight one
        await conn.close(1012, "restarting")
        seen = await asyncio.wait_for(node_run, 60 * SCALE + T)
    assert publish["content"] == "in flight" and "id" in publish, publish
    for key in ("early", "earlyNoAck", "after"):
        assert seen[key]["code"] == "connection_closed", seen
        assert seen[key]["subject"] == "/js/lost", seen
    lost = seen["lost"]
    assert (lost["code"], lost["id"], lost["closeCode"]) == ("connection_closed", publish["id"], 1012), seen
    assert "may or may not be stored" in lost["message"]


async def test_the_backoff_grows_over_connections_dropped_at_once_and_resets_after_one_that_lasted(tmp_path):
    """A gateway that answers `connected` and drops at once (a crash loop, a close after every
    resubscribe) was retried every `backoffInitial` forever: `connected` reset the backoff. Now only a
    connection that lasted `backoffMax` (1 s here) does. The script pins Math.random, so each wait
    is its cap: 8, 16, 32 ms, then 8 again after the connection that lasted."""
    from support.client_fakegw import FakeGateway, T

    async with FakeGateway() as gw:
        node_run = asyncio.create_task(
            _run_node("backoff_over_quick_drops.mjs", str(client_module(tmp_path)), gw.url, "5"))
        conn = await gw.accept()
        await conn.handshake()
        for _ in range(3):  # dropped right after `connected`, three times
            await conn.close(1011, "crash")
            conn = await gw.accept()
            await conn.handshake()
        await asyncio.sleep(2.0)  # the fourth one lasts twice backoffMax (the client's own clock)
        await conn.close(1001, "restart")
        conn = await gw.accept()
        await conn.handshake()
        seen = await asyncio.wait_for(node_run, 60 * SCALE + T)
    assert seen["waits"] == [8, 16, 32, 8], seen


async def test_a_token_provider_that_hangs_is_a_failed_attempt(tmp_path):
    """An async token provider that never answers held client.js before its first connection forever:
    it now gets `connectTimeout`, and the attempt fails and is retried with a new call. Nothing of the
    wait is left running after close()."""
    from support.client_fakegw import FakeGateway, T

    async with FakeGateway() as gw:
        node_run = asyncio.create_task(
            _run_node("connect_timeout.mjs", str(client_module(tmp_path)), gw.url, "hangs"))
        conn = await gw.accept()
        hello = await conn.handshake()
        seen = await asyncio.wait_for(node_run, 60 * SCALE + T)
    assert hello["token"] == "tok-2" and seen["calls"] == 2, (hello, seen)
    assert ["token provider failed", "no token within 200 ms"] in seen["statuses"], seen
    assert seen["statuses"][-1] == ["connected", "fake"], seen
    assert seen["timers"] == 0, seen


async def test_a_gateway_that_never_answers_connect_is_given_up_after_connect_timeout(tmp_path):
    """A server that upgrades and never answers `connect` (an overloaded gateway, a wrong service
    behind the URL) held client.js for 2 x heartbeat (30 s): it now gets `connectTimeout`, then the
    client tries again."""
    from support.client_fakegw import FakeGateway, T

    async with FakeGateway() as gw:
        node_run = asyncio.create_task(
            _run_node("connect_timeout.mjs", str(client_module(tmp_path)), gw.url, "steady"))
        silent = await gw.accept()
        assert (await silent.expect("connect"))["token"] == "tok-1"  # and no answer
        conn = await gw.accept()
        hello = await conn.handshake()
        seen = await asyncio.wait_for(node_run, 60 * SCALE + T)
    assert hello["token"] == "tok-2", hello
    assert ["disconnected", "1006 connect timeout"] in seen["statuses"], seen
    assert seen["statuses"][-1] == ["connected", "fake"] and seen["timers"] == 0, seen
